"""Evaluation: the paper's metrics."""

import torch
import torch.nn.functional as F
from torch import Tensor

# -----------------------------------------------------------------------------
# Metrics (SPEC §3: ASEN's mAP; SPEC §4: CSN's triplet accuracy).
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
    """ASEN's attribute-specific retrieval mAP, as the paper's tables report it (SPEC §3).

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
    """CSN's triplet prediction accuracy on Zappos50K (SPEC §4).

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

# ----------------------------------------------------------------------------- end of metrics
