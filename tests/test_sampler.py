"""Tests of sampler.py, ASEN++'s triplet rule and CSN's fixed list on labels alone: no files, no images.

    python -m pytest -q tests/test_sampler.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from sampler import TripletSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def label_rows(labels):
    """{image: [(attr, value), ...]} -> (P, 3) rows (image, attr, value), as data.read_labels gives them."""
    return np.array([(i, a, v) for i, pairs in sorted(labels.items()) for a, v in pairs], dtype=np.int64).reshape(-1, 3)


def asen(labels, value_counts, n, seed=0, **kw):
    return TripletSampler(n, seed, labels=label_rows(labels), value_counts=value_counts, **kw)


@pytest.fixture(scope="module")
def toy():
    """401 images, 5 attributes. a0 (6 values) has values with 1 and 0 images, and some images carry two of its
    values (DeepFashion does that); a1, a2 are plain; a3 has one value only (no negative possible); a4 has no
    value with 2 images (no positive possible). Only a0, a1, a2 can be drawn."""
    rng = np.random.default_rng(0)
    labels = {}
    for i in range(400):
        pairs = [(0, int(rng.choice([0, 1, 2, 3])))]
        if i % 7 == 0:
            pairs.append((0, int(rng.choice([0, 1, 2, 3]))))
        pairs += [(1, int(rng.integers(3))), (2, int(rng.integers(5))), (3, 0)]
        if i < 4:
            pairs.append((4, i))
        labels[i] = pairs
    labels[400] = [(0, 4), (1, 0)]  # a0 value 4: one image, never a first value; value 5: none
    return labels, [6, 3, 5, 2, 4], {i: {a: {v for b, v in p if b == a} for a in range(5)} for i, p in labels.items()}


def test_triplet_invariants(toy):
    labels, counts_per_attr, values = toy
    t = asen(labels, counts_per_attr, 30000, seed=1).epoch(0)
    assert t.shape == (30000, 4) and t.dtype == np.int64
    counts = np.bincount(t[:, 3], minlength=5)
    assert counts[3] == counts[4] == 0  # attributes that cannot give a triplet are skipped
    for a, p, n, c in t:
        assert a != p
        shared = values[a][c] & values[p][c]
        assert shared and values[n][c] and any(v not in values[n][c] for v in shared)
        assert not (c == 0 and 4 in shared)  # a value with one image never gives a positive
    # the condition is uniform over the 3 drawable attributes: chi-square, 2 dof, p = 0.001 -> 13.8
    expected = len(t) / 3
    assert ((counts[:3] - expected) ** 2 / expected).sum() < 13.8
    # the first value is uniform among a1's values (each has >= 2 images)
    v1 = np.array([min(values[a][1] & values[p][1]) for a, p, n, c in t[t[:, 3] == 1]])
    expected = len(v1) / 3
    assert ((np.bincount(v1, minlength=3) - expected) ** 2 / expected).sum() < 13.8


def test_multilabel_negative_never_has_the_first_value(toy):
    labels, counts, values = toy
    t = asen(labels, counts, 30000, seed=2).epoch(0)
    t = t[t[:, 3] == 0]
    for a, p, n, c in t:
        if len(values[a][0]) == len(values[p][0]) == 1:
            assert not values[a][0] & values[n][0]


def test_triplets_deterministic_per_seed_and_epoch(toy):
    labels, counts, _ = toy
    s = asen(labels, counts, 5000, seed=3)
    first = s.epoch(0)
    assert not np.array_equal(s.epoch(1), first)  # a fresh set each epoch
    assert np.array_equal(s.epoch(0), first)  # the same set for the same epoch, whatever was drawn between
    assert np.array_equal(asen(labels, counts, 5000, seed=3).epoch(1), s.epoch(1))
    assert not np.array_equal(asen(labels, counts, 5000, seed=4).epoch(0), first)


@pytest.mark.parametrize("n", [6000, 6001])
def test_ranks_draw_disjoint_shares_of_the_whole_set(toy, n):
    labels, counts, _ = toy
    whole = asen(labels, counts, n, seed=5).epoch(7)
    ranks = [asen(labels, counts, n, seed=5, rank=r, world_size=2).epoch(7) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-n // 2)  # equal shares: DDP needs the same number of steps
    assert len(asen(labels, counts, n, seed=5, rank=1, world_size=2)) == len(ranks[1])  # the share, without a draw
    merged = np.empty((2 * len(ranks[0]), 4), dtype=np.int64)
    merged[0::2], merged[1::2] = ranks  # position k of the whole set -> rank k % 2
    assert np.array_equal(merged[:n], whole)
    assert np.array_equal(merged[n:], whole[: len(merged) - n])  # padding wraps around


def test_a_full_epoch_of_triplets_is_drawn(toy):  # its speed is bench.py's business, not a test's
    labels, counts, _ = toy
    assert asen(labels, counts, 100_000).epoch(1).shape == (100_000, 4)


def test_negatives_that_keep_the_first_value_are_redrawn_until_the_epoch_is_full():
    # DeepFashion-like labels: 95% of the images carry value 0 beside their own value 1, 2 or 3, so most negatives
    # drawn share the first value, and some still do after the 10 redraws
    labels = {i: [(0, 1 + i % 3)] + ([(0, 0)] if i % 20 else []) for i in range(200)}
    values = {i: {v for _, v in pairs} for i, pairs in labels.items()}
    s = asen(labels, [4], 3000)
    assert len(s._draw_some(np.random.default_rng(0), 3000)) < 3000  # the redraws alone leave triplets out
    for epoch in range(3):
        t = s.epoch(epoch)
        assert t.shape == (3000, 4)  # topped up to exactly the number asked for
        for a, p, n, c in t:
            assert a != p and values[a] & values[p] - values[n]  # a value of anchor and positive that the negative lacks
    # a label set where no negative can ever lack the first value stops with a message instead of looping
    with pytest.raises(ValueError, match="keep sharing the anchor's value"):
        asen({i: [(0, 0), (0, 1)] for i in range(4)}, [2], 10).epoch(0)


def test_no_drawable_attribute_raises_instead_of_looping():
    with pytest.raises(ValueError, match="no triplet can be drawn"):
        asen({0: [(0, 0)], 1: [(0, 1)], 2: [(1, 0)], 3: [(1, 0)]}, [2, 1], 10)


def test_a_label_listed_twice_never_pairs_an_image_with_itself():
    labels = {0: [(0, 0), (0, 0)], 1: [(0, 1)], 2: [(0, 1)]}  # image 0 is value 0's only image, listed twice
    t = asen(labels, [2], 500).epoch(0)
    assert (t[:, 0] != t[:, 1]).all() and set(t[:, 0]) == {1, 2}  # only value 1 (2 images) gives a positive


def test_fixed_list_keeps_anchor_far_close_as_anchor_positive_negative():
    fixed = np.array([[0, 1, 2, 0], [3, 4, 5, 1], [6, 7, 8, 2], [9, 10, 11, 3], [1, 2, 3, 0]])  # CSN: anchor, far, close
    s = TripletSampler(seed=0, fixed=fixed)
    first = s.epoch(0)
    assert {tuple(r) for r in first.tolist()} == {(a, close, far, c) for a, far, close, c in fixed.tolist()}
    assert not np.array_equal(s.epoch(1), first) and np.array_equal(s.epoch(0), first)  # reshuffled per epoch
    halves = [TripletSampler(seed=0, rank=r, world_size=2, fixed=fixed).epoch(0) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == 3 and np.array_equal(halves[0], first[0::2])
    assert len(TripletSampler(seed=0, rank=1, world_size=2, fixed=fixed)) == 3
    with pytest.raises(ValueError, match="not both"):
        TripletSampler(10, labels=label_rows({0: [(0, 0)]}), value_counts=[1], fixed=fixed)


def test_the_sampler_needs_no_images_and_no_torch():
    code = "import sys, sampler; assert 'torch' not in sys.modules and 'PIL' not in sys.modules; print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
