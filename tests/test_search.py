"""Tests of search.py: the index equals embed_all, planted nearest items come first under one and two attributes,
a two-rank torchrun index equals a one-process one, and the errors a user meets are one clear line.

A tiny CCA (arch "tiny", 32 px, out_dim 16) with random weights, saved as a train.py checkpoint.

    python -m pytest -q tests/test_search.py
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

import decode
import search
import visualize
from cca import CCA, CCAConfig
from data import load_image, load_meta, read_filenames, read_image, read_labels
from synthetic import draw_garment, make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ATTRS = ["sleeve_length", "length", "neckline", "colour", "pattern"]  # the synthetic set's, for the labelled gallery


def save_checkpoint(path, seed, meta):
    torch.manual_seed(seed)
    model = CCA(CCAConfig(arch="tiny", num_conditions=len(meta["attributes"]), img_size=32, out_dim=16)).eval()
    torch.save(dict(model=model.state_dict(), config=asdict(model.cfg), meta=meta, args={"data_root": None}, epoch=0), path)
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    synth = str(root / "synthetic")
    make_synthetic(synth, num_train=20, num_query=4, num_candidate=12, seed=0, size=32, workers=1)
    meta = load_meta("synthetic", synth)
    gallery = root / "gallery"
    os.makedirs(gallery / "sub")
    rng = np.random.default_rng(0)
    for i in range(12):  # 12 images, some in a subfolder, and one that is not an image: 13 files
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(gallery / ("sub" if i % 3 else "") / f"{i:02d}.png")
    (gallery / "sub" / "broken.jpg").write_bytes(b"not an image")
    (gallery / "notes.txt").write_text("not listed: no image extension")
    ckpt, other = str(root / "best.pt"), str(root / "other.pt")
    model = save_checkpoint(ckpt, 0, meta)
    save_checkpoint(other, 1, meta)
    return dict(root=root, synth=synth, meta=meta, gallery=str(gallery), ckpt=ckpt, other=other, model=model)


def quiet(*a):
    pass


def test_index_equals_embed_all_and_leaves_out_what_it_cannot_read(env, tmp_path):
    paths = search.gallery_paths(env["gallery"])
    assert len(paths) == 13 and paths == sorted(paths) and not any(p.endswith(".txt") for p in paths)
    logs = []
    index = search.build_index(env["model"], paths, str(tmp_path / "g.idx"), env["meta"], batch_size=5, workers=0,
                               log=logs.append, log_every=0)
    good = [p for p in paths if not p.endswith("broken.jpg")]
    assert index.paths == good and [p for p, _ in index.failed] == [os.path.join(env["gallery"], "sub", "broken.jpg")]
    assert index.embeddings.shape == (5, 12, 16) and index.embeddings.dtype == np.float16
    with torch.no_grad():
        want = env["model"].embed_all(torch.stack([load_image(p, 32) for p in good]))  # (12, K, D)
    torch.testing.assert_close(torch.from_numpy(np.array(index.embeddings)).float(), want.transpose(0, 1).half().float(),
                               atol=1e-3, rtol=0)
    assert index.checkpoint["sha256"] == search.weights_sha256(env["model"]) and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert any("img/s" in line and "eta" in line for line in logs)
    assert any("broken.jpg" in line for line in logs)
    # the file: no pickle, the header is JSON at the end, the vectors at byte 64 in (K, N, D) order
    raw = open(tmp_path / "g.idx", "rb").read()
    assert raw[:8] == raw[-8:] == b"CCAINDEX"
    assert np.array_equal(np.frombuffer(raw[64:64 + 2 * 16], dtype="<f2"), np.array(index.embeddings[0, 0]))


def test_planted_duplicate_comes_first_under_one_and_two_attributes(env, tmp_path):
    paths = search.gallery_paths(env["gallery"])[:12]
    shutil.copy(paths[4], tmp_path / "copy.png")  # the same pixels under another name: a planted nearest item
    index = search.build_index(env["model"], paths + [str(tmp_path / "copy.png")], str(tmp_path / "g.idx"), env["meta"],
                               batch_size=4, workers=0, log=quiet)
    q = search.embed_image(env["model"], paths[4])
    for attrs in (["colour"], ["sleeve_length", "pattern"]):
        hits = search.query(index, q, attrs, topk=3, exclude=[4])
        assert hits[0]["path"] == str(tmp_path / "copy.png") and hits[0]["index"] == 12
        assert hits[0]["score"] == pytest.approx(len(attrs), abs=2e-3)  # cosine 1 under each attribute
        assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
        assert 4 not in [h["index"] for h in hits]  # excluded


def test_weighted_sum_of_cosines_on_vectors_made_by_hand(tmp_path):
    e = np.eye(4, dtype=np.float32)
    mixed0, mixed1 = np.array([0.6, 0.8, 0, 0]), np.array([0, 0.6, 0.8, 0])
    # query: e0 under attribute a, e1 under attribute b. Item 0 matches under a only, item 1 under b only, item 2
    # is fairly close under both (0.6 and 0.6), item 3 matches nothing.
    emb = np.stack([np.stack([e[0], e[2], mixed0, e[3]]), np.stack([e[3], e[1], mixed1, e[0]])])  # (K=2, N=4, D=4)
    index = search.write_index(str(tmp_path / "h.idx"), emb, ["i0", "i1", "i2", "i3"], ["a", "b"], [["x", "y"], ["u", "v"]],
                               labels=[[0, -1], [1, 0], [0, 1], [-1, -1]])
    q = np.stack([e[0], e[1]])
    top = lambda attrs, w=None: [(h["path"], round(h["score"], 3)) for h in search.query(index, q, attrs, w, topk=4)]  # noqa: E731
    assert top(["a"])[:2] == [("i0", 1.0), ("i2", 0.6)]
    assert top(["b"])[:2] == [("i1", 1.0), ("i2", 0.6)]
    assert top(["a", "b"])[:3] == [("i2", 1.2), ("i0", 1.0), ("i1", 1.0)]  # ties keep the gallery's order
    assert top(["a", "b"], [1, 0.5])[:3] == [("i0", 1.0), ("i2", 0.9), ("i1", 0.5)]
    assert top(["a", "b"], [-1, 0])[0] == ("i1", 0.0)  # a negative weight ranks the least similar first
    hit = search.query(index, q, ["a", "b"], topk=1)[0]
    assert hit["values"] == {"a": "x", "b": "v"} and hit["cosines"] == pytest.approx({"a": 0.6, "b": 0.6}, abs=1e-3)
    assert search.query(index, q, ["b"], topk=4)[3]["values"] == {"b": None}  # unlabelled: None


def test_two_pass_query_ranks_as_float32_does(tmp_path):
    # 3,000 items in 4 dimensions: many scores closer together than float16 resolves, so the first pass alone
    # would misorder them; the second must give exactly the float32 ranking (ties by index)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(3, 3000, 4, generator=g), dim=-1)
    emb[:, 17] = emb[:, 5]  # an exact tie
    index = search.write_index(str(tmp_path / "r.idx"), emb.numpy(), [str(i) for i in range(3000)], ["a", "b", "c"], [[], [], []])
    q = torch.nn.functional.normalize(torch.from_numpy(np.array(index.embeddings[:, 5])).float(), dim=-1)  # item 5 (and 17) best
    for attrs, w in ((["a"], None), (["a", "c"], [1.0, -0.3])):
        hits = search.query(index, q, attrs, w, topk=50, exclude=[3])
        ids = [index.attributes.index(a) for a in attrs]
        e = torch.from_numpy(np.array(index.embeddings[ids])).float()  # (A, N, D)
        exact = ((torch.tensor(w or [1.0])[:, None] * torch.einsum("and,ad->an", e, q[ids])).sum(0))
        exact[3] = -float("inf")
        want = torch.sort(exact, descending=True, stable=True).indices[:50].tolist()
        assert [h["index"] for h in hits] == want
        assert [h["score"] for h in hits] == pytest.approx(exact[want].tolist(), abs=1e-6)
    assert [h["index"] for h in search.query(index, q, ["b"], topk=2)] == [5, 17]


def test_labelled_split_gallery_shows_value_names(env, tmp_path, capsys):
    out, png = str(tmp_path / "test.idx"), str(tmp_path / "s.png")
    search.main(["index", "--ckpt", env["ckpt"], "--data-root", env["synth"], "--split", "test", "--out", out, "--workers", "0"])
    names = read_filenames(os.path.join(env["synth"], "filenames_test.txt"))
    assert "wrote" in capsys.readouterr().out
    image = os.path.join(env["synth"], names[3])
    search.main(["query", "--index", out, "--ckpt", env["ckpt"], "--image", image, "--attr", "colour", "--attr", "length",
                 "--weight", "1", "--weight", "0.5", "--topk", "4", "--json", "--out", png])
    got = json.loads(capsys.readouterr().out)
    # the split's labels: each test image is listed under one attribute, as a query or a candidate
    labels = {}
    for lst in ("query_test.txt", "candidate_test.txt"):
        for fid, a, v in read_labels(os.path.join(env["synth"], lst), len(names), env["meta"]):
            labels[os.path.normpath(os.path.join(env["synth"], names[fid]))] = (ATTRS[a], env["meta"]["values"][a][v])
    assert len(got["results"]) == 4 and image not in [r["path"] for r in got["results"]]  # the query is left out
    for r in got["results"]:
        a, name = labels[r["path"]]
        want = {x: (name if x == a else None) for x in ("colour", "length")}
        assert r["values"] == want
        assert r["score"] == pytest.approx(r["cosines"]["colour"] + 0.5 * r["cosines"]["length"], abs=1e-5)
    a, name = labels[os.path.normpath(image)]
    assert got["query_values"] == {x: (name if x == a else None) for x in ("colour", "length")}
    with Image.open(png) as im:  # width PAD + side + SEP + k (side + PAD), height 3 PAD + (A + 2) LINE + side
        side = visualize.panel_side(32)
        assert im.size == (visualize.PAD + side + visualize.SEP + 4 * (side + visualize.PAD),
                           3 * visualize.PAD + 4 * visualize.LINE + side)
    search.main(["query", "--index", out, "--ckpt", env["ckpt"], "--image", image, "--attr", "colour", "--topk", "2"])
    text = capsys.readouterr().out
    assert "rank" in text and "score" in text and "colour" in text and len(text.strip().split("\n")) == 4


def test_two_rank_torchrun_index_equals_one_process(env, tmp_path):
    one, two = str(tmp_path / "one.idx"), str(tmp_path / "two.idx")
    common = ["index", "--ckpt", env["ckpt"], "--images", env["gallery"], "--device", "cpu", "--workers", "0", "--batch-size", "2"]
    search.main(common + ["--out", one])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(REPO, "search.py")] + common + ["--out", two],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = search.read_index(one), search.read_index(two)
    assert a.paths == b.paths and a.failed == b.failed and len(a.failed) == 1  # 13 images: shards of 7 and 6
    torch.testing.assert_close(torch.from_numpy(np.array(b.embeddings)).float(),
                               torch.from_numpy(np.array(a.embeddings)).float(), atol=1e-3, rtol=0)
    assert a.checkpoint == b.checkpoint


def test_errors_are_one_line(env, tmp_path):
    idx = str(tmp_path / "g.idx")
    paths = search.gallery_paths(env["gallery"])[:3]
    search.build_index(env["model"], paths, idx, env["meta"], workers=0, log=quiet)
    base = ["query", "--index", idx, "--image", paths[0], "--attr"]

    def fails(argv, match):
        with pytest.raises(SystemExit, match=match) as e:
            search.main(argv)
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)

    fails(base + ["hat", "--ckpt", env["ckpt"]], "unknown attribute 'hat'; the model knows: sleeve_length, length, neckline")
    fails(base + ["colour", "--ckpt", env["other"]], "built with another checkpoint")
    fails(base + ["colour", "--attr", "length", "--weight", "2", "--ckpt", env["ckpt"]], "2 attributes")
    fails(["query", "--index", str(tmp_path / "none.idx"), "--image", paths[0], "--attr", "colour", "--ckpt", env["ckpt"]],
          "index not found")
    with open(idx, "rb") as f:
        (tmp_path / "cut.idx").write_bytes(f.read()[:-5])
    fails(["query", "--index", str(tmp_path / "cut.idx"), "--image", paths[0], "--attr", "colour", "--ckpt", env["ckpt"]],
          "not a search.py index, or truncated")
    os.makedirs(tmp_path / "empty")
    fails(["index", "--ckpt", env["ckpt"], "--images", str(tmp_path / "empty"), "--out", idx, "--workers", "0"], "no images")
    (tmp_path / "empty.txt").write_text("\n")
    fails(["index", "--ckpt", env["ckpt"], "--images", str(tmp_path / "empty.txt"), "--out", idx, "--workers", "0"], "empty")
    (tmp_path / "bad.txt").write_text("sub/broken.jpg\nmissing.png\n")
    shutil.copytree(os.path.join(env["gallery"], "sub"), tmp_path / "sub")
    fails(["index", "--ckpt", env["ckpt"], "--images", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "bad.idx"),
           "--workers", "0"], "none of the 2 images could be read")
    assert not os.path.exists(tmp_path / "bad.idx") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_query_on_the_gpu_equals_the_cpu(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(3, 500, 32), dim=-1).numpy()
    index = search.write_index(str(tmp_path / "r.idx"), emb, [str(i) for i in range(500)], ["a", "b", "c"], [[], [], []])
    q = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    cpu = search.query(index, q, ["a", "c"], topk=20)
    gpu = search.query(index, q, ["a", "c"], topk=20, device="cuda")
    assert [h["index"] for h in cpu[:5]] == [h["index"] for h in gpu[:5]]
    assert [h["score"] for h in gpu] == pytest.approx([h["score"] for h in cpu], abs=2e-3)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A gallery of what a catalogue holds: JPEGs of several sizes (a progressive and a greyscale one among them), a
    PNG, a CMYK JPEG, a corrupt JPEG and a text file named .jpg. Returns (paths, the two unreadable ones)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    paths = []
    for i, (size, kw) in enumerate([(512, {}), (300, {}), (64, {}), (200, dict(progressive=True)), (96, {})]):
        im = draw_garment([i % 4, i % 4, i % 4, i % 6, i % 4], rng, size=size, zoom=1)
        paths.append(str(root / f"{i}.jpg"))
        im.save(paths[-1], quality=90, **kw)
    Image.open(paths[0]).convert("L").save(root / "grey.jpg", quality=90)
    Image.open(paths[1]).save(root / "p.png")
    Image.open(paths[1]).convert("CMYK").save(root / "cmyk.jpg", quality=90)
    (root / "corrupt.jpg").write_bytes(open(paths[0], "rb").read()[:600])  # a header, then nothing
    (root / "text.jpg").write_text("not an image")
    paths += [str(root / f) for f in ("grey.jpg", "p.png", "cmyk.jpg", "corrupt.jpg", "text.jpg")]
    return paths, paths[-2:]


def test_jpeg_components_tells_what_the_batched_decoder_is_given(mixed):
    paths, _ = mixed
    parts = {os.path.basename(p): decode.jpeg_components(open(p, "rb").read()) for p in paths}
    assert parts == {"0.jpg": 3, "1.jpg": 3, "2.jpg": 3, "3.jpg": 3, "4.jpg": 3, "grey.jpg": 1, "p.png": None,
                     "cmyk.jpg": 4, "corrupt.jpg": 3, "text.jpg": None}


@pytest.mark.skipif(decode.batched_decoder() is None, reason="needs TorchCodec or torchvision")
def test_batched_decoding_falls_back_per_image_and_matches_read_image_within_the_bound(mixed, env, tmp_path):
    paths, bad = mixed
    decoder = decode.batched_decoder()
    for S in (32, 224):
        items = [decode.FileBytes(paths)[i] for i in range(len(paths))]
        images, idx, why = decode.decode_batch(items, S, "cpu", decoder)  # the batch fails on corrupt.jpg: one by one
        assert images.shape == (len(paths), 3, S, S) and images.dtype == torch.uint8 and idx.tolist() == list(range(len(paths)))
        assert [p for p, w in zip(paths, why) if w] == bad and all(p in w for p, w in zip(paths, why) if w)
        jpeg_diffs = []
        for p, x in zip(paths, images):
            if p in bad:
                assert not x.any()
                continue
            diff = (x.int() - read_image(p, S).int()).abs().float().mean()
            # PNG and CMYK go to read_image itself: the same pixels; JPEGs within the stated bound
            assert diff == 0 if p.endswith(("png", "cmyk.jpg")) else diff <= decode.MEAN_BOUND, (p, S, float(diff))
            jpeg_diffs += [] if p.endswith(("png", "cmyk.jpg")) else [diff]
        assert max(jpeg_diffs) > 0  # the JPEGs did come from the batched decoder, not from read_image
    # the index from batched decoding leaves out the same two files, and its vectors are the model's of those crops
    logs = []
    index = search.build_index(env["model"], paths, str(tmp_path / "b.idx"), env["meta"], batch_size=4, workers=0,
                               log=logs.append, decoder=decoder)
    plain = search.build_index(env["model"], paths, str(tmp_path / "p.idx"), env["meta"], batch_size=4, workers=0, log=logs.append)
    assert index.paths == plain.paths == [p for p in paths if p not in bad]
    assert [p for p, _ in index.failed] == [p for p, _ in plain.failed] == bad
    cos = (torch.from_numpy(np.array(index.embeddings)).float() * torch.from_numpy(np.array(plain.embeddings)).float()).sum(-1)
    assert cos.min() > 0.98  # random weights, unit vectors: the crops' small differences move them little
