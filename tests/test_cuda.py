"""CUDA-only checks of the training step replayed from CUDA graphs (train.py --compile-mode reduce-overhead): the
graphed step against the eager one, and a graphed run resumed. They skip on a machine without a GPU (CI).

    python -m pytest -q tests/test_cuda.py          # on a GPU machine
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import decode
import train
from data import read_image
from synthetic import draw_garment

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs)")


def test_the_graphed_step_follows_the_eager_step_within_bf16():
    losses, apart, moved = bench.check_graphs("tiny", 64, 8, torch.device("cuda"))
    for eager, graphed in zip(losses["eager"], losses["graphed"]):
        assert graphed == pytest.approx(eager, rel=2e-2, abs=1e-3)  # bf16 autocast: fused and unfused round apart
    assert apart <= 0.1 * moved  # the head's weights went the same way: apart a small part of how far they moved


def test_a_resumed_graphed_run_continues_as_the_uninterrupted_one(synth120, tmp_path, capsys):
    flags = ["--data", "synthetic", "--data-root", synth120, "--img-size", "32", "--out-dim", "16", "--batch-size", "8",
             "--num-triplets", "32", "--workers", "0", "--log-every", "1", "--device", "cuda", "--compile",
             "--compile-mode", "reduce-overhead", "--eval-every", "100"]

    def losses(out):
        found = (re.search(r"epoch (\d+)/2 step (\d+)/\d+ loss (\S+)", line) for line in out.splitlines())
        return {m.group(1, 2): float(m.group(3)) for m in found if m}

    train.main(flags + ["--epochs", "2", "--out-dir", str(tmp_path / "full")])
    full = losses(capsys.readouterr().out)
    train.main(flags + ["--epochs", "1", "--out-dir", str(tmp_path / "cut")])
    capsys.readouterr()
    train.main(["--resume", str(tmp_path / "cut" / "last.pt"), "--epochs", "2", "--compile", "--compile-mode", "reduce-overhead"])
    resumed = losses(capsys.readouterr().out)
    assert len(resumed) == 4 and {e for e, _ in resumed} == {"2"}
    for k, v in resumed.items():
        assert v == pytest.approx(full[k], rel=1e-3, abs=1e-4)  # the printed 4 decimals, within GPU atomics' jitter


@pytest.mark.skipif(decode.batched_decoder() is None, reason="needs TorchCodec or torchvision")
def test_gpu_decoded_crops_match_read_image_within_the_bound(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate((512, 300, 640)):
        paths.append(str(tmp_path / f"{i}.jpg"))
        draw_garment([i, i, i, i, i], rng, size=size, zoom=1).save(paths[-1], quality=90)
    Image.open(paths[0]).convert("CMYK").save(tmp_path / "cmyk.jpg")  # not given to nvJPEG: read_image's pixels
    (tmp_path / "bad.jpg").write_bytes(open(paths[0], "rb").read()[:600])
    paths += [str(tmp_path / "cmyk.jpg"), str(tmp_path / "bad.jpg")]
    items = [decode.FileBytes(paths)[i] for i in range(len(paths))]
    images, _, why = decode.decode_batch(items, 224, "cuda", decode.batched_decoder())
    assert images.device.type == "cuda" and [bool(w) for w in why] == [False] * 4 + [True]
    for p, x in zip(paths[:4], images.cpu()):
        diff = (x.int() - read_image(p, 224).int()).abs().float().mean()
        assert diff <= decode.MEAN_BOUND and (diff == 0) == p.endswith("cmyk.jpg"), (p, float(diff))
