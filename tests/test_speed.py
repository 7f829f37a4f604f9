"""Tests of the fast paths: prepared image arrays (dataset_tools.py prepare) against decoding, their refusal when stale,
torch.compile's checkpoints, the counted FLOPs; then the CUDA paths, which skip without a GPU.

    python -m pytest -q tests/test_speed.py
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import runtime
import train
from cca import CCAConfig, build_model
from dataset_tools import prepare_images
from synthetic import make_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE = 24  # prepared size: the 32-px synthetic images are resized on the way, and 24 is a multiple of tiny's stride 8
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="module")
def prepared(synth, tmp_path_factory):
    """A copy of conftest.py's small synthetic set with its images prepared at SIZE px."""
    root = shutil.copytree(synth, str(tmp_path_factory.mktemp("prepared") / "s"))
    prepare_images("synthetic", root, SIZE, workers=2)  # two processes, several chunks each
    return root


@pytest.fixture
def copy(prepared, tmp_path):
    """A private copy of the prepared synthetic set, to break."""
    return shutil.copytree(prepared, str(tmp_path / "s"))


def zappos_set(root):
    """8 images of two sizes (one not square, so the crop matters) and CSN's lists, 3 triplets per condition."""
    names = [f"Shoes/Brand {i}/{i}.jpg" for i in range(8)]
    with open(os.path.join(root, "filenames.json"), "w") as f:
        f.writelines(n + "\n" for n in names)
    os.makedirs(os.path.join(root, "tripletlists"))
    for split in ("train", "val", "test"):
        for c, cond in enumerate(data.ZAPPOS_CONDITIONS):
            with open(os.path.join(root, "tripletlists", f"{cond}_tripletlist_{split}.txt"), "w") as f:
                f.writelines(f"{(k + c) % 8} {(k + c + 1) % 8} {(k + c + 2) % 8}\n" for k in range(3))
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        os.makedirs(os.path.join(root, "ut-zap50k-images", os.path.dirname(n)), exist_ok=True)
        shape = (30, 40, 3) if i % 2 else (36, 36, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(os.path.join(root, "ut-zap50k-images", n))
    return root

# -----------------------------------------------------------------------------
# prepared arrays hold exactly what decoding gives


def test_prepared_arrays_equal_read_image(prepared):
    for split in ("train", "valid", "test"):
        p = data.open_prepared("synthetic", prepared, split, SIZE)
        names = data.prepared_names("synthetic", prepared)[split]
        assert p.array.shape == (len(names), 3, SIZE, SIZE) and p.header["missing"] == p.header["unreadable"] == []
        for i, name in enumerate(names):
            assert torch.equal(p.take([i])[0], data.read_image(os.path.join(prepared, name), SIZE)), (split, i)
    assert data.open_prepared("synthetic", prepared, "train", 32) is None  # no array at 32 px: decode the files


def test_batches_from_prepared_equal_decoded(prepared):
    sampler, plain = data.training_set("synthetic", prepared, SIZE, 40, seed=1, prepared=False)
    prep = data.training_set("synthetic", prepared, SIZE, 40, seed=1)[1]
    cached = data.training_set("synthetic", prepared, SIZE, 40, seed=1, cache=True, prepared=False)[1]
    assert prep.prepared is not None and prep.images is None and plain.prepared is None and cached.images is not None
    triplets = sampler.epoch(0)
    rows = np.arange(5, 17)
    flips = torch.rand(len(rows), 3, generator=torch.Generator().manual_seed(0)) < 0.5
    assert 0 < flips.sum() < flips.numel()  # both branches of the flip are compared
    got, stored, decoded = (data.TripletBatches(triplets, s, 8).batch(rows, flips) for s in (prep, cached, plain))
    assert got[0].dtype == torch.uint8 and got[0].shape == (len(rows), 3, SIZE, SIZE)
    for k, r in enumerate(rows):
        for x, s, d, j, f in zip(got[:3], stored[:3], decoded[:3], triplets[r, :3], flips[k]):
            image = data.read_image(plain.paths[j], SIZE)
            want = image.flip(-1) if f else image
            assert torch.equal(x[k], want) and torch.equal(s[k], want) and torch.equal(d[k], want)
    assert got[3].tolist() == triplets[rows, 3].tolist()
    for i in range(2):  # whole batches with the random flips, as the loader takes them: the same from every store
        torch.manual_seed(i)
        want = data.TripletBatches(triplets, plain, 8)[i]
        torch.manual_seed(i)
        item = data.TripletBatches(triplets, prep, 8)[i]
        assert all(torch.equal(g, w) for g, w in zip(item, want))


def test_loader_workers_cut_batches_from_the_mapping(prepared):
    sampler, store = data.training_set("synthetic", prepared, SIZE, 40, seed=2)
    triplets = sampler.epoch(0)
    batches = data.TripletBatches(triplets, store, 8)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1)
    seen = 0
    for i, (a, p, n, c) in enumerate(loader):
        t = triplets[i * 8:(i + 1) * 8]
        assert a.dtype == torch.uint8 and c.tolist() == t[:, 3].tolist()
        for x, col in zip((a, p, n), range(3)):
            for k in range(8):
                image = data.read_image(store.paths[t[k, col]], SIZE)
                seen += torch.equal(x[k], image.flip(-1)) and not torch.equal(x[k], image)
                assert torch.equal(x[k], image) or torch.equal(x[k], image.flip(-1))
    assert i + 1 == len(batches) == 5 and 0 < seen < 5 * 24  # random flips, per sample
    with pytest.raises(IndexError):
        batches[5]


def test_eval_sets_from_prepared_equal_decoded(prepared, tmp_path):
    for role in ("query", "candidate"):
        prep, plain = (data.EvalItems("synthetic", prepared, "test", role, SIZE, prepared=p) for p in (True, False))
        assert prep.store.prepared is not None and len(prep) == len(plain)
        for i in range(len(prep)):
            a, b = prep[i], plain[i]
            assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    root = zappos_set(str(tmp_path))
    prepare_images("zappos", root, 16, workers=1)
    assert sorted(os.listdir(os.path.join(root, "prepared"))) == ["images_16.json", "images_16.npy"]  # one for all splits
    prep, plain = (data.ZapposEvalSet(root, "test", 16, num_triplets=12, prepared=p) for p in (True, False))
    assert prep.store.prepared is not None and len(prep) == len(plain) > 8  # an image under several conditions
    for i in range(len(prep)):
        a, b = prep[i], plain[i]
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    sampler, store = data.training_set("zappos", root, 16, 12)
    assert store.prepared is not None
    triplets = sampler.epoch(0)
    x = data.TripletBatches(triplets, store, 4).batch(np.arange(4), torch.zeros(4, 3, dtype=torch.bool))
    assert torch.equal(x[1][2], data.read_image(store.paths[triplets[2, 1]], 16))

# -----------------------------------------------------------------------------
# a stale, truncated or half-written array is refused, naming the file and the fix


def refused(root, match, split="train", size=SIZE, error=ValueError):
    with pytest.raises(error, match=match) as e:
        data.training_set("synthetic", root, size, 10) if split == "train" else \
            data.EvalItems("synthetic", root, split, "query", size)
    if error is ValueError:
        assert f"python dataset_tools.py prepare --data synthetic --data-root {root} --img-size {size}" in str(e.value)
    return str(e.value)


def test_stale_arrays_are_refused(copy):
    npy, head = data.prepared_files(copy, "train", SIZE)
    # another size: an array at 24 px under the name of 32 px
    for ext in (".npy", ".json"):
        shutil.copy(npy[:-4] + ext, os.path.join(copy, "prepared", f"train_32{ext}"))
    refused(copy, r"train_32.npy: holds images of 24 px, not 32", size=32)
    # the split's list changed: one more image listed
    with open(os.path.join(copy, "filenames_valid.txt"), "a") as f:
        f.write("images/train/00000.jpg\n")
    refused(copy, r"valid_24.npy: .*filenames_valid.txt has changed since it was made \(50 images then, 51 now\)", "valid")
    # or the same number of lines, in another order
    names = data.read_filenames(os.path.join(copy, "filenames_train.txt"))
    with open(os.path.join(copy, "filenames_train.txt"), "w") as f:
        f.writelines(n + "\n" for n in names[1:] + names[:1])
    refused(copy, "filenames_train.txt has changed")
    with open(os.path.join(copy, "filenames_train.txt"), "w") as f:
        f.writelines(n + "\n" for n in names)
    data.training_set("synthetic", copy, SIZE, 10)  # back as it was: accepted
    # made with another transform
    header = json.load(open(head))
    json.dump(dict(header, version=0), open(head, "w"))
    refused(copy, f"train_24.npy: made by another version of read_image \\(version 0, this one is {data.PREPARED_VERSION}\\)")
    json.dump(header, open(head, "w"))
    data.training_set("synthetic", copy, SIZE, 10)


def test_truncated_or_half_written_arrays_are_refused(copy, capsys):
    npy, head = data.prepared_files(copy, "train", SIZE)
    whole = open(npy, "rb").read()
    for cut in (len(whole) - 1, 50, 0):  # the last byte gone; the .npy header cut short; nothing
        with open(npy, "wb") as f:
            f.write(whole[:cut])
        refused(copy, r"train_24.npy: cannot be mapped \(truncated\?\)")
    with open(npy, "wb") as f:
        f.write(whole + bytes(10))
    refused(copy, rf"train_24.npy: {len(whole) + 10} bytes, {len(whole)} expected")
    os.remove(head)
    refused(copy, r"train_24.npy: no header .*train_24.json beside it")
    os.remove(npy)  # neither: decode the files
    assert data.training_set("synthetic", copy, SIZE, 10)[1].prepared is None
    json.dump({"version": 1}, open(head, "w"))
    refused(copy, r"train_24.json: the array .*train_24.npy is missing")
    open(npy, "w").close()
    refused(copy, r"train_24.json: not a prepared-images header \(KeyError")
    # train.py and evaluate.py turn the refusal into one error line
    with pytest.raises(SystemExit, match=r"^error: .*train_24.json: not a prepared-images header"):
        train.main(["--data-root", copy, "--img-size", str(SIZE), "--out-dir", os.path.join(copy, "run"), "--epochs", "1"])


def test_missing_and_unreadable_images(copy):
    gone, bad = os.path.join(copy, "images", "train", "00004.jpg"), os.path.join(copy, "images", "test", "00007.jpg")
    os.rename(gone, gone + ".away")
    with open(bad, "wb") as f:
        f.write(b"not a jpeg")
    prepare_images("synthetic", copy, SIZE, workers=1)
    assert json.load(open(data.prepared_files(copy, "train", SIZE)[1]))["missing"] == [4]
    # missing when prepared and still missing: left out of training, as when decoding
    sampler, store = data.training_set("synthetic", copy, SIZE, 200)
    assert store.prepared is not None and 4 not in sampler.epoch(0)[:, :3]
    # there again: the array no longer matches the images
    os.rename(gone + ".away", gone)
    refused(copy, r"train_24.npy: 1 images were missing when it was made and are there now, e.g. \[.*00004.jpg'\]")
    # an unreadable image stops evaluation (decoding would fail on it too), naming it; other splits are unaffected
    fid = data.read_filenames(os.path.join(copy, "filenames_test.txt")).index("images/test/00007.jpg")
    role = "query" if fid in data.read_items("synthetic", copy, "test", "query")[1][:, 0] else "candidate"
    with pytest.raises(OSError, match=r"1 images could not be decoded when .*test_24.npy was made, e.g. \[.*00007.jpg"):
        data.EvalItems("synthetic", copy, "test", role, SIZE)
    data.EvalItems("synthetic", copy, "valid", role, SIZE)


def test_cli_prepare_reports_by_name(tmp_path):
    root = str(tmp_path / "s")
    make_synthetic(root, num_train=30, num_query=10, num_candidate=20, size=32, workers=1)
    os.remove(os.path.join(root, "images", "valid", "00003.jpg"))
    cmd = [sys.executable, os.path.join(REPO, "dataset_tools.py"), "prepare", "--data", "synthetic", "--data-root", root,
           "--img-size", "16", "--workers", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "30/30 images" in r.stdout and "eta" in r.stdout
    assert "missing images: 1\n  " + os.path.join(root, "images", "valid", "00003.jpg") in r.stdout
    assert sorted(os.listdir(os.path.join(root, "prepared"))) == [f"{s}_16.{e}" for s in ("test", "train", "valid") for e in ("json", "npy")]
    cmd[4:7] = ["fashionai", "--data-root", str(tmp_path / "nothing")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stderr.startswith("error: fashionai: missing") and len(r.stderr.splitlines()) == 1

# -----------------------------------------------------------------------------
# train.py on prepared arrays; torch.compile's checkpoints


def run_args(root, out, *more):
    return ["--data", "synthetic", "--data-root", root, "--out-dir", str(out), "--img-size", str(SIZE), "--out-dim", "16",
            "--batch-size", "8", "--num-triplets", "16", "--eval-batch-size", "32", "--log-every", "1", "--epochs", "1", *more]


def test_training_from_prepared_arrays_equals_training_from_memory(prepared, tmp_path, capsys):
    plain = shutil.copytree(prepared, str(tmp_path / "plain"), ignore=shutil.ignore_patterns("prepared"))
    train.main(run_args(plain, tmp_path / "a", "--workers", "0", "--cache-images"))
    assert "images: train decoded once into memory; valid decoded from the image files" in capsys.readouterr().out
    train.main(run_args(prepared, tmp_path / "b", "--workers", "0"))  # the same flips, drawn in the training process
    out = capsys.readouterr().out
    assert f"images: train {prepared}/prepared/train_24.npy (prepared, memory-mapped); valid {prepared}/prepared/valid_24.npy" in out
    assert "torch.compile off, channels-last off" in out  # the CPU default
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True) for r in "ab")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_compiled_training_saves_plain_weights(prepared, tmp_path, monkeypatch, capsys):
    """train.py wraps the model with torch.compile and still saves the plain weights. The stance runs the wrapped
    model eagerly (a real compile of this step takes a minute or more on 2 CPU cores), which keeps the wrapper and
    its prefixed names."""
    if not hasattr(torch.compiler, "set_stance"):
        pytest.skip("torch.compiler.set_stance needs torch 2.6")
    wrapped, compile_ = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: wrapped.append(compile_(m, **kw)) or wrapped[-1])
    with torch.compiler.set_stance("force_eager"):
        train.main(run_args(prepared, tmp_path, "--workers", "0", "--compile"))
    assert "torch.compile on" in capsys.readouterr().out and len(wrapped) == 1
    assert all(k.startswith("_orig_mod.") for k in wrapped[0].state_dict())  # what saving the wrapper would give
    for name in ("best.pt", "last.pt"):
        ckpt = torch.load(tmp_path / name, weights_only=True)
        model = build_model(CCAConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"], strict=True)
        assert ckpt["args"]["compile"] is True

# -----------------------------------------------------------------------------
# FLOPs and MFU


def test_training_flops_match_a_count_by_hand():
    """FlopCounterMode's count against one written out from the layers' shapes: 2 FLOPs per multiply-add; the
    backward pass twice the forward, but the first convolution's, which needs no gradient of the images."""
    cfg = CCAConfig(arch="tiny", img_size=32, num_conditions=5, out_dim=16)
    model, (B, img), hand = build_model(cfg), (3, 32), []

    def count(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            hand.append(2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            hand.append(2 * out.numel() * m.in_features)

    for m in model.modules():
        m.register_forward_hook(count)
    with torch.no_grad():
        x = model.trunk(torch.zeros(B, 3, img, img))
        model.embed_tokens(x, model.condition(torch.zeros(B, dtype=torch.long))[:, None])
    first_conv = hand[0]
    N, D = x.shape[1], cfg.sizes["embed_dim"]
    hand.append(len(model.blocks[:-1]) * 4 * B * N * N * D)  # self-attention: QK^T and AV
    hand.append(2 * B * D * D + 2 * B * N * 2 * D * D + 4 * B * 1 * N * D)  # block L: q_c's query, the keys and values, attention
    forward = sum(hand)
    assert runtime.training_flops(cfg) * B == 3 * forward - first_conv


def test_gpu_peaks_by_name(monkeypatch):
    for name, want in (("NVIDIA H100 80GB HBM3", ("H100 SXM 989 TFLOP/s dense bf16", 989e12)), ("NVIDIA H100 PCIe", ("H100 PCIe 756 TFLOP/s dense bf16", 756e12)),
                       ("NVIDIA H100 NVL", ("H100 NVL 835 TFLOP/s dense bf16", 835e12)), ("NVIDIA H200", ("H200 SXM 989 TFLOP/s dense bf16", 989e12)),
                       ("NVIDIA A100-SXM4-80GB", ("A100 312 TFLOP/s dense bf16", 312e12)), ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert runtime.gpu_peak("cuda") == want, name

# -----------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@cuda
@pytest.mark.parametrize("method", ["cca", "triplet"])
def test_cuda_flash_attention_in_every_block(method):
    """Under bf16 autocast every attention call, block L's cross-attention included, runs flash attention: with the
    other kernels switched off a call that cannot use it raises."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = build_model(CCAConfig(img_size=224, method=method)).cuda()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    a, p, n = torch.randint(0, 256, (3, 2, 3, 224, 224), dtype=torch.uint8, device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss, _ = train.train_step(train.Objective(model, 0.2), opt, a, p, n, torch.tensor([0, 3], device="cuda"), True)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            assert model.embed_all(data.normalise(a)).shape == (2, 8, 1024)
    assert torch.isfinite(loss)


@cuda
def test_cuda_compiled_and_channels_last_steps_match_eager():
    torch.manual_seed(0)
    cfg = CCAConfig(arch="tiny", img_size=64, num_conditions=5, out_dim=32)
    models = [build_model(cfg).cuda() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, fused=True) for m in models]
    a, p, n = torch.randint(0, 256, (3, 8, 3, 64, 64), dtype=torch.uint8, device="cuda")
    c = torch.randint(0, 5, (8,), device="cuda")
    steps = [train.Objective(models[0], 0.2), torch.compile(train.Objective(models[1], 0.2)),
             train.Objective(models[2], 0.2, channels_last=True)]
    losses = [train.train_step(s, o, a, p, n, c, True)[0] for s, o in zip(steps, opts)]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=0.05, atol=0.01)
    for k, v in models[0].state_dict().items():
        for m in models[1:]:
            torch.testing.assert_close(m.state_dict()[k], v, rtol=0.05, atol=0.01, msg=k)


@cuda
def test_cuda_training_compiles_reports_mfu_and_saves_plain_weights(prepared, tmp_path, capsys):
    train.main(run_args(prepared, tmp_path, "--device", "cuda", "--workers", "1", "--channels-last"))
    out = capsys.readouterr().out
    assert "torch.compile on, channels-last on" in out and "GFLOPs per training image (counted)" in out
    if runtime.gpu_peak(torch.device("cuda")):
        assert " mfu " in out
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    build_model(CCAConfig(**ckpt["config"])).load_state_dict(ckpt["model"], strict=True)
