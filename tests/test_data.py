"""Tests of data.py, synthetic.py and dataset_tools.py: readers on real-format files (CRLF included), the training
split and its images, the evaluation sets, the synthetic set, check.

tests/fixtures/fashionai/ holds the first 40 lines of real FashionAI split files of ASEN's protocol, byte for
byte (CRLF ends), ASEN's combined meta.json and the FashionAI value names, copied from shared/reference/.
The query and candidate fids of those heads point past line 40 of the filenames head.

    python -m pytest -q tests/test_data.py
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FIX = os.path.join(REPO, "tests", "fixtures", "fashionai")
FASHIONAI = data.load_meta("fashionai", FIX)
SMALL = dict(num_train=60, num_query=10, num_candidate=40)  # a synthetic set that writes in well under a second

# -----------------------------------------------------------------------------
# readers on the real FashionAI heads


def test_fixtures_are_crlf():
    for f in ("filenames_test.txt", "label_train.txt", "query_test.txt", "candidate_test.txt", "meta.json"):
        with open(os.path.join(FIX, f), "rb") as fh:
            assert b"\r\n" in fh.read(), f


def test_read_filenames_crlf():
    names = data.read_filenames(os.path.join(FIX, "filenames_test.txt"))
    assert len(names) == 40
    assert names[0] == "fashionAI_attributes_train2/Images/sleeve_length_labels/98cc08e67650d76f9f526c381d357f11.jpg"
    assert names[-1] == "fashionAI_attributes_train2/Images/skirt_length_labels/873dbaf9767d65a623b59547bd583d1c.jpg"
    assert not any(c.isspace() for n in names for c in n)


def test_read_label_train_head():
    rows = data.read_labels(os.path.join(FIX, "label_train.txt"), 40, FASHIONAI, multi=True)
    assert rows.shape == (40, 3) and rows.dtype == np.int64
    assert rows[0].tolist() == [0, 7, 3] and rows[-1].tolist() == [39, 5, 1]
    assert rows[:, 0].tolist() == list(range(40))


def test_read_query_and_candidate_heads():
    q = data.read_labels(os.path.join(FIX, "query_test.txt"), 18000, FASHIONAI)
    c = data.read_labels(os.path.join(FIX, "candidate_test.txt"), 18000, FASHIONAI)
    assert q.shape == c.shape == (40, 3)
    assert q[0].tolist() == [13924, 6, 0] and q[-1].tolist() == [3431, 0, 5]
    assert c[0].tolist() == [0, 1, 4] and c[-1].tolist() == [47, 0, 2]
    assert np.bincount(q[:, 1], minlength=8).tolist() == [8, 6, 2, 5, 3, 6, 7, 3]
    assert not set(q[:, 0]) & set(c[:, 0])  # queries and candidates are disjoint images


def test_candidate_attribute_matches_image_folder():
    # A data fact of the real files: FashionAI images sit in a folder named after their attribute, and the
    # candidate list gives that attribute. The reader and the meta's attribute order must agree with it.
    names = data.read_filenames(os.path.join(FIX, "filenames_test.txt"))
    c = data.read_labels(os.path.join(FIX, "candidate_test.txt"), 18000, FASHIONAI)
    checked = 0
    for fid, a, v in c[c[:, 0] < 40]:
        assert f"/{FASHIONAI['attributes'][a]}_labels/" in names[fid]
        checked += 1
    assert checked >= 30


def test_meta_from_asen_combined_file():
    assert FASHIONAI["format"] == "asen" and len(FASHIONAI["attributes"]) == 8
    assert [len(v) for v in FASHIONAI["values"]] == [6, 9, 8, 6, 5, 5, 10, 5]
    assert FASHIONAI["attributes"][1] == "sleeve_length" and FASHIONAI["values"][1][6] == "Wrist Length"
    darn = data.load_meta("darn", FIX)
    assert len(darn["attributes"]) == 9 and sum(map(len, darn["values"])) == 185
    assert darn["values"][2][3] == "value 3"
    deep = data.load_meta("deepfashion", FIX)
    assert len(deep["attributes"]) == 5 and sum(map(len, deep["values"])) == 1000


def test_meta_single_file_with_value_names(tmp_path):
    shutil.copy(os.path.join(FIX, "meta_with_value_names.json"), tmp_path / "meta.json")
    meta = data.load_meta("darn", str(tmp_path))  # any name: the file's own ATTRIBUTES_VALUES win
    assert meta["values"] == [data.FASHIONAI_VALUE_NAMES[a] for a in meta["attributes"]] == FASHIONAI["values"]


def test_meta_errors_and_checkpoint_safe(tmp_path):
    (tmp_path / "meta.json").write_text('{"FashionAI": {}}')
    with pytest.raises(ValueError, match="meta.json"):
        data.load_meta("darn", str(tmp_path))
    zappos = data.load_meta("zappos", str(tmp_path))
    assert zappos["attributes"] == ["class", "closure", "gender", "heel"] and zappos["values"] == [[], [], [], []]
    torch.save({"meta": FASHIONAI, "z": zappos}, tmp_path / "ck.pt")  # the meta goes into checkpoints
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["meta"] == FASHIONAI


@pytest.mark.parametrize("line, multi, what", [
    ("3 x 1", False, "expected 'fid attr value'"),
    ("3 1", False, "expected"),
    ("3 1 2 4 1", False, "expected"),
    ("3 1 2 4", True, "expected 'fid attr value [attr value ...]'"),
    ("99 1 2", False, "fid 99 out of range"),
    ("3 8 0", False, "attribute 8 out of range"),
    ("3 1 9", False, "value 9 out of range"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, multi, what):
    path = tmp_path / "query_test.txt"
    path.write_bytes(b"0 1 4\r\n\r\n" + line.encode() + b"\r\n")  # the bad line is line 3, after a blank one
    with pytest.raises(ValueError, match=re.escape(f"query_test.txt:3: {what}")):
        data.read_labels(str(path), 50, FASHIONAI, multi=multi)
    errors = []  # dataset_tools.py check collects every bad line instead of stopping at the first
    rows = data.read_labels(str(path), 50, FASHIONAI, multi=multi, errors=errors)
    assert rows.tolist() == [[0, 1, 4]] and len(errors) == 1


def test_eval_items_on_real_heads(tmp_path):
    # a test split whose filenames file is the real head followed by made-up paths up to the largest fid
    shutil.copy(os.path.join(FIX, "meta.json"), tmp_path)
    for f in ("query_test.txt", "candidate_test.txt"):
        shutil.copy(os.path.join(FIX, f), tmp_path)
    head = data.read_filenames(os.path.join(FIX, "filenames_test.txt"))
    names = head + [f"img/{i}.jpg" for i in range(40, 18000)]
    (tmp_path / "filenames_test.txt").write_bytes("".join(n + "\r\n" for n in names).encode())
    touch_images(str(tmp_path), names)  # evaluation sets refuse missing images; the reader needs only the paths
    q = data.EvalItems("fashionai", str(tmp_path), "test", "query", 32)
    c = data.EvalItems("fashionai", str(tmp_path), "test", "candidate", 32)
    assert len(q) == len(c) == 40
    assert q.paths[0] == os.path.join(str(tmp_path), "img/13924.jpg") and (q.attrs[0], q.values[0]) == (6, 0)
    assert c.paths[0] == os.path.join(str(tmp_path), head[0]) and (c.attrs[0], c.values[0]) == (1, 4)
    assert q.attrs.dtype == c.values.dtype == torch.int64


def test_prepare_dataset_missing_files_say_where_they_come_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"meta.json.*Maryeon/asen"):
        data.prepare_dataset("fashionai", str(tmp_path / "fa"))
    with pytest.raises(FileNotFoundError, match=r"filenames.json.*conditional-similarity-networks"):
        data.prepare_dataset("zappos", str(tmp_path / "z"))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.prepare_dataset("imagenet")


def test_a_real_dataset_under_data_synthetic_is_named_as_what_it_is(tmp_path, zappos, asen_folder):
    before = sorted(os.listdir(tmp_path))
    # ASEN's combined meta.json fits FashionAI, DARN and DeepFashion; the folder's name picks one when it can
    for folder, named in (("fashionai", "FashionAI"), ("data", "FashionAI or DARN or DeepFashion")):
        root = asen_folder(str(tmp_path / folder))
        with pytest.raises(ValueError) as e:
            data.prepare_dataset("synthetic", root)
        assert str(e.value).startswith(f"{root} looks like {named} (ASEN's split files), not the synthetic set: add --data")
        assert "older" not in str(e.value) and "delete" not in str(e.value)
    # a meta.json of one dataset: its attribute names tell which (here FashionAI's, in a folder named otherwise)
    root = asen_folder(str(tmp_path / "mine"), "meta_with_value_names.json")
    with pytest.raises(ValueError, match=re.escape("looks like FashionAI (ASEN's split files), not the synthetic set: add --data fashionai")):
        data.prepare_dataset("synthetic", root)
    root = str(tmp_path / "darn")
    os.makedirs(root)
    (tmp_path / "darn" / "meta.json").write_text(json.dumps({"ATTRIBUTES": data.ASEN_ATTRIBUTES["darn"], "ATTRIBUTES_NUM": [2] * 9}))
    with pytest.raises(ValueError, match=re.escape("looks like DARN (ASEN's split files), not the synthetic set: add --data darn")):
        data.prepare_dataset("synthetic", root)
    zroot = zappos[0]
    with pytest.raises(ValueError, match=re.escape(f"{zroot} looks like UT Zappos50K (CSN's triplet lists), not the synthetic set: add --data zappos")):
        data.prepare_dataset("synthetic", zroot)
    assert not os.path.exists(os.path.join(zroot, "meta.json")) and not os.path.exists(os.path.join(zroot, "images"))
    # another --data on it: refused before anything is read, saying which dataset the folder does hold
    with pytest.raises(ValueError, match=re.escape("looks like UT Zappos50K (CSN's triplet lists), not FashionAI: add --data zappos")):
        data.prepare_dataset("fashionai", zroot)
    # a meta.json of nothing known is not called a synthetic set either
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text('{"classes": 3}')
    with pytest.raises(ValueError, match="is not a synthetic set's meta.json"):
        data.prepare_dataset("synthetic", str(tmp_path / "other"))
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["fashionai", "data", "mine", "darn", "other"])  # nothing drawn
    assert data.prepare_dataset("fashionai", str(tmp_path / "fashionai"))[1]["name"] == "fashionai"

# -----------------------------------------------------------------------------
# the training split: sampler.py's triplets (tests/test_sampler.py) from the split files, images from a store


def touch_images(root, names):
    """Empty files where images would be: training_set and EvalItems check that every image exists."""
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(root, n)), exist_ok=True)
        open(os.path.join(root, n), "wb").close()


def make_asen(root, labels, nvals):
    """A label-only ASEN training set: labels = {fid: [(attr, value), ...]}; empty files for images."""
    os.makedirs(root, exist_ok=True)
    attrs = [f"a{i}" for i in range(len(nvals))]
    with open(os.path.join(root, "meta.json"), "w") as f:
        f.write('{"ATTRIBUTES": %s, "ATTRIBUTES_NUM": {%s}}' % (
            str(attrs).replace("'", '"'), ", ".join(f'"{a}": {n}' for a, n in zip(attrs, nvals))))
    n = max(labels) + 1
    with open(os.path.join(root, "filenames_train.txt"), "w", newline="\r\n") as f:
        f.writelines(f"img/{i}.jpg\n" for i in range(n))
    with open(os.path.join(root, "label_train.txt"), "w", newline="\r\n") as f:
        f.writelines(f"{i} " + " ".join(f"{a} {v}" for a, v in pairs) + "\n" for i, pairs in sorted(labels.items()))
    touch_images(root, [f"img/{i}.jpg" for i in range(n)])
    return root


def test_training_set_draws_the_split_files_labels_and_leaves_missing_images_out(tmp_path, capsys):
    labels = {i: [(0, i % 3), (1, i % 2)] for i in range(30)}
    root = make_asen(str(tmp_path), labels, [3, 2])
    sampler, store = data.training_set("asen-toy", root, 32, 500, seed=1)
    rows = np.array([(i, a, v) for i, p in labels.items() for a, v in p])
    assert np.array_equal(sampler.epoch(2), data.TripletSampler(500, 1, labels=rows, value_counts=[3, 2]).epoch(2))
    assert store.paths == [os.path.join(root, f"img/{i}.jpg") for i in range(30)] and not store.stored
    os.remove(os.path.join(root, "img/4.jpg"))
    sampler, _ = data.training_set("asen-toy", root, 32, 500, seed=1)
    assert "1 of 30 training images are missing" in capsys.readouterr().out
    assert 4 not in sampler.epoch(0)[:, :3] and 4 not in sampler.images()
    for i in range(30):
        os.remove(os.path.join(root, f"img/{i}.jpg")) if i != 4 else None
    with pytest.raises(FileNotFoundError, match="30 of 30 training images are missing"):
        data.training_set("asen-toy", root, 32, 500)

# -----------------------------------------------------------------------------
# zappos (CSN format), on conftest.py's zappos folder: 12 images, 5 triplets per condition and split, CRLF ends


def test_zappos_train_keeps_anchor_far_close_order(zappos):
    root, lists = zappos
    sampler, store = data.training_set("zappos", root, 16, 10, seed=0)  # 10 over 4 conditions: 3, 3, 2, 2 first lines
    expected = {(a, close, far, c) for c, k in zip(range(4), (3, 3, 2, 2)) for a, far, close in lists["train", c][:k]}
    first = sampler.epoch(0)
    assert {tuple(r) for r in first.tolist()} == expected and len(first) == 10
    assert {tuple(r) for r in sampler.epoch(1).tolist()} == expected and not np.array_equal(first, sampler.epoch(1))
    assert np.array_equal(first, sampler.epoch(0))  # the fixed list, in a new order each epoch
    a, p, n, c = data.TripletBatches(first, store, 2)[0]
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.uint8 and c.tolist() == first[:2, 3].tolist()
    assert data.prepare_dataset("zappos", root)[1]["format"] == "zappos"


def test_zappos_eval_set_unique_items(zappos):
    root, lists = zappos
    ev = data.ZapposEvalSet(root, "valid", 16, num_triplets=20)  # "valid" reads CSN's *_val.txt
    rows = [r + (c,) for c in range(4) for r in lists["val", c]]
    assert ev.triplets.shape == (20, 3) and ev.conditions.tolist() == [r[3] for r in rows]
    pairs = list(zip(ev.paths, ev.item_conditions.tolist()))
    assert len(set(pairs)) == len(pairs) == len(ev)
    for (a, far, close, c), t in zip(rows, ev.triplets.tolist()):
        for fid, item in zip((a, far, close), t):
            assert ev.paths[item].endswith(f"/{fid}.jpg") and ev.item_conditions[item] == c
    image, cond, i = ev[3]
    assert image.shape == (3, 16, 16) and cond == ev.item_conditions[3] and i == 3

def test_eval_sets_refuse_or_drop_missing_images(zappos, tmp_path):
    root = str(tmp_path / "z")
    shutil.copytree(zappos[0], root)
    os.remove(os.path.join(root, "ut-zap50k-images", "Shoes/Boots/Brand 0/0.jpg"))
    with pytest.raises(FileNotFoundError, match=r"1 of 12 zappos valid images are missing.*--eval-missing drop"):
        data.ZapposEvalSet(root, "valid", 16, num_triplets=20)
    ev = data.ZapposEvalSet(root, "valid", 16, num_triplets=20, missing="drop")
    uses = sum(0 in row for c in range(4) for row in zappos[1]["val", c])  # the triplets with image 0
    assert 0 < uses < 20 and (ev.left_out, ev.listed, len(ev.triplets)) == (uses, 20, 20 - uses)
    assert not any(p.endswith("/0.jpg") for p in ev.paths)
    assert data.check_eval_images("zappos", root, "drop") == {"valid": {"triplets": (uses, 20)}, "test": {"triplets": (uses, 20)}}
    # ASEN lists: the query or candidate of a missing image is left out, the others kept in their order
    synth = str(tmp_path / "s")
    synthetic.make_synthetic(synth, seed=3, workers=1, **SMALL)
    q = data.EvalItems("synthetic", synth, "valid", "query", 32)
    os.remove(q.paths[3])
    with pytest.raises(FileNotFoundError, match="1 of 10 valid query images are missing"):
        data.check_eval_images("synthetic", synth)
    dropped = data.EvalItems("synthetic", synth, "valid", "query", 32, missing="drop")
    assert (dropped.left_out, dropped.listed) == (1, 10) and dropped.paths == q.paths[:3] + q.paths[4:]
    assert torch.equal(dropped.attrs, torch.cat([q.attrs[:3], q.attrs[4:]]))
    assert data.check_eval_images("synthetic", synth, "drop")["valid"] == {"query": (1, 10), "candidate": (0, 40)}
    assert evaluate.chance_map("synthetic", synth, "valid", "drop") != evaluate.chance_map("synthetic", synth, "valid")

# -----------------------------------------------------------------------------
# images


def test_load_image_resize_crop_normalise_flip(tmp_path):
    x = np.zeros((60, 120, 3), dtype=np.uint8)
    x[:, :60] = 255  # left half white, right half black
    Image.fromarray(x).save(tmp_path / "a.png")
    img = data.load_image(str(tmp_path / "a.png"), 32)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img[:, :, 0].eq(1).all() and img[:, :, -1].eq(-1).all()  # mean = std = 0.5: [0, 1] -> [-1, 1]
    assert torch.equal(data.normalise(data.read_image(str(tmp_path / "a.png"), 32)), img)
    assert data.read_image(str(tmp_path / "a.png"), 32).dtype == torch.uint8


def test_load_image_large_jpeg_decodes_reduced(tmp_path):
    rng = np.random.default_rng(0)
    x = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((100, 100, 1))).astype(np.uint8)  # 1200 x 1600
    Image.fromarray(x).save(tmp_path / "big.jpg", quality=95)
    fast = data.load_image(str(tmp_path / "big.jpg"), 64)
    full = Image.open(tmp_path / "big.jpg").convert("RGB").resize((85, 64), Image.BILINEAR).crop((10, 0, 74, 64))
    full = torch.from_numpy(np.array(full)).permute(2, 0, 1).float() / 127.5 - 1
    assert fast.shape == (3, 64, 64) and (fast - full).abs().mean() < 0.05


def test_load_image_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        data.load_image(str(tmp_path / "nothere.jpg"), 32)
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(OSError, match="junk.jpg"):
        data.load_image(str(tmp_path / "junk.jpg"), 32)
    Image.new("RGB", (200, 200), (1, 2, 3)).save(tmp_path / "cut.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "cut.jpg").read_bytes()[:300])  # truncated
    with pytest.raises(OSError, match="cut.jpg"):
        data.load_image(str(tmp_path / "cut.jpg"), 32)

# -----------------------------------------------------------------------------
# the synthetic dataset (conftest.py's synth: 60 training images, 10 queries and 40 candidates per split)


def files_of(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
    return out


def test_synthetic_is_deterministic(tmp_path):
    synthetic.make_synthetic(str(tmp_path / "a"), seed=3, workers=1, **SMALL)
    synthetic.make_synthetic(str(tmp_path / "b"), seed=3, workers=2, **SMALL)  # other worker count, same bytes
    a, b = files_of(str(tmp_path / "a")), files_of(str(tmp_path / "b"))
    assert len(a) == 60 + 2 * 50 + 9 and a == b
    synthetic.make_synthetic(str(tmp_path / "c"), seed=4, workers=1, **SMALL)
    c = files_of(str(tmp_path / "c"))
    assert c["label_train.txt"] != a["label_train.txt"] and c["images/train/00000.jpg"] != a["images/train/00000.jpg"]


def test_shapes_set_is_deterministic_balanced_and_apart_from_the_synthetic_set():
    x, y = synthetic.make_shapes(48, img_size=16, seed=5, workers=1)
    assert x.shape == (48, 3, 16, 16) and x.dtype == torch.uint8
    assert (torch.bincount(y, minlength=24) == 2).all()  # 24 classes, balanced
    x2, y2 = synthetic.make_shapes(48, img_size=16, seed=5, workers=2)  # other worker count, same pixels
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(synthetic.make_shapes(48, img_size=16, seed=6, workers=1)[0], x)
    assert len(synthetic.SHAPE_CLASSES) == 24 and not set(synthetic.SHAPE_CLASSES) & {v for vs in synthetic.SYNTH_ATTRIBUTES.values() for v in vs}


def test_synthetic_is_asen_format(synth):
    root, meta = data.prepare_dataset("synthetic", synth)
    A = len(meta["attributes"])
    assert A >= 4 and all(3 <= len(v) <= 8 for v in meta["values"])
    assert meta["values"][meta["attributes"].index("sleeve_length")][3] == "Long Sleeves"
    labels = data.read_labels(os.path.join(root, "label_train.txt"), 60, meta, multi=True)
    assert labels.shape == (60 * A, 3) and (np.bincount(labels[:, 0]) == A).all()  # every attribute of every image
    for split in ("valid", "test"):
        q = data.EvalItems("synthetic", root, split, "query", 64)
        c = data.EvalItems("synthetic", root, split, "candidate", 64)
        assert (len(q), len(c)) == (10, 40)
        listed = sorted(q.paths + c.paths)
        assert listed == sorted(set(listed)) and len(listed) == 50  # each image once, under one attribute
        assert set(q.attrs.tolist()) == set(c.attrs.tolist()) == set(range(A))  # every attribute is covered
        image, attr, value, i = q[0]
        assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and i == 0
        assert torch.equal(data.normalise(image), data.load_image(q.paths[0], 64))
    assert 0.15 < evaluate.chance_map("synthetic", root, "test") < 0.5
    sampler, store = data.training_set("synthetic", root, 64, 50)
    a, p, n, cond = data.TripletBatches(sampler.epoch(0), store, 1)[0]
    assert a.shape == p.shape == n.shape == (1, 3, 64, 64) and 0 <= cond[0] < A


@pytest.mark.parametrize("which", ["synth", "zappos"])
def test_cached_triplets_equal_decoded_ones(which, request):
    """cache=True must give the very tensors of decoding each time, flips included."""
    name, root = ("synthetic", request.getfixturevalue("synth")) if which == "synth" else ("zappos", request.getfixturevalue("zappos")[0])
    sampler, plain = data.training_set(name, root, 16, 40, seed=1)
    cached = data.training_set(name, root, 16, 40, seed=1, cache=True)[1]
    used = sampler.images()
    assert cached.images.shape == (len(used), 3, 16, 16) and cached.images.dtype == torch.uint8 and plain.images is None
    assert torch.equal(cached.take(used), plain.take(used))
    triplets = sampler.epoch(0)
    by_file, by_cache = (data.TripletBatches(triplets, s, 8) for s in (plain, cached))
    flipped = 0
    for i in range(len(by_file)):
        torch.manual_seed(i)
        want = by_file[i]
        torch.manual_seed(i)
        got = by_cache[i]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        torch.manual_seed(i)
        flipped += int((torch.rand(8, 3) < 0.5).sum())
    assert 0 < flipped < 3 * 8 * len(by_file)  # both branches of the flip were compared
    # the batch: each image as decoded from its file, mirrored where its flip says
    rows = np.arange(len(triplets) - 7, len(triplets))
    flips = torch.rand(len(rows), 3) < 0.5
    a, p, n, c = by_cache.batch(rows, flips)
    assert a.shape == (len(rows), 3, 16, 16) and c.tolist() == triplets[rows, 3].tolist()
    for k, r in enumerate(rows):
        for x, j, f in zip((a, p, n), triplets[r, :3], flips[k]):
            image = data.read_image(plain.paths[j], 16)
            assert torch.equal(x[k], image.flip(-1) if f else image)
    unflipped = data.TripletBatches(triplets, cached, 8, flip=False).batch(rows)  # --no-flip: the images as decoded
    assert all(torch.equal(x, plain.take(triplets[rows, j])) for j, x in enumerate(unflipped[:3]))


def test_chance_ap_by_hand():
    # 1 query, 3 candidates of its attribute, 1 relevant: a random rank 1, 2, 3 gives AP 1, 1/2, 1/3
    q = np.array([[0, 0, 1]])
    c = np.array([[1, 0, 1], [2, 0, 0], [3, 0, 2], [4, 1, 1]])
    assert evaluate.chance_ap(q, c)[0] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # 2 relevant of 3: rankings RRN, RNR, NRR give 1, (1 + 2/3)/2, (1/2 + 2/3)/2 -> mean 29/36
    c[1, 2] = 1
    assert evaluate.chance_ap(q, c)[0] == pytest.approx(29 / 36)
    assert evaluate.chance_ap(np.array([[0, 0, 9]]), c)[0] == 0  # no relevant candidate: AP 0


def test_prepare_dataset_creates_missing_synthetic(tmp_path, monkeypatch):
    made, full_size = [], data.make_synthetic

    def small(out):  # the default 10,000 images take too long for a test
        made.append(out)
        full_size(out, workers=1, **SMALL)

    monkeypatch.setattr(data, "make_synthetic", small)
    root, meta = data.prepare_dataset("synthetic", str(tmp_path / "syn"))
    assert root == str(tmp_path / "syn") and len(made) == 1 and os.path.isfile(os.path.join(root, "meta.json"))
    assert data.prepare_dataset("synthetic", root)[1] == meta and len(made) == 1  # made once
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    # a set drawn by another version of synthetic.py is refused, naming the folder, not trained on; a meta.json
    # without a version is no synthetic set's
    path = os.path.join(root, "meta.json")
    raw = json.load(open(path))
    raw["SYNTHETIC_VERSION"] = synthetic.SYNTH_VERSION - 1
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=re.escape(f"{root} holds a synthetic set drawn by an older synthetic.py "
                                                   f"(version {synthetic.SYNTH_VERSION - 1}")):
        data.prepare_dataset("synthetic", root)
    raw.pop("SYNTHETIC_VERSION")
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a synthetic set's meta.json (no SYNTHETIC_VERSION)")):
        data.prepare_dataset("synthetic", root)
    assert len(made) == 1

# -----------------------------------------------------------------------------
# python dataset_tools.py check / synth, as a user runs them


def run(*args):
    cmd = [sys.executable, os.path.join(REPO, "dataset_tools.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)


def test_cli_synth_and_check(tmp_path):
    root = str(tmp_path / "s")
    r = run("synth", "--out", root, "--num-train", "30", "--num-query", "10", "--num-candidate", "40",
            "--workers", "1")
    assert r.returncode == 0, r.stderr
    r = run("check", "--data", "synthetic", "--data-root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "chance mAP" in r.stdout and "missing images: 0" in r.stdout
    # now break it: delete an image, add a garbage line
    os.remove(os.path.join(root, "images", "test", "00007.jpg"))
    with open(os.path.join(root, "candidate_test.txt"), "a") as f:
        f.write("12 oops\n")
    lineno = sum(1 for _ in open(os.path.join(root, "candidate_test.txt")))
    r = run("check", "--data", "synthetic", "--data-root", root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "missing images: 1" in r.stdout and "images/test/00007.jpg" in r.stdout
    assert f"candidate_test.txt:{lineno}: expected 'fid attr value'" in r.stdout


def test_cli_check_without_data_on_a_real_folder_says_which_dataset(tmp_path, asen_folder):
    root = asen_folder(str(tmp_path / "fashionai"))
    r = run("check", "--data-root", root)  # --data left out: synthetic
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {root} looks like FashionAI (ASEN's split files), not the synthetic set: "
                                             "add --data fashionai"]
