"""
Evaluation: the paper's metrics on a checkpoint, rebuilt from the checkpoint alone.

    python evaluate.py --ckpt runs/synthetic/best.pt                 # mAP table of the test split
    python evaluate.py --ckpt best.pt --split valid --data-root /data/fashionai --json results.json

Pictures of a checkpoint (attention maps, retrieval, embedding spaces) are visualize.py's command:

    python visualize.py --ckpt runs/synthetic/best.pt --attention data/synthetic/images/test/00000.jpg

ASEN data (FashionAI, DARN, DeepFashion, synthetic): mAP per attribute, the query-weighted total
(ASEN's "Total MeanAP", the number the paper's tables report) and the plain mean over attributes.
Zappos50K: triplet prediction accuracy, overall and per condition. `mean_average_precision` and
`triplet_accuracy` below are importable and serve train.py's validation too.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import numpy as np

from cca import load_checkpoint
from data import (EVAL_MISSING, EvalItems, ZapposEvalSet, check_eval_images, describe_images, identify, looks_like, normalise,
                  prepare_dataset, read_items)
from runtime import autocast, default_device, device_arg, error_message, evaluating, number, output_file

# -----------------------------------------------------------------------------
# Metrics (ASEN's attribute-specific mAP; CSN's triplet accuracy on Zappos50K).
# Pure torch, no I/O: they take embeddings and labels and return plain dicts of Python numbers.
#
# Both metrics use cosine similarity. The features are L2-normalised here (F.normalize), so raw
# and already-normalised embeddings give the same numbers; a zero vector has similarity 0 with
# everything. Similarities are computed in float64: the ranking then depends neither on the device
# nor on TF32 / float32-matmul-precision settings, which would otherwise reorder near neighbours
# (the cost is small: one attribute's candidates at a time).


def average_precision(scores: Tensor, relevant: Tensor) -> Tensor:
    """AP of each row of `scores` (..., C) against the boolean `relevant` (..., C); returns (...,) float64.

    The C items are ranked by score, descending; equal scores keep their order along the last
    dimension (stable sort). AP = mean over the relevant ranks r of (hits within the top r) / r,
    over the full ranking; a row with no relevant item has AP 0.
    """
    C = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # (..., C)
    hits = relevant.bool().gather(-1, order)                                  # (..., C) in rank order
    hits_so_far = hits.cumsum(-1)                                             # (..., C) integer counts
    ranks = torch.arange(1, C + 1, device=scores.device, dtype=torch.float64)
    precision = hits_so_far.double() / ranks                                  # precision at each rank
    num_relevant = hits.sum(-1)                                               # (...,)
    # A row with no relevant item has a zero numerator, so clamping the denominator gives AP 0.
    return (precision * hits).sum(-1) / num_relevant.clamp(min=1)


@torch.no_grad()
def mean_average_precision(query_feats, query_attrs, query_values, cand_feats, cand_attrs, cand_values,
                           chunk_size=1024) -> dict:
    """ASEN's attribute-specific retrieval mAP, as the paper's tables report it.

    query_feats (Q, d), cand_feats (C, d): each image embedded under its own attribute (float, any
    scale: they are L2-normalised here, so the similarity is the cosine). *_attrs, *_values (Q,) / (C,)
    long. Runs on the tensors' device; per attribute, in chunks of `chunk_size` queries, so memory
    stays at about chunk_size x (that attribute's candidates).

    - Each query is compared only with the candidates of its own attribute, ranked by cosine
      similarity, descending. Ties: equal similarities keep the candidates' order in the candidate
      list (stable sort).
    - Relevant = same value. AP over the full ranking = mean over the relevant ranks r of
      (relevant candidates within the top r) / r. A query with no relevant candidate (or no
      candidate at all) has AP 0 and still counts.
    - per_attribute[a] = mean AP over the queries of attribute a.
    - total = mean AP over ALL queries (query-weighted; ASEN's "Total MeanAP", the number the paper
      reports). mean_over_attributes = plain mean of the per-attribute numbers; the two differ
      when attributes have different numbers of queries.

    Returns {"per_attribute": {a: mAP}, "per_attribute_queries": {a: count}, "total": float,
    "mean_over_attributes": float, "num_queries": int}, attributes in increasing order; an attribute
    with no query is absent. mAPs are fractions in [0, 1].
    """
    Q, C = query_feats.shape[0], cand_feats.shape[0]
    if query_feats.dim() != 2 or cand_feats.dim() != 2 or query_feats.shape[1] != cand_feats.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d: queries {tuple(query_feats.shape)}, "
                         f"candidates {tuple(cand_feats.shape)}")
    if query_attrs.shape != (Q,) or query_values.shape != (Q,):
        raise ValueError(f"query attrs {tuple(query_attrs.shape)} and values {tuple(query_values.shape)} "
                         f"must be ({Q},), one per query feature")
    if cand_attrs.shape != (C,) or cand_values.shape != (C,):
        raise ValueError(f"candidate attrs {tuple(cand_attrs.shape)} and values {tuple(cand_values.shape)} "
                         f"must be ({C},), one per candidate feature")
    if Q == 0:
        raise ValueError("no queries: mAP is undefined")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    q = F.normalize(query_feats.double(), dim=1)  # (Q, d)
    c = F.normalize(cand_feats.double(), dim=1)   # (C, d)
    ap_sum, counts = {}, {}
    for a in torch.unique(query_attrs).tolist():
        q_idx = (query_attrs == a).nonzero().squeeze(1)  # this attribute's queries
        c_idx = (cand_attrs == a).nonzero().squeeze(1)   # this attribute's candidates, in list order
        c_a, c_val = c[c_idx], cand_values[c_idx]        # (C_a, d), (C_a,)
        total = torch.zeros((), dtype=torch.float64, device=q.device)
        for start in range(0, len(q_idx), chunk_size):
            idx = q_idx[start:start + chunk_size]
            scores = q[idx] @ c_a.T                                   # (chunk, C_a) cosine similarities
            relevant = query_values[idx, None] == c_val[None, :]      # (chunk, C_a)
            total += average_precision(scores, relevant).sum()
        ap_sum[a], counts[a] = total.item(), len(q_idx)

    per_attribute = {a: ap_sum[a] / counts[a] for a in ap_sum}
    return {
        "per_attribute": per_attribute,
        "per_attribute_queries": counts,
        "total": sum(ap_sum.values()) / Q,
        "mean_over_attributes": sum(per_attribute.values()) / len(per_attribute),
        "num_queries": Q,
    }


@torch.no_grad()
def triplet_accuracy(anchor, far, close, conditions, num_conditions=None) -> dict:
    """CSN's triplet prediction accuracy on Zappos50K.

    anchor, far, close (T, d) float embeddings, each triplet embedded under its condition;
    conditions (T,) long. A triplet (a, far, close) is correct iff cos(a, close) > cos(a, far),
    strictly: a tie counts as wrong. Note the order of the split files' lines: `a far close`.
    If num_conditions is given, every condition must lie in [0, num_conditions).

    Returns {"per_condition": {c: accuracy}, "per_condition_triplets": {c: count}, "total": float
    (over all triplets), "num_triplets": int}, conditions in increasing order; a condition with no
    triplet is absent. Accuracies are fractions in [0, 1].
    """
    T = anchor.shape[0]
    if anchor.dim() != 2 or far.shape != anchor.shape or close.shape != anchor.shape:
        raise ValueError(f"anchor, far, close must be (T, d) of one shape: {tuple(anchor.shape)}, "
                         f"{tuple(far.shape)}, {tuple(close.shape)}")
    if conditions.shape != (T,):
        raise ValueError(f"conditions {tuple(conditions.shape)} must be ({T},), one per triplet")
    if T == 0:
        raise ValueError("no triplets: accuracy is undefined")
    if num_conditions is not None and (conditions.min() < 0 or conditions.max() >= num_conditions):
        raise ValueError(f"conditions must lie in [0, {num_conditions}), "
                         f"got [{conditions.min().item()}, {conditions.max().item()}]")

    correct = torch.empty(T, dtype=torch.bool, device=anchor.device)
    step = 16384  # float64 copies of three (step, d) blocks at a time, not of all 160,000 test triplets
    for s in range(0, T, step):
        a = F.normalize(anchor[s:s + step].double(), dim=1)   # (t, d)
        f = F.normalize(far[s:s + step].double(), dim=1)
        c = F.normalize(close[s:s + step].double(), dim=1)
        correct[s:s + step] = (a * c).sum(1) > (a * f).sum(1)  # strict: ties are wrong

    per_condition, per_count = {}, {}
    for k in torch.unique(conditions).tolist():
        mask = conditions == k
        per_count[k] = int(mask.sum().item())
        per_condition[k] = correct[mask].sum().item() / per_count[k]
    return {
        "per_condition": per_condition,
        "per_condition_triplets": per_count,
        "total": correct.sum().item() / T,
        "num_triplets": T,
    }

def chance_ap(queries, candidates):
    """Expected AP of a random ranking per query (rows (fid, attr, value)). With N candidates of the query's
    attribute and R relevant, E[AP] = ((R-1)/(N-1) * (N - H_N) + H_N) / N, H_N the N-th harmonic number;
    about R/N. A query with R = 0 has AP 0, as in ASEN's evaluation."""
    ap = np.zeros(len(queries))
    for i, (_, a, v) in enumerate(queries):
        same_attr = candidates[:, 1] == a
        N, R = int(same_attr.sum()), int((same_attr & (candidates[:, 2] == v)).sum())
        if R > 0:
            H = float(np.sum(1.0 / np.arange(1, N + 1)))
            ap[i] = ((R - 1) / max(N - 1, 1) * (N - H) + H) / N
    return ap


def chance_map(name, root, split, missing="error"):
    """The split's chance level: query-weighted mAP of a random ranking on an ASEN split (about 0.155
    for FashionAI); for zappos, scored by triplet accuracy, a coin flip: 0.5. missing="drop": the level
    of the items whose images are there, those --eval-missing drop scores."""
    if name == "zappos":
        return 0.5
    rows = []
    for role in ("query", "candidate"):
        paths, r = read_items(name, root, split, role)
        rows.append(r[np.array([os.path.isfile(p) for p in paths], dtype=bool)] if missing == "drop" else r)
    return float(chance_ap(*rows).mean())


# ----------------------------------------------------------------------------- end of metrics


# -----------------------------------------------------------------------------
# embedding a split and scoring it; train.py's validation uses the same code


def shard(n, rank, world_size):
    """This rank's indices of n items: every world_size-th, so shards differ in length by at most one."""
    return list(range(rank, n, world_size))


def gather_by_index(feats, idx, n):
    """Put each rank's (n_r, d) features back in item order: all-gather padded shards with their
    indices, drop the padding, scatter by index. Every item lands exactly once."""
    if not (dist.is_available() and dist.is_initialized()):
        out = torch.empty(n, feats.shape[1], dtype=feats.dtype, device=feats.device)
        out[idx] = feats
        return out
    world = dist.get_world_size()
    size = torch.tensor([len(idx)], device=feats.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    m = int(max(s.item() for s in sizes))
    pad_f = torch.zeros(m, feats.shape[1], dtype=feats.dtype, device=feats.device)
    pad_i = torch.full((m,), -1, dtype=torch.long, device=feats.device)
    pad_f[: len(idx)], pad_i[: len(idx)] = feats, idx
    all_f = [torch.empty_like(pad_f) for _ in range(world)]
    all_i = [torch.empty_like(pad_i) for _ in range(world)]
    dist.all_gather(all_f, pad_f)
    dist.all_gather(all_i, pad_i)
    all_f, all_i = torch.cat(all_f), torch.cat(all_i)
    keep = all_i >= 0
    out = torch.empty(n, feats.shape[1], dtype=feats.dtype, device=feats.device)
    out[all_i[keep]] = all_f[keep]
    return out


@torch.no_grad()
def embed_items(model, dataset, device, batch_size=128, workers=2, rank=0, world_size=1):
    """Embed every (uint8 image, condition, ..., index) item of `dataset` under its own condition, the images
    normalised on the device; each rank embeds its shard and the features are gathered: (len(dataset), out_dim)
    on every rank."""
    idx = shard(len(dataset), rank, world_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    feats, index = [], []
    with evaluating(model):
        for batch in loader:
            images, conditions, i = batch[0], batch[1], batch[-1]
            with autocast(device):
                f = model(normalise(images.to(device, non_blocking=True)), conditions.to(device, non_blocking=True))
            feats.append(f.float())
            index.append(i.to(device))
    out_dim = model.cfg.out_dim
    feats = torch.cat(feats) if feats else torch.empty(0, out_dim, device=device)
    index = torch.cat(index) if index else torch.empty(0, dtype=torch.long, device=device)
    return gather_by_index(feats, index, len(dataset))


def evaluate_split(model, meta, root, split, img_size, device, batch_size=128, workers=2, rank=0, world_size=1, missing="error"):
    """Score `model` on a split ("valid" or "test"): mAP (ASEN data) or triplet accuracy (Zappos).
    Every rank embeds its shard and the features are gathered; the metric is computed once, on rank 0,
    and the other ranks get None. missing="drop" scores without the items of missing images and marks the result."""
    if meta["format"] == "zappos":
        items = ZapposEvalSet(root, split, img_size, missing=missing)
        f = embed_items(model, items, device, batch_size, workers, rank, world_size)
        t = items.triplets.to(device)
        if rank != 0:
            return None
        result = triplet_accuracy(Rows(f, t[:, 0]), Rows(f, t[:, 1]), Rows(f, t[:, 2]), items.conditions.to(device),
                                  len(meta["attributes"]))
        return mark_incomplete(result, {"triplets": (items.left_out, items.listed)})
    items, feats = embed_split(model, meta, root, split, img_size, device, batch_size, workers, rank, world_size, missing)
    return split_map(items, feats) if rank == 0 else None


class Rows:
    """feats[index] read a block of rows at a time: triplet_accuracy slices its (T, d) inputs in blocks, so the
    anchors, fars and closes of CSN's 160,000 test triplets need not be copied out whole (3 x 0.65 GB at d 1024)."""

    def __init__(self, feats, index):
        self.feats, self.index = feats, index
        self.shape, self.device = (len(index), feats.shape[1]), feats.device

    def dim(self):
        return 2

    def __getitem__(self, rows):
        return self.feats[self.index[rows]]


def embed_split(model, meta, root, split, img_size, device, batch_size=128, workers=2, rank=0, world_size=1, missing="error"):
    """An ASEN split's {"query", "candidate"} EvalItems and their features (gathered on every rank)."""
    items = {role: EvalItems(meta["name"], root, split, role, img_size, missing) for role in ("query", "candidate")}
    return items, {role: embed_items(model, s, device, batch_size, workers, rank, world_size) for role, s in items.items()}


def split_map(items, feats):
    """mean_average_precision of embed_split's output."""
    q, c = items["query"], items["candidate"]
    d = feats["query"].device
    result = mean_average_precision(feats["query"], q.attrs.to(d), q.values.to(d), feats["candidate"], c.attrs.to(d), c.values.to(d))
    return mark_incomplete(result, {role: (s.left_out, s.listed) for role, s in items.items()})


NOT_COMPARABLE = "not comparable with published numbers"
ROLE_NAMES = {"query": "queries", "candidate": "candidates", "triplets": "triplets"}


def left_out_text(left_out):
    """'3 of 400 queries and 0 of 1600 candidates': what --eval-missing drop left out of a split."""
    return " and ".join(f"{n} of {listed} {ROLE_NAMES[role]}" for role, (n, listed) in left_out.items())


def mark_incomplete(result, left_out):
    """Carry in the result itself that items were left out, so that every table, JSON file and checkpoint history
    made from it says so: result["left_out"] {role: [left out, listed]} and result["incomplete"], a sentence."""
    if any(n for n, _ in left_out.values()):
        result["left_out"] = {role: list(v) for role, v in left_out.items()}
        result["incomplete"] = f"{NOT_COMPARABLE}: {left_out_text(left_out)} left out, their images missing (--eval-missing drop)"
    return result


def format_results(result, meta, chance=None):
    """The paper's table: one row per attribute, then the totals, each labelled, then `chance` if given."""
    names = meta["attributes"]
    lines = []
    if "per_attribute" in result:
        lines.append(f"{'attribute':<24s} {'queries':>8s} {'mAP':>7s}")
        for a, m in result["per_attribute"].items():
            lines.append(f"{names[a]:<24s} {result['per_attribute_queries'][a]:8d} {100 * m:7.2f}")
        lines.append(f"{'total (query-weighted; the paper reports this)':<48s} {100 * result['total']:7.2f}")
        lines.append(f"{'mean over attributes':<48s} {100 * result['mean_over_attributes']:7.2f}")
        if chance is not None:
            lines.append(f"{'chance level (random ranking, query-weighted)':<48s} {100 * chance:7.2f}")
    else:
        lines.append(f"{'condition':<24s} {'triplets':>8s} {'acc':>7s}")
        for k, acc in result["per_condition"].items():
            lines.append(f"{names[k]:<24s} {result['per_condition_triplets'][k]:8d} {100 * acc:7.2f}")
        lines.append(f"{'total (over all triplets)':<41s} {100 * result['total']:7.2f}")
        if chance is not None:
            lines.append(f"{'chance level (a coin flip)':<41s} {100 * chance:7.2f}")
    if "incomplete" in result:
        lines.append(f"incomplete split: {result['incomplete']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# command line


def open_split(args):
    """What evaluate.py and visualize.py start from: the model of args.ckpt on args.device (default: cuda when
    available), the dataset it was trained on under args.data_root (default: the checkpoint's), and the listed images
    of args.split checked under args.eval_missing. Prints what is used; exits with one `error:` line when something
    does not fit. Returns (model, checkpoint dict, data root, device)."""
    device = default_device(args.device)
    try:
        model, ckpt = load_checkpoint(args.ckpt, device)
    except (OSError, ValueError) as e:  # missing, a folder, not a checkpoint
        raise SystemExit(f"error: {e}")
    meta = ckpt["meta"]
    name = meta["name"]
    root = args.data_root or ckpt["args"]["data_root"]
    if args.data_root and name != "zappos" and not os.path.isfile(os.path.join(root, "meta.json")):
        # never a synthetic set drawn anew where a mistyped path points: it would be scored as if it were the data
        raise SystemExit(f"error: --data-root {root}: no dataset there (no meta.json)")
    found = identify(root)
    if found and name not in found:  # e.g. a demo checkpoint with --data-root of a real dataset
        raise SystemExit(f"error: {args.ckpt} was trained on {name}, but {looks_like(root, found)}: give --data-root "
                         f"a folder of {name}, or score a checkpoint trained on " + " or ".join(found))
    try:
        root, disk_meta = prepare_dataset(name, root)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if disk_meta["attributes"] != meta["attributes"]:
        raise SystemExit(f"error: {root}: attributes {disk_meta['attributes']} differ from the checkpoint's {meta['attributes']}")
    cfg = model.cfg
    print(f"{args.ckpt}: {cfg.arch}, method {cfg.method}, type-{cfg.condition_type}, trained {ckpt['epoch'] + 1} epochs on {name}; {args.split} split of {root}")
    try:
        for role, (n, listed) in check_eval_images(name, root, args.eval_missing, (args.split,))[args.split].items():
            if n:
                print(f"warning: {args.split} {role}: {n} of {listed} listed images are missing; scored without them "
                      f"({NOT_COMPARABLE})")
        print(f"images: {describe_images(name, root, args.split, cfg.img_size)}")
    except (OSError, ValueError) as e:  # a missing or corrupt image: say which
        raise SystemExit(f"error: {error_message(e)}")
    return model, ckpt, root, device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a best.pt or last.pt written by train.py")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="which split to score")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the one the checkpoint was trained on)")
    p.add_argument("--batch-size", type=number(int, 1), default=128, help="images per batch")
    p.add_argument("--workers", type=number(int, 0), default=2, help="data-loading processes")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--eval-missing", default="error", choices=EVAL_MISSING,
                   help="a listed image that is missing: error (default), or drop: score without it, the numbers then marked "
                        "not comparable with published numbers")
    args = p.parse_args(argv)
    try:
        if args.json:  # before the scoring whose numbers it is for
            output_file(args.json, "--json file")
    except OSError as e:
        raise SystemExit(f"error: {e}")
    model, ckpt, root, device = open_split(args)
    try:
        return score(args, model, ckpt, root, device)
    except (OSError, ValueError) as e:  # a missing or corrupt image: say which
        raise SystemExit(f"error: {error_message(e)}")


def score(args, model, ckpt, root, device):
    """Print the split's table, write it to --json if asked; return evaluate_split's result."""
    meta, name = ckpt["meta"], ckpt["meta"]["name"]
    t0 = time.time()
    result = evaluate_split(model, meta, root, args.split, model.cfg.img_size, device, args.batch_size, args.workers,
                            missing=args.eval_missing)
    chance = chance_map(name, root, args.split, args.eval_missing)
    print(format_results(result, meta, chance))
    print(f"({time.time() - t0:.1f} s)")
    if args.json:
        names = meta["attributes"]
        out = dict(checkpoint=args.ckpt, data=name, split=args.split, chance=chance, **result)
        for key in ("per_attribute", "per_attribute_queries", "per_condition", "per_condition_triplets"):
            if key in out:
                out[key] = {names[k]: v for k, v in out[key].items()}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
