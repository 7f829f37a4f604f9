"""
The drawn image sets, which need no download: the synthetic garments (5 independent attributes, written in
ASEN's file format, so that training and evaluation read them as they read FashionAI) and the shapes (24
classes of geometric figures, held in memory, that `python compare.py pretrain` pretrains a trunk on).

    python dataset_tools.py synth --out data/synthetic        # the synthetic set (20-40 s on 2 cores)
    python train.py                                           # draws it on first use into data/synthetic

    from synthetic import make_shapes
    images, labels = make_shapes(2400, img_size=32)           # uint8 (n, 3, S, S), long (n,)
"""
import colorsys
import json
import os
import time
from contextlib import suppress

import numpy as np
import torch
from PIL import Image, ImageDraw

from runtime import worker_pool

# -----------------------------------------------------------------------------
# the synthetic dataset: garment-like figures with 5 independent attributes

SYNTH_ATTRIBUTES = {
    "sleeve_length": ["Sleeveless", "Short Sleeves", "Elbow Sleeves", "Long Sleeves"],  # a region: the arms
    "length": ["Cropped", "Hip Length", "Knee Length", "Ankle Length"],  # a region: where the hem ends
    "neckline": ["Round Neck", "V Neck", "Square Neck", "Turtle Neck"],  # a region: the top centre
    "colour": ["Red", "Yellow", "Green", "Cyan", "Blue", "Magenta"],  # global
    "pattern": ["Plain", "Stripes", "Dots", "Checks"],  # global
}
# Written into meta.json; raised whenever the drawing changes, so that a set drawn by an older synthetic.py is refused
# rather than silently trained on (what changed in each version: docs/LOG.md).
SYNTH_VERSION = 2
# Geometry in units of a 64-px frame. Every value differs from its neighbours by a large area of pixels, not by a
# detail: a small network trained from scratch for minutes must see them (tuned with a proxy of the demo model).
SLEEVE = [0, 8, 15, 24]  # sleeve length from the armhole
HEM = [18, 26, 35, 45]  # hem height below the shoulder line
HUE = [0, 60, 120, 180, 240, 300]  # degrees: as far apart as six hues can be
# Nuisances: enough that no attribute can be read off a fixed pixel, little enough to learn in minutes.
SCALE_JITTER = 0.08  # garment size x U(1 - j, 1 + j)
SHIFT_JITTER = 2.0  # garment position, units
BACKGROUND = (0.4, 0.85)  # grey level range of the background
NOISE_STD = 4.0  # pixel noise, of 255


def on_background(figure, mask, rng, size):
    """The (W, W) `figure` pasted through `mask` onto a random background (a low-saturation tone with a gentle
    gradient, drawn small and stretched: it is linear), downsampled to `size` with LANCZOS, plus pixel noise."""
    W = figure.size[0]
    g = rng.uniform(*BACKGROUND) + rng.uniform(-0.03, 0.03, size=3)
    gx, gy = rng.uniform(-0.08, 0.08, size=2)
    ramp = np.linspace(-0.5, 0.5, 8)
    bg = g + gx * ramp[None, :, None] + gy * ramp[:, None, None]  # (8, 8, 3)
    bg = Image.fromarray((bg.clip(0, 1) * 255).round().astype(np.uint8)).resize((W, W), Image.BILINEAR)
    img = Image.composite(figure, bg, mask).resize((size, size), Image.LANCZOS)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, NOISE_STD, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(noisy.clip(0, 255).round().astype(np.uint8))


def draw_garment(values, rng, size=64, zoom=4):
    """One figure as a PIL image, drawn zoom times larger and downsampled with LANCZOS for anti-aliasing.
    values: one index per SYNTH_ATTRIBUTES entry."""
    sleeve, length, neck, colour, pattern = values
    W = size * zoom
    s = rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER)
    cx, top = 32 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER), 10.5 + rng.uniform(-SHIFT_JITTER, SHIFT_JITTER)
    P = lambda x, y: ((cx + x * s) * W / 64, (top + y * s) * W / 64)  # design units -> canvas pixels

    mask = Image.new("L", (W, W), 0)
    d = ImageDraw.Draw(mask)
    hem = HEM[length]
    flare = 11 + 0.08 * hem  # a slight A-line so the long garments look like dresses
    d.polygon([P(-11, 0), P(11, 0), P(flare, hem), P(-flare, hem)], fill=255)
    if SLEEVE[sleeve] > 0:
        sn, cs = np.sin(np.radians(28)), np.cos(np.radians(28))  # sleeves hang 28 degrees out from vertical
        for side in (-1, 1):
            ax, ay, L, h = side * 9.5, 4.5, SLEEVE[sleeve] + 1.5, 4.5  # sleeve axis from the armhole, half width h
            dx, dy, px, py = side * sn, cs, side * cs, -sn  # along the sleeve, across it
            d.polygon([P(ax + px * h, ay + py * h), P(ax + dx * L + px * h, ay + dy * L + py * h),
                       P(ax + dx * L - px * h, ay + dy * L - py * h), P(ax - px * h, ay - py * h)], fill=255)
    # necklines differ in width and depth as well as in shape, each by a large area at 32 px
    if neck == 0:  # round: a small half disc cut from the top edge
        d.ellipse([P(-5, -5), P(5, 5)], fill=0)
    elif neck == 1:  # V: wide and very deep
        d.polygon([P(-9, -1), P(9, -1), P(0, 16)], fill=0)
    elif neck == 2:  # square: wide, almost to the shoulders, and deep
        d.rectangle([P(-10, -1), P(10, 12)], fill=0)
    else:  # turtle: no opening, a tall collar standing well above the shoulders
        d.rectangle([P(-6.5, -10), P(6.5, 0.5)], fill=255)

    # pattern, in units relative to the garment so it moves and scales with it, with a random phase; coarse, so
    # that it shows at 64 px. Broadcasting a row of u against a column of v keeps this to one (W, W) array.
    axis = np.arange(W, dtype=np.float32) * (64 / W)
    u = ((axis - cx) / s + rng.uniform(0, 8))[None, :]  # (1, W)
    v = ((axis - top) / s + rng.uniform(0, 8))[:, None]  # (W, 1)
    if pattern == 1:  # vertical stripes, 4 units thick (horizontal ones would line up with the hem and sleeve ends)
        on = np.broadcast_to((u % 8) < 4, (W, W))
    elif pattern == 2:  # dots on a staggered 8-unit grid
        du, dv = (u + 4 * (np.floor(v / 8) % 2)) % 8 - 4, v % 8 - 4
        on = du * du + dv * dv < 2.0 ** 2
    elif pattern == 3:  # checks of 8-unit squares
        on = (np.floor(u / 8) + np.floor(v / 8)) % 2 == 0
    else:
        on = np.zeros((W, W), dtype=bool)
    hue = (HUE[colour] + rng.uniform(-6, 6)) / 360 % 1
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 0.9), rng.uniform(0.75, 0.95))
    garment = Image.new("RGB", (W, W), tuple(round(255 * c) for c in rgb))
    # the pattern in a dark shade of the same hue, so the colour stays readable
    garment.paste(tuple(round(255 * 0.3 * c) for c in rgb), mask=Image.fromarray(on.astype(np.uint8) * 255))

    return on_background(garment, mask, rng, size)


def _synth_one(job):
    path, values, seed, split_id, index, size = job
    rng = np.random.default_rng([seed, split_id, index])  # per image: the same pixels with any number of workers
    draw_garment(values, rng, size).save(path, quality=90)


def make_synthetic(out, num_train=6000, num_query=400, num_candidate=1600, seed=0, size=64, workers=2):
    """Write the synthetic set in the ASEN format: images/, filenames_*, label_train, query_/candidate_{valid,test},
    meta.json (last, so its presence marks a finished set). Deterministic in seed."""
    t0 = time.time()
    with suppress(FileNotFoundError):  # a set being replaced stops being one until the new meta.json is written
        os.remove(os.path.join(out, "meta.json"))
    rng = np.random.default_rng(seed)  # labels and splits; the pixels come from per-image generators
    attrs, nvals = list(SYNTH_ATTRIBUTES), [len(v) for v in SYNTH_ATTRIBUTES.values()]
    jobs = []
    for split_id, (split, n) in enumerate([("train", num_train), ("valid", num_query + num_candidate),
                                           ("test", num_query + num_candidate)]):
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        values = np.stack([rng.integers(k, size=n) for k in nvals], 1)  # (n, A): independent, uniform
        names = [f"images/{split}/{i:05d}.jpg" for i in range(n)]
        jobs += [(os.path.join(out, f), tuple(int(x) for x in values[i]), seed, split_id, i, size)
                 for i, f in enumerate(names)]
        with open(os.path.join(out, f"filenames_{split}.txt"), "w") as f:
            f.writelines(p + "\n" for p in names)
        if split == "train":  # every attribute of every image
            with open(os.path.join(out, "label_train.txt"), "w") as f:
                f.writelines(f"{i} " + " ".join(f"{a} {v}" for a, v in enumerate(values[i])) + "\n" for i in range(n))
            continue
        # Evaluation: each image listed once, under one attribute; attributes dealt round-robin over a shuffled
        # order, so every attribute has the same share of queries and of candidates.
        order = rng.permutation(n)
        for role, ks in (("query", range(num_query)), ("candidate", range(num_query, n))):
            rows = sorted((int(order[k]), k % len(attrs)) for k in ks)
            with open(os.path.join(out, f"{role}_{split}.txt"), "w") as f:
                f.writelines(f"{i} {a} {values[i, a]}\n" for i, a in rows)
    if workers > 1:
        with worker_pool(workers) as pool:
            for _ in pool.imap_unordered(_synth_one, jobs, chunksize=64):
                pass
    else:
        for job in jobs:
            _synth_one(job)
    meta = {"ATTRIBUTES": attrs, "ATTRIBUTES_NUM": dict(zip(attrs, nvals)), "ATTRIBUTES_VALUES": SYNTH_ATTRIBUTES,
            "SYNTHETIC_VERSION": SYNTH_VERSION}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"synthetic: {len(jobs)} images of {size}x{size} px in {out} ({time.time() - t0:.1f} s)")

# -----------------------------------------------------------------------------
# the shapes set: another image family with its own classes, to pretrain a trunk on (compare.py pretrain)

# Single geometric figures, one class per (shape, fill): none is a garment and no class is one of the synthetic
# set's attributes (colour is random here and no class depends on it). Drawn like the garments (zoomed canvas,
# LANCZOS down, a grey gradient background, pixel noise), so that a trunk pretrained on them has seen images of
# the same statistics, as an ImageNet trunk has seen photographs.
SHAPES = ("disc", "triangle", "square", "star", "cross", "crescent", "half disc", "bar")
FILLS = ("solid", "outline", "hatched")
SHAPE_CLASSES = [f"{fill} {shape}" for shape in SHAPES for fill in FILLS]  # class k = (SHAPES[k // 3], FILLS[k % 3])


def shape_outline(shape, cx, cy, r, turn):
    """The figure as a polygon: (x, y) points of a shape of radius r about (cx, cy), rotated by `turn` radians."""
    if shape == "disc":
        pts = [(np.cos(t), np.sin(t)) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    elif shape == "triangle":
        pts = [(np.cos(t), np.sin(t)) for t in np.pi / 2 + np.arange(3) * 2 * np.pi / 3]
    elif shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif shape == "star":  # five points, inner radius 0.45
        pts = [((1 if i % 2 == 0 else 0.45) * np.cos(t), (1 if i % 2 == 0 else 0.45) * np.sin(t))
               for i, t in enumerate(np.pi / 2 + np.arange(10) * np.pi / 5)]
    elif shape == "cross":  # a plus sign with arms 0.6 wide
        a, b = 1.0, 0.3
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    elif shape == "crescent":  # the unit circle less a circle shifted right: outer arc, then inner arc back
        outer = [(np.cos(t), np.sin(t)) for t in np.linspace(0.35 * np.pi, 1.65 * np.pi, 32)]
        inner = [(0.55 + 0.8 * np.cos(t), 0.8 * np.sin(t)) for t in np.linspace(1.55 * np.pi, 0.45 * np.pi, 24)]
        pts = outer + inner
    elif shape == "half disc":
        pts = [(np.cos(t), np.sin(t) + 0.4) for t in np.linspace(np.pi, 2 * np.pi, 32)]
    else:  # bar: a long thin rectangle
        pts = [(-1, -0.25), (1, -0.25), (1, 0.25), (-1, 0.25)]
    c, s = np.cos(turn), np.sin(turn)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(label, rng, size=64, zoom=4):
    """One figure of class `label` (an index of SHAPE_CLASSES) as a PIL image: random colour, size, place, turn."""
    shape, fill = SHAPES[label // len(FILLS)], FILLS[label % len(FILLS)]
    W = size * zoom
    r = rng.uniform(14, 22) * W / 64
    cx, cy = (rng.uniform(22, 42, size=2) * W / 64)
    turn = rng.uniform(0, 2 * np.pi)
    mask = Image.new("L", (W, W), 0)
    d = ImageDraw.Draw(mask)
    d.polygon(shape_outline(shape, cx, cy, r, turn), fill=255)
    if fill == "outline":  # the same figure at 55% cut out of its middle (a bar keeps a frame; the crescent, a rim)
        d.polygon(shape_outline(shape, cx, cy, 0.55 * r, turn), fill=0)
    rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 0.9), rng.uniform(0.6, 0.95))
    figure = Image.new("RGB", (W, W), tuple(round(255 * c) for c in rgb))
    if fill == "hatched":  # diagonal lines in a dark shade of the colour, across the figure's own axis
        axis = np.arange(W, dtype=np.float32) * (64 / W)
        u = (axis[None, :] * np.cos(turn + np.pi / 4) + axis[:, None] * np.sin(turn + np.pi / 4) + rng.uniform(0, 6)) % 6
        figure.paste(tuple(round(255 * 0.3 * c) for c in rgb), mask=Image.fromarray((u < 2.5).astype(np.uint8) * 255))
    return on_background(figure, mask, rng, size)  # the garments' background and noise


def _shape_one(job):
    label, seed, index, img_size = job
    img = draw_shape(label, np.random.default_rng([seed, index]))
    if img_size != img.size[0]:  # as read_image brings the synthetic set's 64-px images to the training size
        img = img.resize((img_size, img_size), Image.BILINEAR)
    return np.asarray(img)


def make_shapes(num_images, img_size=32, seed=0, workers=2):
    """(images uint8 (n, 3, S, S), labels long (n,)): the shapes set in memory, classes balanced, deterministic in
    seed whatever the number of workers. Drawn at 64 px and resized to S as the synthetic set is."""
    labels = np.random.default_rng(seed).permutation(np.arange(num_images) % len(SHAPE_CLASSES))
    jobs = [(int(k), seed, i, img_size) for i, k in enumerate(labels)]
    if workers > 1:
        with worker_pool(workers) as pool:
            images = pool.map(_shape_one, jobs, chunksize=64)
    else:
        images = [_shape_one(job) for job in jobs]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()

