"""
Pictures of a trained CCA model, drawn with pillow alone: the attention of every condition over an
image (the paper's Figure 4), attribute-specific retrieval (Figure A2), 2-D projections of each
attribute's embedding space coloured by value (Figures 5 and 6), retrieval for a user's own image, and
search.py's results under one or several attributes (search_figure).

    from cca import load_checkpoint
    from evaluate import embed_items
    from data import EvalItems
    import visualize
    model, ckpt = load_checkpoint("runs/synthetic/best.pt"); meta = ckpt["meta"]
    visualize.attention_figure(model, "shirt.jpg", meta, "attention.png")
    cands = EvalItems(meta["name"], "data/synthetic", "test", "candidate", model.cfg.img_size)
    feats = embed_items(model, cands, torch.device("cpu"))
    print(visualize.format_retrieval(visualize.predict(model, "shirt.jpg", "sleeve_length", meta, cands, feats), meta, 0))

From the command line (PNGs go to --out, by default figures/ beside the checkpoint):

    python visualize.py --ckpt runs/synthetic/best.pt --attention data/synthetic/images/test/00016.jpg
    python visualize.py --ckpt runs/synthetic/best.pt --retrieve my_shirt.jpg --attr sleeve_length --topk 5
    python visualize.py --ckpt runs/compare/seed0/cca2/best.pt --embeddings --compare runs/compare/seed0/triplet/best.pt

--retrieve searches the --split's candidates (default test) and --embeddings projects its queries and candidates;
the scores of a checkpoint are evaluate.py's.

Every figure function writes a PNG and returns what it computed, so that tests and scripts can check
the numbers behind the picture. Layout sizes are the module constants below; a figure's width and
height follow from them as each function's docstring states.
"""

import argparse
import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from cca import load_checkpoint, method_title
from data import EVAL_MISSING, MEAN, STD, load_image
from evaluate import embed_items, embed_split, open_split
from runtime import autocast, device_arg, error_message, evaluating, model_device, number, output_folder

# -----------------------------------------------------------------------------
# layout (pixels)

FONT_SIZE = 14
LINE = 18  # height of one line of text
PAD = 8  # margin around and between panels
MIN_SIDE = 192  # image panels are scaled up by a whole factor to at least this side (64 px -> 192 px)
MAX_COLS = 6  # the attention figure wraps into rows beyond this many panels
SEP = 3 * PAD  # retrieval: the gap between the query and its results
BORDER = 4  # retrieval: width of the correct / wrong frame
PLOT = 200  # embedding figure: side of one scatter plot
LABEL_W = 120  # embedding figure: the column of row titles (method names), wrapped at spaces
DOT = 2  # embedding figure: point radius

ALPHA = (0.3, 0.8)  # heat-map opacity at attention 0 and at 1: the image shows through where attention is low
HEAT = [(0.0, (0, 0, 0)), (0.4, (0.8, 0, 0)), (0.75, (1, 0.8, 0)), (1.0, (1, 1, 1))]  # black-red-yellow-white
# a qualitative palette (the ten "Tableau 10" hues); an attribute with more values reuses them in order. Its colours
# are arbitrary: they tell the values apart and the figure says so, unless the values are colour names (COLOURS)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# values named by a colour (the synthetic set's colour, DARN's clothes color...) are drawn in it; names case-insensitive
COLOURS = {"red": (214, 39, 40), "orange": (255, 127, 14), "yellow": (235, 200, 0), "green": (44, 160, 44),
           "cyan": (0, 190, 210), "blue": (31, 90, 220), "navy": (20, 30, 110), "purple": (128, 50, 160),
           "violet": (148, 103, 189), "magenta": (210, 0, 210), "pink": (240, 120, 180), "brown": (140, 86, 75),
           "beige": (225, 205, 165), "khaki": (190, 170, 110), "black": (0, 0, 0), "white": (255, 255, 255),
           "grey": (127, 127, 127), "gray": (127, 127, 127)}
GREEN, RED, GREY, TEXT = (40, 160, 60), (210, 40, 40), (150, 150, 150), (20, 20, 20)


@lru_cache(maxsize=None)
def font(size=FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)  # pillow >= 10.1: a scalable built-in font, no file needed
    except TypeError:
        return ImageFont.load_default()  # older pillow: one small bitmap size


def fit(draw, text, width):
    """text, cut with an ellipsis so that it fits in `width` pixels."""
    if draw.textlength(text, font=font()) <= width:
        return text
    while text and draw.textlength(text + "…", font=font()) > width:
        text = text[:-1]
    return text + "…"


def write_text(draw, xy, text, width, fill=TEXT, center=True):
    """One line of text in the box [x, x + width) starting at y, centred unless center=False."""
    text = fit(draw, text, width)
    x = xy[0] + (width - draw.textlength(text, font=font())) / 2 if center else xy[0]
    draw.text((x, xy[1]), text, fill=fill, font=font())


def wrap(draw, text, width):
    """Lines of at most `width` pixels, broken at spaces; a word longer than a line is cut by fit()."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(lines[-1] + " " + word, font=font()) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return [fit(draw, line, width) for line in lines]


def panel_side(img_size):
    return img_size * max(1, math.ceil(MIN_SIDE / img_size))


def value_name(meta, attr, value):
    names = meta["values"][attr]
    return names[value] if value < len(names) else f"value {value}"  # Zappos' meta has no value names


def to_picture(image, side):
    """A (3, S, S) model input in [-1, 1] -> a side x side PIL image of the original pixels."""
    rgb = (image.detach().cpu().float() * STD[0] + MEAN[0]).clamp(0, 1)  # undo data.load_image's normalisation
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).resize((side, side), Image.BICUBIC)


# -----------------------------------------------------------------------------
# attention maps (Figure 4)


ATTENTION_NOTE = "heat: attention over the patches, mean over heads, normalised per panel"  # what heat_map draws


def heat_map(att, side):
    """att (heads, N) weights over the N = grid * grid patches -> (side, side) float array in [0, 1]:
    mean over heads, min-max normalised (the figure shows where, not how much), bilinear upsampling."""
    heads, N = att.shape
    grid = math.isqrt(N)
    if grid * grid != N:
        raise ValueError(f"attention over {N} patches is not a square grid")
    m = att.float().mean(0).reshape(1, 1, grid, grid)  # (1, 1, grid, grid)
    m = (m - m.min()) / (m.max() - m.min()).clamp(min=1e-12)
    m = F.interpolate(m, size=(side, side), mode="bilinear", align_corners=False)
    return m[0, 0].clamp(0, 1).cpu().numpy()


def colorize(m):
    """(H, W) values in [0, 1] -> (H, W, 3) RGB in [0, 1] along the HEAT ramp."""
    stops = [s for s, _ in HEAT]
    return np.stack([np.interp(m, stops, [c[i] for _, c in HEAT]) for i in range(3)], axis=-1)


def overlay(picture, m):
    """Blend the heat map m (side, side) over a PIL picture of the same size, more opaque where m is high."""
    img = np.asarray(picture, dtype=np.float64) / 255
    alpha = (ALPHA[0] + (ALPHA[1] - ALPHA[0]) * m)[..., None]
    out = (1 - alpha) * img + alpha * colorize(m)
    return Image.fromarray((out * 255).round().astype(np.uint8))


def grid_shape(n):
    """(cols, rows) of n panels: at most MAX_COLS a row, rows as evenly filled as possible."""
    rows = math.ceil(n / MAX_COLS)
    return math.ceil(n / rows), rows


@torch.no_grad()
def attention_figure(model, image_path, meta, out_path, img_size=None) -> str:
    """Write the input image and one heat map per attribute, each panel titled, to out_path (PNG).

    Panels of side = panel_side(img_size) in grid_shape(K + 1) (cols, rows); each panel has a LINE-high
    title above it; a caption line under the panels says what the heat is (ATTENTION_NOTE). Size: width
    cols * side + (cols + 1) * PAD, height rows * (LINE + side) + (rows + 1) * PAD + LINE.
    Returns out_path.
    """
    if model.cfg.method not in ("cca", "asen"):
        raise ValueError(f"method {model.cfg.method!r} has no attention_maps to draw: only CCA's block L and TF-ASEN's "
                         "spatial attention depend on the attribute")
    img_size = img_size or model.cfg.img_size
    K = len(meta["attributes"])
    if model.cfg.num_conditions != K:
        raise ValueError(f"the model has {model.cfg.num_conditions} conditions, meta lists {K} attributes {meta['attributes']}")
    image = load_image(image_path, img_size)  # (3, S, S)
    device = model_device(model)
    with evaluating(model):
        att = model.attention_maps(image[None].expand(K, -1, -1, -1).to(device), torch.arange(K, device=device))  # (K, heads, N)
    side = panel_side(img_size)
    picture = to_picture(image, side)
    panels = [("input", picture)] + [(meta["attributes"][k], overlay(picture, heat_map(att[k], side))) for k in range(K)]

    cols, rows = grid_shape(len(panels))
    W, H = cols * side + (cols + 1) * PAD, rows * (LINE + side) + (rows + 1) * PAD
    fig = Image.new("RGB", (W, H + LINE), "white")
    draw = ImageDraw.Draw(fig)
    for i, (title, im) in enumerate(panels):
        x, y = PAD + (i % cols) * (side + PAD), PAD + (i // cols) * (LINE + side + PAD)
        write_text(draw, (x, y), title, side)
        fig.paste(im, (x, y + LINE))
    write_text(draw, (PAD, H - PAD // 2), ATTENTION_NOTE, W - 2 * PAD, fill=GREY, center=False)
    fig.save(out_path)
    return out_path

# -----------------------------------------------------------------------------
# retrieval (Figure A2) and inference on one image


@torch.no_grad()
def retrieve(model, query_path, attr, meta, candidates, cand_feats, topk=5, query_value=None):
    """The topk candidates of attribute `attr` nearest (cosine) to the query image embedded under `attr`.

    candidates: a data.EvalItems (.paths, .attrs, .values); cand_feats (n, d): each candidate embedded
    under its own attribute (evaluate.embed_items). Only candidates with attrs == attr are ranked (the
    protocol of evaluate.mean_average_precision); equal scores keep the candidate list's order.
    Returns [{rank, path, value, value_name, score, correct}], correct None when query_value is None.
    """
    if cand_feats.shape[0] != len(candidates.paths):
        raise ValueError(f"{cand_feats.shape[0]} candidate features for {len(candidates.paths)} candidates")
    idx = (candidates.attrs == attr).nonzero().squeeze(1)  # this attribute's candidates, in list order
    if len(idx) == 0:
        raise ValueError(f"no candidate of attribute {attr} ({meta['attributes'][attr]})")
    device = model_device(model)
    image = load_image(query_path, model.cfg.img_size)
    # under the same autocast as evaluate.embed_items, so that the query and the candidates are embedded alike
    with evaluating(model), autocast(device):
        q = model(image[None].to(device), torch.tensor([attr], device=device))[0].float()  # (d,)
    q = F.normalize(q.double().cpu(), dim=0)
    c = F.normalize(cand_feats[idx].double().cpu(), dim=1)  # (n_attr, d)
    scores = c @ q  # (n_attr,) cosine similarities, in float64 as evaluate.py
    order = torch.sort(scores, descending=True, stable=True).indices[:topk]
    results = []
    for rank, j in enumerate(order.tolist(), 1):
        i, v = int(idx[j]), int(candidates.values[idx[j]])
        results.append(dict(rank=rank, path=candidates.paths[i], value=v, value_name=value_name(meta, attr, v),
                            score=float(scores[j]), correct=None if query_value is None else v == int(query_value)))
    return results


def format_retrieval(results, meta, attr) -> str:
    """The results as a text table: rank, cosine, value name, correct (when known), path."""
    lines = [f"attribute {meta['attributes'][attr]}", f"{'rank':>4} {'cosine':>7}  {'value':<24} {'correct':<7}  path"]
    for r in results:
        ok = "" if r["correct"] is None else ("yes" if r["correct"] else "no")
        lines.append(f"{r['rank']:>4} {r['score']:>7.4f}  {r['value_name']:<24} {ok:<7}  {r['path']}")
    return "\n".join(lines)


def draw_mark(draw, x, y, correct):
    """A check (correct) or a cross (wrong) in a white disc of 20 px whose top-left corner is (x, y)."""
    draw.ellipse([x, y, x + 20, y + 20], fill="white", outline=GREEN if correct else RED, width=2)
    if correct:
        draw.line([(x + 5, y + 10), (x + 9, y + 14), (x + 15, y + 6)], fill=GREEN, width=3)
    else:
        draw.line([(x + 6, y + 6), (x + 14, y + 14)], fill=RED, width=3)
        draw.line([(x + 14, y + 6), (x + 6, y + 14)], fill=RED, width=3)


def retrieval_figure(model, query_path, attr, meta, candidates, cand_feats, out_path, topk=5, query_value=None) -> list:
    """Write the query and its topk results for attribute `attr` to out_path (PNG); return the results
    (see `retrieve`). Results are framed green (same value as the query) or red when query_value is known.

    Title line "attribute = query value", then the query, a gap SEP, and the k = len(results) results,
    each side = panel_side(img_size) px with two caption lines (value name; rank and cosine).
    Size: width PAD + side + SEP + k * (side + PAD), height 3 * PAD + 3 * LINE + side.
    """
    results = retrieve(model, query_path, attr, meta, candidates, cand_feats, topk, query_value)
    S = model.cfg.img_size
    side = panel_side(S)
    k = len(results)
    W, H = PAD + side + SEP + k * (side + PAD), 3 * PAD + 3 * LINE + side
    fig = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(fig)
    attr_name = meta["attributes"][attr]
    wanted = "?" if query_value is None else value_name(meta, attr, int(query_value))
    write_text(draw, (PAD, PAD), f"{attr_name} = {wanted}", W - 2 * PAD)
    y = 2 * PAD + LINE
    fig.paste(to_picture(load_image(query_path, S), side), (PAD, y))
    write_text(draw, (PAD, y + side + 2), "query", side)
    write_text(draw, (PAD, y + side + 2 + LINE), wanted, side)
    for j, r in enumerate(results):
        x = PAD + side + SEP + j * (side + PAD)
        fig.paste(to_picture(load_image(r["path"], S), side), (x, y))
        if r["correct"] is not None:
            colour = GREEN if r["correct"] else RED
            draw.rectangle([x - BORDER, y - BORDER, x + side + BORDER - 1, y + side + BORDER - 1], outline=colour, width=BORDER)
            draw_mark(draw, x + side - 24, y + 4, r["correct"])
        write_text(draw, (x, y + side + 2), r["value_name"], side)
        write_text(draw, (x, y + side + 2 + LINE), f"#{r['rank']}  cos {r['score']:.3f}", side, fill=GREY)
    fig.save(out_path)
    return results


def predict(model, image_path, attr_name, meta, candidates, cand_feats, topk=5, out_path=None) -> list:
    """Inference on any image: its topk nearest candidates under the attribute named attr_name
    (a name of meta["attributes"]). With out_path, also writes the retrieval figure there."""
    names = meta["attributes"]
    if attr_name not in names:
        raise ValueError(f"unknown attribute {attr_name!r}; valid attributes: {', '.join(names)}")
    attr = names.index(attr_name)
    if out_path is not None:
        return retrieval_figure(model, image_path, attr, meta, candidates, cand_feats, out_path, topk)
    return retrieve(model, image_path, attr, meta, candidates, cand_feats, topk)

# -----------------------------------------------------------------------------
# embedding spaces (Figures 5 and 6)


def centroid_accuracy(feats, values):
    """Leave-one-out nearest-centroid accuracy of the L2-normalised feats (n, d) against values (n,):
    each item is assigned the value whose centroid (without the item itself) is nearest. About 1/V for
    features that ignore the value, 1 for values in separate clusters. NaN with fewer than 2 values;
    an item alone in its value has no centroid of its own and counts as wrong."""
    x = F.normalize(feats.double().cpu(), dim=1)  # (n, d)
    classes, inv = torch.unique(values.cpu(), return_inverse=True)
    if len(classes) < 2:
        return float("nan")
    counts = torch.bincount(inv).double()  # (V,)
    sums = torch.zeros(len(classes), x.shape[1], dtype=torch.float64).index_add_(0, inv, x)  # (V, d)
    d2 = torch.cdist(x, sums / counts[:, None]) ** 2  # (n, V)
    own = (sums[inv] - x) / (counts[inv] - 1).clamp(min=1)[:, None]  # (n, d): own value's centroid without the item
    d_own = ((x - own) ** 2).sum(1)
    d2[torch.arange(len(x)), inv] = torch.where(counts[inv] > 1, d_own, torch.full_like(d_own, float("inf")))
    return (d2.argmin(1) == inv).double().mean().item()


def pca2(x):
    """(n, d) -> (n, 2) coordinates along the two principal axes (SVD of the centred data), signs fixed
    so that each axis's largest-magnitude coordinate is positive. Zeros where n < 2 or d < 2."""
    x = x.double().cpu()
    out = torch.zeros(len(x), 2, dtype=torch.float64)
    if len(x) < 2:
        return out
    xc = x - x.mean(0)
    _, _, Vh = torch.linalg.svd(xc, full_matrices=False)  # rows of Vh: principal axes
    p = xc @ Vh[:2].T  # (n, <=2)
    sign = torch.sign(p.gather(0, p.abs().argmax(0, keepdim=True)))  # (1, <=2): each axis's extreme coordinate
    p = p * torch.where(sign == 0, 1.0, sign)
    out[:, : p.shape[1]] = p
    return out


def value_colours(meta, attr, n):
    """(colours, named) of the n values of attribute attr: the colours their names say when every name is one of
    COLOURS (case-insensitive) and no two are the same, named True; else PALETTE's, in order, named False."""
    names = [value_name(meta, attr, j).strip().lower() for j in range(n)]
    if all(name in COLOURS for name in names) and len(set(names)) == n:
        return [COLOURS[name] for name in names], True
    return [PALETTE[j % len(PALETTE)] for j in range(n)], False


def colour_note(attributes, named) -> str:
    """The embedding figure's caption line on its colours: which attributes are drawn in the colours their values
    name (named[a] True) and that the others' colours are arbitrary."""
    if all(named):
        return "dot colours: the colours the values name"
    drawn_as_named = [a for a, n in zip(attributes, named) if n]
    if not drawn_as_named:
        return "dot colours: an arbitrary palette, only to tell the values apart"
    their = "its" if len(drawn_as_named) == 1 else "their"
    quoted = ", ".join(f"'{a}'" for a in drawn_as_named)
    return f"dot colours: {quoted} in the colours {their} values name; the other attributes in an arbitrary palette"


def outline(colour):
    """A grey rim for a colour too light to see on the white figure, else None."""
    return GREY if min(colour) > 200 else None


def embedding_figure(panels, meta, out_path, max_points=2000) -> dict:
    """One row per (title, feats (n, d), attrs (n,), values (n,)) of `panels`, one column per attribute:
    the 2-D PCA of that attribute's items, coloured by value, with the separation score below each plot;
    a legend of value names under each column. An attribute whose values are colour names is drawn in those
    colours, any other in PALETTE's (value_colours), values beyond len(PALETTE) reusing them; a caption line
    says which (colour_note).

    Returns {title: {attribute name: leave-one-out nearest-centroid accuracy in the full embedding
    space}} (see centroid_accuracy), over all of an attribute's items; the plot draws at most
    max_points of them (a fixed random subset). Attributes with no items are drawn empty and left out.
    Size: width LABEL_W + PAD + K * (PLOT + PAD), height 2 * PAD + LINE + rows * (PLOT + LINE + PAD)
    + (V + 2) * LINE, V the largest number of values of an attribute (the legend, then two caption lines).
    """
    names = meta["attributes"]
    K, rows = len(names), len(panels)
    seen = [max([int(v[at == a].max()) + 1 for _, _, at, v in panels if (at == a).any()], default=1) for a in range(K)]
    nvals = [max(len(meta["values"][a]), seen[a]) for a in range(K)]  # Zappos' meta lists no values
    colours, named = zip(*(value_colours(meta, a, nvals[a]) for a in range(K)))
    W = LABEL_W + PAD + K * (PLOT + PAD)
    top = PAD + LINE
    legend_y = top + rows * (PLOT + LINE + PAD)
    fig = Image.new("RGB", (W, legend_y + (max(nvals) + 2) * LINE + PAD), "white")
    draw = ImageDraw.Draw(fig)
    for a in range(K):
        write_text(draw, (LABEL_W + PAD + a * (PLOT + PAD), PAD), names[a], PLOT)
    scores = {}
    g = torch.Generator().manual_seed(0)
    for r, (title, feats, attrs, values) in enumerate(panels):
        if not (feats.shape[0] == attrs.shape[0] == values.shape[0]):
            raise ValueError(f"panel {title!r}: {feats.shape[0]} features, {attrs.shape[0]} attributes, {values.shape[0]} values")
        y0 = top + r * (PLOT + LINE + PAD)
        lines = wrap(draw, title, LABEL_W - PAD)
        for i, line in enumerate(lines):
            write_text(draw, (PAD, y0 + (PLOT - len(lines) * LINE) // 2 + i * LINE), line, LABEL_W - PAD, center=False)
        scores[title] = {}
        for a in range(K):
            x0 = LABEL_W + PAD + a * (PLOT + PAD)
            draw.rectangle([x0, y0, x0 + PLOT - 1, y0 + PLOT - 1], outline=(200, 200, 200))
            sel = (attrs.cpu() == a).nonzero().squeeze(1)
            if len(sel) == 0:
                write_text(draw, (x0, y0 + PLOT // 2), "no items", PLOT, fill=GREY)
                continue
            f, v = feats[sel].cpu(), values[sel].cpu()
            s = centroid_accuracy(f, v)
            scores[title][names[a]] = s
            write_text(draw, (x0, y0 + PLOT + 1), f"NC acc {s:.2f}, chance {1 / nvals[a]:.2f}", PLOT, fill=GREY)
            p = pca2(f)  # (n, 2)
            centre = (p.max(0).values + p.min(0).values) / 2
            half = ((p.max(0).values - p.min(0).values).max() / 2).clamp(min=1e-12)  # one scale for both axes
            xy = (p - centre) / half * (PLOT / 2 - 3 * DOT)  # within the frame
            order = torch.randperm(len(sel), generator=g)[:max_points]  # random drawing order: no value always on top
            for i in order.tolist():
                px, py = x0 + PLOT / 2 + xy[i, 0].item(), y0 + PLOT / 2 - xy[i, 1].item()
                c = colours[a][int(v[i])]
                draw.ellipse([px - DOT, py - DOT, px + DOT, py + DOT], fill=c, outline=outline(c))
    for a in range(K):
        x0 = LABEL_W + PAD + a * (PLOT + PAD)
        for j in range(nvals[a]):
            y = legend_y + j * LINE
            draw.rectangle([x0, y + 4, x0 + 9, y + 13], fill=colours[a][j], outline=outline(colours[a][j]))
            write_text(draw, (x0 + 14, y), value_name(meta, a, j), PLOT - 14, center=False)
    write_text(draw, (PAD, legend_y + max(nvals) * LINE), "NC acc: leave-one-out nearest-centroid accuracy of the value "
               "in the full embedding space; chance: 1 / number of values", W - 2 * PAD, fill=GREY, center=False)
    write_text(draw, (PAD, legend_y + (max(nvals) + 1) * LINE), colour_note(names, named), W - 2 * PAD, fill=GREY, center=False)
    fig.save(out_path)
    return scores


def embeddings_picture(models, items, meta, out_path, device, batch_size=128, workers=2, feats=None) -> dict:
    """The paper's Figure 5 for `models`, one row each titled by its method: the split's queries and candidates
    (items: evaluate.embed_split's {"query", "candidate"} EvalItems) under their own attributes, drawn by
    embedding_figure into out_path. feats: one entry per model, its embed_split features of items when already
    embedded, else None (embedded here). Returns embedding_figure's scores."""
    q, c = items["query"], items["candidate"]
    attrs, values = torch.cat([q.attrs, c.attrs]), torch.cat([q.values, c.values])
    panels = []
    for m, f in zip(models, feats or [None] * len(models)):
        f = f or {role: embed_items(m, s, device, batch_size, workers) for role, s in items.items()}
        panels.append((method_title(m.cfg), torch.cat([f["query"], f["candidate"]]).cpu(), attrs, values))
    return embedding_figure(panels, meta, out_path)


def format_separation(scores) -> str:
    """embedding_figure's scores as text: one line per row of the figure."""
    return "\n".join(f"{title:<16s} nearest-centroid accuracy: " + ", ".join(f"{a} {s:.2f}" for a, s in per_attr.items())
                     for title, per_attr in scores.items())

# -----------------------------------------------------------------------------
# search results (search.py query)


def search_figure(query_path, results, attrs, weights, img_size, out_path, query_values=None) -> str:
    """Write a query image and its search results (search.query's dicts) to out_path (PNG); return out_path.

    Title line: the weighted attributes. Under each image one line per attribute: the item's value name, green
    when it is the query's value, red when not, black when either is unknown; then rank and score. A result
    whose values are all known is framed green when all agree with the query's, red otherwise.
    Size: width PAD + side + SEP + k * (side + PAD), height 3 * PAD + (A + 2) * LINE + side, A = len(attrs).
    """
    query_values = query_values or {}
    weights = weights or [1.0] * len(attrs)
    side = panel_side(img_size)
    k, A = len(results), len(attrs)
    W, H = PAD + side + SEP + max(k, 1) * (side + PAD), 3 * PAD + (A + 2) * LINE + side
    fig = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(fig)
    title = " + ".join(a if w == 1 else f"{w:g} x {a}" for a, w in zip(attrs, weights))
    write_text(draw, (PAD, PAD), f"similar by {title}", W - 2 * PAD)
    y = 2 * PAD + LINE
    fig.paste(to_picture(load_image(query_path, img_size), side), (PAD, y))
    write_text(draw, (PAD, y + side + 2), "query", side)
    for j, a in enumerate(attrs):
        write_text(draw, (PAD, y + side + 2 + (j + 1) * LINE), query_values.get(a) or "", side)
    for i, r in enumerate(results):
        x = PAD + side + SEP + i * (side + PAD)
        fig.paste(to_picture(load_image(r["path"], img_size), side), (x, y))
        agree = [None if query_values.get(a) is None or r["values"][a] is None else query_values[a] == r["values"][a]
                 for a in attrs]
        if None not in agree:
            draw.rectangle([x - BORDER, y - BORDER, x + side + BORDER - 1, y + side + BORDER - 1],
                           outline=GREEN if all(agree) else RED, width=BORDER)
        for j, (a, ok) in enumerate(zip(attrs, agree)):
            write_text(draw, (x, y + side + 2 + j * LINE), r["values"][a] or "?", side,
                       fill=TEXT if ok is None else GREEN if ok else RED)
        write_text(draw, (x, y + side + 2 + A * LINE), f"#{r['rank']}  score {r['score']:.3f}", side, fill=GREY)
    fig.save(out_path)
    return out_path

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # checkpoint and data
    p.add_argument("--ckpt", required=True, help="a best.pt or last.pt written by train.py")
    p.add_argument("--split", default="test", choices=("valid", "test"),
                   help="the split whose candidates --retrieve searches and whose items --embeddings projects")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--eval-missing", default="error", choices=EVAL_MISSING,
                   help="a listed image of the split that is missing: error (default), or drop: draw without it")
    # pictures
    p.add_argument("--out", default=None, help="folder for the pictures (default: figures/ beside the checkpoint)")
    p.add_argument("--attention", nargs="+", default=[], metavar="IMG", help="attention of every attribute over these images (paper Fig. 4)")
    p.add_argument("--retrieve", default=None, metavar="IMG", help="an image (any file) to retrieve for, among the split's candidates")
    p.add_argument("--attr", default=None, help="the attribute name for --retrieve")
    p.add_argument("--topk", type=number(int, 1), default=5, help="results shown by --retrieve")
    p.add_argument("--embeddings", action="store_true", help="2-D projections of the split's embeddings per attribute (paper Fig. 5)")
    p.add_argument("--compare", nargs="*", default=[], metavar="CKPT", help="more checkpoints drawn beside this one by --embeddings")
    # system
    p.add_argument("--batch-size", type=number(int, 1), default=128, help="images per batch when embedding the split")
    p.add_argument("--workers", type=number(int, 0), default=2, help="data-loading processes")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    if args.retrieve and not args.attr:
        p.error("--retrieve needs --attr NAME")
    if args.attr and not args.retrieve:
        p.error("--attr names the attribute for --retrieve: add --retrieve IMG")
    if args.topk < 1:
        p.error(f"--topk must be at least 1, got {args.topk}")
    if args.compare and not args.embeddings:
        p.error("--compare draws beside --embeddings: add --embeddings")
    if not (args.attention or args.retrieve or args.embeddings):
        p.error("nothing to draw: add --attention IMG ..., --retrieve IMG --attr NAME or --embeddings (scores: evaluate.py)")
    for path in args.attention + ([args.retrieve] if args.retrieve else []):  # before any long work
        if not os.path.isfile(path):
            raise SystemExit(f"error: image not found: {path}")
    model, ckpt, root, device = open_split(args)
    meta = ckpt["meta"]
    if meta["format"] != "asen" and (args.retrieve or args.embeddings):
        raise SystemExit("error: --retrieve and --embeddings need value labels, which zappos's triplet lists do not have")
    if args.retrieve and args.attr not in meta["attributes"]:
        raise SystemExit(f"error: unknown attribute {args.attr!r}; valid attributes: {', '.join(meta['attributes'])}")
    try:
        return draw(args, model, meta, root, device)
    except (OSError, ValueError) as e:  # a missing or corrupt image, a --compare checkpoint that does not load: say which
        raise SystemExit(f"error: {error_message(e)}")


def draw(args, model, meta, root, device) -> dict:
    """The pictures main's flags ask for, into --out; returns what they computed: {"attention": [PNG paths],
    "retrieval": retrieve's results, "embeddings": embedding_figure's scores}, the keys of the pictures drawn."""
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "figures")
    output_folder(out, "--out folder")
    stem = lambda path: os.path.splitext(os.path.basename(path))[0]  # noqa: E731
    others = []
    for path in args.compare:  # before any long work: each must embed the same attributes of the same split
        other, ckpt = load_checkpoint(path, device)
        if ckpt["meta"]["attributes"] != meta["attributes"] or other.cfg.img_size != model.cfg.img_size:
            raise ValueError(f"{path}: trained on {ckpt['meta']['name']} with attributes {ckpt['meta']['attributes']} at "
                             f"{other.cfg.img_size} px; {args.ckpt} on {meta['name']} with {meta['attributes']} at "
                             f"{model.cfg.img_size} px: --compare needs checkpoints of the same data and size")
        others.append(other)
    drawn = {}
    if args.attention:
        drawn["attention"] = [attention_figure(model, img, meta, os.path.join(out, f"attention_{stem(img)}.png")) for img in args.attention]
        for path in drawn["attention"]:
            print("wrote", path)
    if not (args.retrieve or args.embeddings):
        return drawn
    # the split's features, embedded once for both pictures
    items, feats = embed_split(model, meta, root, args.split, model.cfg.img_size, device, args.batch_size, args.workers,
                               missing=args.eval_missing)
    if args.retrieve:
        attr = meta["attributes"].index(args.attr)
        # if the image is one of the split's labelled items for this attribute, mark the results right or wrong
        known = {os.path.abspath(p): int(v) for s in items.values() for p, a, v in zip(s.paths, s.attrs, s.values) if a == attr}
        path = os.path.join(out, f"retrieval_{stem(args.retrieve)}_{args.attr}.png")
        drawn["retrieval"] = retrieval_figure(model, args.retrieve, attr, meta, items["candidate"], feats["candidate"], path,
                                              args.topk, known.get(os.path.abspath(args.retrieve)))
        print(format_retrieval(drawn["retrieval"], meta, attr))
        print("wrote", path)
    if args.embeddings:
        path = os.path.join(out, "embeddings.png")
        drawn["embeddings"] = embeddings_picture([model] + others, items, meta, path, device, args.batch_size, args.workers,
                                                [feats] + [None] * len(others))
        print(format_separation(drawn["embeddings"]))
        print("wrote", path)
    return drawn


if __name__ == "__main__":
    main()
