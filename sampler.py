"""
Conditioned triplets from labels alone: which images form an epoch's (anchor, positive, negative, condition)
triplets, by ASEN++'s rule on ASEN data or from CSN's fixed list on Zappos50K, and each rank's share under
torchrun. Pure numpy: it never touches an image (data.py batches the images of the rows it gives).

    from sampler import TripletSampler
    s = TripletSampler(100_000, seed=0, labels=rows, value_counts=[6, 9, 8, 6, 5, 5, 10, 5])  # rows (P, 3): image, attr, value
    triplets = s.epoch(0)          # (100000, 4) int64: anchor, positive, negative, condition
"""
import numpy as np


class TripletSampler:
    """An epoch's triplets (anchor, positive, negative, condition) as (n, 4) int64 image ids, from labels alone.

    ASEN data (`labels`: (P, 3) rows (image, attribute, value), `value_counts`: values per attribute): a fresh draw
    of num_triplets each epoch by ASEN++'s rule: the attribute uniform (among those that can give a triplet), two
    distinct values uniform, anchor and positive two different images of the first value, the negative an image of
    the second that does not also have the first. Zappos (`fixed`: CSN's (T, 4) rows (anchor, far, close,
    condition)): CSN's list, reshuffled each epoch, close as the positive and far as the negative.
    Under torchrun every rank draws the whole epoch from (seed, epoch) and keeps every world_size-th triplet."""

    def __init__(self, num_triplets=None, seed=0, rank=0, world_size=1, labels=None, value_counts=None, fixed=None):
        if (labels is None) == (fixed is None):
            raise ValueError("TripletSampler takes labels (ASEN data) or a fixed list (zappos), not both")
        self.num_triplets, self.seed, self.rank, self.world_size = num_triplets, seed, rank, world_size
        self.fixed = None if fixed is None else fixed[:, [0, 2, 1, 3]]  # CSN's (anchor, far, close) -> (a, p, n)
        if labels is not None:
            self._index(labels, np.asarray(value_counts))

    def __len__(self):
        """Triplets per rank in every epoch: the whole epoch padded to a multiple of world_size, then shared."""
        total = len(self.fixed) if self.fixed is not None else self.num_triplets
        return -(-total // self.world_size)

    def images(self):
        """The image ids that a triplet can use."""
        return np.unique(self.fixed[:, :3]) if self.fixed is not None else np.unique(self.members)

    def _index(self, labels, nvals):
        # Group image ids by global value id g = offset[attr] + value, so that "an image of value g" is one lookup
        # into a flat array: members[start[g] + k], k < count[g]. This is what lets a whole epoch draw vectorised.
        labels = np.unique(labels, axis=0)  # a pair listed twice must not pair an image with itself
        offset = np.concatenate([[0], np.cumsum(nvals)[:-1]])
        gid = offset[labels[:, 1]] + labels[:, 2]
        self.num_values = G = int(nvals.sum())
        self.members = labels[np.lexsort((labels[:, 0], gid)), 0]
        self.count = np.bincount(gid, minlength=G)
        self.start = np.cumsum(self.count) - self.count
        # the image's (fid, value) keys, to refuse a negative that also has the first value (DeepFashion labels
        # several values of one attribute type per image)
        self.keys = np.unique(labels[:, 0] * G + gid)
        # An attribute can give a triplet when one value has >= 2 images (anchor, positive) and another has >= 1.
        pos, nonempty, eligible = [], [], []
        for a in range(len(nvals)):
            g = np.arange(offset[a], offset[a] + nvals[a])
            if (self.count[g] >= 2).any() and (self.count[g] >= 1).sum() >= 2:
                eligible.append(a)
                pos.append(g[self.count[g] >= 2])
                nonempty.append(g[self.count[g] >= 1])
        if not eligible:
            raise ValueError("label_train.txt: no attribute has a value with 2 images and another value with 1: "
                             "no triplet can be drawn")
        # ragged lists -> padded (E, width) tables of value ids plus lengths, indexable by a whole array at once
        width = max(len(g) for g in nonempty)
        self.eligible = np.array(eligible)
        self.pos = np.stack([np.pad(g, (0, width - len(g))) for g in pos])
        self.npos = np.array([len(g) for g in pos])
        self.nonempty = np.stack([np.pad(g, (0, width - len(g))) for g in nonempty])
        self.nne = np.array([len(g) for g in nonempty])
        self.rank_in_nonempty = np.zeros(G, dtype=np.int64)  # where value g sits in its attribute's nonempty list
        for g in nonempty:
            self.rank_in_nonempty[g] = np.arange(len(g))

    def _draw(self, rng, n):
        """Exactly n triplets: _draw_some's, topped up by fresh draws for the triplets it left out, so that an epoch
        holds the number of triplets asked for."""
        parts, have, barren = [], 0, 0
        while have < n:
            t = self._draw_some(rng, n - have)
            parts.append(t)
            have += len(t)
            barren = 0 if len(t) else barren + 1
            if barren == 100:  # no label set of a real dataset comes near: every negative shares the first value
                raise ValueError("label_train.txt: the negatives drawn keep sharing the anchor's value (an image labelled "
                                 "with every value of an attribute?): no triplet can be completed")
        return np.concatenate(parts)

    def _draw_some(self, rng, n):
        """Up to n triplets by ASEN's rule, each step one array op; those whose negative still has the first value
        after 10 redraws are left out."""
        k = rng.integers(len(self.eligible), size=n)  # attribute uniform over the attributes that can give one
        v1 = self.pos[k, rng.integers(0, self.npos[k])]  # first value uniform among those with >= 2 images
        ia = rng.integers(0, self.count[v1])
        ip = rng.integers(0, self.count[v1] - 1)
        ip += ip >= ia  # a second, different image of the same value
        anchor, positive = self.members[self.start[v1] + ia], self.members[self.start[v1] + ip]

        def draw_negative(rows):
            j = rng.integers(0, self.nne[k[rows]] - 1)
            j += j >= self.rank_in_nonempty[v1[rows]]  # second value uniform among the *other* nonempty values
            v2 = self.nonempty[k[rows], j]
            return self.members[self.start[v2] + rng.integers(0, self.count[v2])]

        negative = draw_negative(np.arange(n))
        for _ in range(10):  # bounded: a negative that also has the first value is redrawn, at most 10 times
            q = negative * self.num_values + v1
            bad = np.flatnonzero(self.keys[np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)] == q)
            if len(bad) == 0:
                break
            negative[bad] = draw_negative(bad)
        else:  # still sharing the first value after 10 redraws: leave those triplets out
            keep = np.ones(n, dtype=bool)
            keep[bad] = False
            anchor, positive, negative, k = anchor[keep], positive[keep], negative[keep], k[keep]
        return np.stack([anchor, positive, negative, self.eligible[k]], 1)

    def epoch(self, epoch):
        """This rank's (n, 4) triplets of `epoch`; the same on every call, and n the same on every rank."""
        rng = np.random.default_rng([self.seed, epoch])  # same (seed, epoch) -> same triplets on every rank
        if self.fixed is not None:
            full = self.fixed[rng.permutation(len(self.fixed))]
        else:
            full = self._draw(rng, self.num_triplets)
        # Every rank draws the whole set and keeps its strided share; wrapping pads the set to a multiple of
        # world_size, because DDP hangs when one rank takes a step more than the others.
        per_rank = -(-len(full) // self.world_size)
        full = np.resize(full, (per_rank * self.world_size, 4))
        return full[self.rank::self.world_size]
