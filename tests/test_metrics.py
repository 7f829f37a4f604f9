"""Tests of the metrics in evaluate.py: hand-worked fractions, then parity with a brute-force loop.

    python -m pytest -q tests/test_metrics.py

CPU, deterministic, a few seconds (mostly importing torch); the GPU test skips without CUDA.
"""

import math
from fractions import Fraction

import pytest
import torch

from evaluate import Rows, average_precision, mean_average_precision, triplet_accuracy


def frac(x):
    """The fraction a float metric stands for (small denominators only)."""
    return Fraction(x).limit_denominator(1000)


def at_angle(*degrees):
    """2-D unit vectors at the given angles: against the query at 0 degrees the cosine falls as the angle grows."""
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def longs(*xs):
    return torch.tensor(xs, dtype=torch.long)


# ----------------------------------------------------------------------------- average_precision

@pytest.mark.parametrize("relevant_ranks, n, expected", [
    ((1, 3), 4, Fraction(5, 6)),       # (1/1 + 2/3) / 2
    ((2, 4), 4, Fraction(1, 2)),       # (1/2 + 2/4) / 2
    ((3,), 5, Fraction(1, 3)),         # (1/3) / 1
    ((1, 2, 3), 3, Fraction(1)),       # (1/1 + 2/2 + 3/3) / 3
    ((2, 3, 5), 6, Fraction(53, 90)),  # (1/2 + 2/3 + 3/5) / 3 = (15 + 20 + 18) / 30 / 3
])
def test_average_precision_hand_worked(relevant_ranks, n, expected):
    scores = torch.arange(n, 0, -1, dtype=torch.float32)  # the item listed r-th has rank r
    relevant = torch.tensor([r in relevant_ranks for r in range(1, n + 1)])
    # shuffle the list: the ranking must come from the scores, not from the list order
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    ap = average_precision(scores[perm], relevant[perm])
    assert ap.dtype == torch.float64 and ap.shape == ()
    assert frac(ap.item()) == expected


def test_average_precision_batched_and_no_relevant():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    relevant = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    ap = average_precision(scores, relevant)
    # row 0: ranks 1, 3 -> 5/6; row 1: nothing relevant -> 0; row 2: the relevant item has the lowest score -> 1/4
    assert [frac(x) for x in ap.tolist()] == [Fraction(5, 6), 0, Fraction(1, 4)]
    assert average_precision(torch.empty(2, 0), torch.empty(2, 0, dtype=torch.bool)).tolist() == [0.0, 0.0]


def test_average_precision_ties_keep_list_order():
    # all scores equal: the ranking is the list order, so the relevant item at position 2 is rank 2 -> AP 1/2
    assert frac(average_precision(torch.ones(3), torch.tensor([False, True, False])).item()) == Fraction(1, 2)


# ----------------------------------------------------------------------------- mean_average_precision

def test_map_hand_worked_two_queries():
    # one attribute, four candidates listed out of rank order; query 0 at 0 deg ranks them by angle:
    # 0 deg (value 1), 20 deg (value 0), 40 deg (value 1), 80 deg (value 2)
    cand = at_angle(40, 80, 0, 20)
    cand_values = longs(1, 2, 1, 0)
    # query 0 (0 deg, value 1): relevant at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6
    # query 1 (90 deg, value 0): ranking 80, 40, 20, 0 -> value 0 at rank 3 -> 1/3
    query = at_angle(0, 90)
    out = mean_average_precision(query, longs(0, 0), longs(1, 0), cand, longs(0, 0, 0, 0), cand_values)
    assert frac(out["per_attribute"][0]) == (Fraction(5, 6) + Fraction(1, 3)) / 2  # 7/12
    assert frac(out["total"]) == Fraction(7, 12)
    assert out["per_attribute_queries"] == {0: 2} and out["num_queries"] == 2


def test_map_features_need_not_be_normalised():
    # scaling a feature does not change a cosine ranking: same 5/6 as above with scaled vectors
    cand = at_angle(40, 80, 0, 20) * torch.tensor([[3.0], [0.5], [0.1], [7.0]])
    out = mean_average_precision(at_angle(0) * 10, longs(0), longs(1), cand, longs(0, 0, 0, 0), longs(1, 2, 1, 0))
    assert frac(out["total"]) == Fraction(5, 6)


def test_map_ties_keep_candidate_list_order():
    # three identical candidates: equal similarity, ranked in list order
    cand = torch.tensor([[1.0, 0.0]] * 3)
    q = torch.tensor([[1.0, 0.0]])
    out = mean_average_precision(q, longs(0), longs(1), cand, longs(0, 0, 0), longs(0, 1, 0))
    assert frac(out["total"]) == Fraction(1, 2)  # relevant at rank 2
    out = mean_average_precision(q, longs(0), longs(1), cand, longs(0, 0, 0), longs(0, 0, 1))
    assert frac(out["total"]) == Fraction(1, 3)  # relevant at rank 3
    # a longer run of ties (an unstable sort reorders runs this long): 20 identical candidates,
    # relevant at list positions 5 and 20 -> ranks 5 and 20 -> (1/5 + 2/20) / 2 = 3/20
    values = torch.zeros(20, dtype=torch.long)
    values[[4, 19]] = 1
    cand, attrs = torch.tensor([[1.0, 0.0]] * 20), torch.zeros(20, dtype=torch.long)
    out = mean_average_precision(q, longs(0), longs(1), cand, attrs, values)
    assert frac(out["total"]) == Fraction(3, 20)


def test_map_query_without_relevant_candidate_counts_as_zero():
    cand = at_angle(0, 30, 60)
    # query 0 (value 0) finds its value at rank 1 -> AP 1; query 1 asks for value 5, which no candidate has -> AP 0
    out = mean_average_precision(at_angle(0, 0), longs(0, 0), longs(0, 5), cand, longs(0, 0, 0), longs(0, 1, 2))
    assert frac(out["per_attribute"][0]) == Fraction(1, 2)
    assert frac(out["total"]) == Fraction(1, 2)
    assert out["num_queries"] == 2 and out["per_attribute_queries"] == {0: 2}


def test_map_attribute_without_candidates_counts_as_zero():
    # attribute 1 has a query but no candidate at all: AP 0, still counted
    out = mean_average_precision(at_angle(0, 0), longs(0, 1), longs(0, 0), at_angle(0), longs(0), longs(0))
    assert out["per_attribute"] == {0: 1.0, 1: 0.0}
    assert frac(out["total"]) == Fraction(1, 2)


def test_map_total_is_query_weighted():
    # attribute 0: one query, its value at rank 1 -> AP 1
    # attribute 3: three queries, each with its value at rank 2 of 2 -> AP 1/2
    q_feats = at_angle(0, 0, 0, 0)
    q_attrs, q_values = longs(0, 3, 3, 3), longs(0, 1, 1, 1)
    c_feats = at_angle(0, 0, 30)
    c_attrs, c_values = longs(0, 3, 3), longs(0, 0, 1)
    out = mean_average_precision(q_feats, q_attrs, q_values, c_feats, c_attrs, c_values)
    assert {a: frac(m) for a, m in out["per_attribute"].items()} == {0: 1, 3: Fraction(1, 2)}
    assert out["per_attribute_queries"] == {0: 1, 3: 3}
    assert frac(out["total"]) == Fraction(5, 8)                  # (1 + 3 * 1/2) / 4 queries
    assert frac(out["mean_over_attributes"]) == Fraction(3, 4)   # (1 + 1/2) / 2 attributes
    assert list(out["per_attribute"]) == [0, 3]                  # attributes 1, 2 have no query: absent


def test_map_ignores_candidates_of_other_attributes():
    # query of attribute 0 at 0 deg, value 1; its attribute's candidates: 10 deg value 0, 50 deg value 1 -> AP 1/2
    q = at_angle(0)
    base = mean_average_precision(q, longs(0), longs(1), at_angle(10, 50), longs(0, 0), longs(0, 1))
    assert frac(base["total"]) == Fraction(1, 2)
    # add candidates of attribute 1 that are nearer (identical to the query) and carry the query's value
    out = mean_average_precision(q, longs(0), longs(1), at_angle(0, 10, 0, 50), longs(1, 0, 1, 0), longs(1, 0, 1, 1))
    assert out == base


def brute_force_map(q_feats, q_attrs, q_values, c_feats, c_attrs, c_values):
    """An independent reference: Python lists, math.fsum, sorted(); no torch ops."""
    def cosine(u, v):
        return math.fsum(a * b for a, b in zip(u, v)) / (math.sqrt(math.fsum(a * a for a in u)) *
                                                          math.sqrt(math.fsum(b * b for b in v)))
    qf, cf = q_feats.tolist(), c_feats.tolist()
    qa, qv, ca, cv = q_attrs.tolist(), q_values.tolist(), c_attrs.tolist(), c_values.tolist()
    aps = {}
    for i in range(len(qf)):
        cands = [j for j in range(len(cf)) if ca[j] == qa[i]]
        ranked = sorted(cands, key=lambda j: -cosine(qf[i], cf[j]))  # sorted() is stable: ties in list order
        hits, precisions = 0, []
        for rank, j in enumerate(ranked, start=1):
            if cv[j] == qv[i]:
                hits += 1
                precisions.append(hits / rank)
        aps.setdefault(qa[i], []).append(sum(precisions) / len(precisions) if precisions else 0.0)
    per_attr = {a: sum(v) / len(v) for a, v in sorted(aps.items())}
    total = sum(sum(v) for v in aps.values()) / len(qf)
    return per_attr, total, sum(per_attr.values()) / len(per_attr)


def random_retrieval_set(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Q, C, d = 60, 240, 8
    values_per_attr = [3, 5, 2, 4]
    q_attrs = torch.randint(0, 4, (Q,), generator=g)
    c_attrs = torch.randint(0, 4, (C,), generator=g)
    q_values = torch.stack([torch.randint(0, values_per_attr[a], (), generator=g) for a in q_attrs.tolist()])
    c_values = torch.stack([torch.randint(0, values_per_attr[a], (), generator=g) for a in c_attrs.tolist()])
    q_values[0] = 9  # a value no candidate has: AP 0, still counted
    q_feats = torch.randn(Q, d, generator=g) * torch.rand(Q, 1, generator=g)  # not normalised
    c_feats = torch.randn(C, d, generator=g) * torch.rand(C, 1, generator=g)
    return [t.to(device) for t in (q_feats, q_attrs, q_values, c_feats, c_attrs, c_values)]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_map_matches_brute_force(seed, chunk_size):
    data = random_retrieval_set(seed)
    per_attr, total, mean_attr = brute_force_map(*data)
    out = mean_average_precision(*data, chunk_size=chunk_size)
    assert out["per_attribute"].keys() == per_attr.keys()
    for a in per_attr:
        assert out["per_attribute"][a] == pytest.approx(per_attr[a], abs=1e-6)
    assert out["total"] == pytest.approx(total, abs=1e-6)
    assert out["mean_over_attributes"] == pytest.approx(mean_attr, abs=1e-6)
    assert out["num_queries"] == 60 and sum(out["per_attribute_queries"].values()) == 60
    assert out["total"] != pytest.approx(out["mean_over_attributes"], abs=1e-6)  # the two really differ here


def test_map_rejects_mismatched_inputs():
    q = at_angle(0, 0)
    with pytest.raises(ValueError, match="query attrs"):
        mean_average_precision(q, longs(0), longs(0), q, longs(0, 0), longs(0, 0))
    with pytest.raises(ValueError, match="same d"):
        mean_average_precision(q, longs(0, 0), longs(0, 0), torch.ones(2, 3), longs(0, 0), longs(0, 0))


# ----------------------------------------------------------------------------- triplet_accuracy

def test_triplet_accuracy_hand_worked_with_ties():
    a = at_angle(0, 0, 0, 0, 0)
    # condition 0: close nearer (correct); far == close exactly (tie: wrong)
    # condition 1: far at 90, close at -90: both cosines are exactly 0 (tie: wrong); close nearer (correct)
    # condition 2: far nearer (wrong)
    far = torch.cat([at_angle(60, 30), torch.tensor([[0.0, 1.0]]), at_angle(50, 10)])
    close = torch.cat([at_angle(10, 30), torch.tensor([[0.0, -1.0]]), at_angle(20, 40)])
    out = triplet_accuracy(a, far, close, longs(0, 0, 1, 1, 2))
    assert {c: frac(x) for c, x in out["per_condition"].items()} == {0: Fraction(1, 2), 1: Fraction(1, 2), 2: 0}
    assert out["per_condition_triplets"] == {0: 2, 1: 2, 2: 1}
    assert frac(out["total"]) == Fraction(2, 5) and out["num_triplets"] == 5


def test_triplet_accuracy_order_scale_and_all_ties():
    a, near, away = at_angle(0), at_angle(10), at_angle(70)
    # (anchor, far, close): the third argument is the closer one
    assert triplet_accuracy(a, away, near, longs(3))["total"] == 1.0
    assert triplet_accuracy(a, near, away, longs(3))["total"] == 0.0
    assert triplet_accuracy(a * 5, away * 0.1, near * 9, longs(3))["total"] == 1.0  # cosine: scale-free
    assert triplet_accuracy(a, near, near.clone(), longs(3))["total"] == 0.0         # tie: wrong


def test_triplet_accuracy_checks_conditions():
    a = at_angle(0, 0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        triplet_accuracy(a, a, a, longs(0, 4), num_conditions=4)
    assert triplet_accuracy(a, a, a, longs(0, 3), num_conditions=4)["per_condition"] == {0: 0.0, 3: 0.0}


# ----------------------------------------------------------------------------- GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    cpu = mean_average_precision(*random_retrieval_set(0), chunk_size=7)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # must not matter: similarities are float64
        gpu = mean_average_precision(*random_retrieval_set(0, "cuda"), chunk_size=7)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert gpu.keys() == cpu.keys() and gpu["per_attribute"].keys() == cpu["per_attribute"].keys()
    for a in cpu["per_attribute"]:
        assert gpu["per_attribute"][a] == pytest.approx(cpu["per_attribute"][a], abs=1e-9)
    assert gpu["total"] == pytest.approx(cpu["total"], abs=1e-9)
    assert gpu["per_attribute_queries"] == cpu["per_attribute_queries"]

    g = torch.Generator().manual_seed(0)
    a, f, c = (torch.randn(500, 16, generator=g) for _ in range(3))
    f[:50] = c[:50]  # ties
    cond = torch.randint(0, 4, (500,), generator=g)
    cpu_t = triplet_accuracy(a, f, c, cond)
    gpu_t = triplet_accuracy(a.cuda(), f.cuda(), c.cuda(), cond.cuda())
    assert gpu_t == cpu_t


def test_triplet_accuracy_on_gathered_rows_equals_the_copies():
    """evaluate_split hands triplet_accuracy Rows(feats, index) views, read a block at a time: the same result as the
    gathered copies, across more than one block (16,384 triplets a block)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(300, 8, generator=g)
    t = torch.randint(0, 300, (20_000, 3), generator=g)
    c = torch.randint(0, 4, (20_000,), generator=g)
    copies = triplet_accuracy(feats[t[:, 0]], feats[t[:, 1]], feats[t[:, 2]], c, 4)
    views = triplet_accuracy(Rows(feats, t[:, 0]), Rows(feats, t[:, 1]), Rows(feats, t[:, 2]), c, 4)
    assert views == copies and 0.3 < copies["total"] < 0.7
