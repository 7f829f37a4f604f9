"""End-to-end tests of train.py, evaluate.py and visualize.py's command on a small synthetic dataset (CPU, 32 px, tiny model)."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import evaluate
import train
import visualize
from cca import CCA, CCAConfig, build_model
from data import ASEN_FILES, normalise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def common(root, out):
    return ["--data", "synthetic", "--data-root", root, "--out-dir", str(out), "--img-size", "32", "--out-dim", "16",
            "--batch-size", "8", "--num-triplets", "16", "--workers", "0", "--eval-batch-size", "32", "--log-every", "1"]


def test_two_steps_write_checkpoints_that_evaluate_scores(synth120, tmp_path, capsys):
    train.main(common(synth120, tmp_path) + ["--epochs", "1"])
    log = capsys.readouterr().out
    assert "step 2/2" in log and "total (query-weighted" in log
    best = torch.load(tmp_path / "best.pt", weights_only=True)  # plain types only: loads with weights_only
    assert set(best) >= {"model", "optimizer", "epoch", "best_metric", "config", "meta", "args"}
    assert best["epoch"] == 0 and best["meta"]["name"] == "synthetic"
    assert os.path.isfile(tmp_path / "last.pt") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    # evaluate.py rebuilds model and data from the checkpoint alone and gives the validation numbers again
    assert "without --pretrained" not in log  # the demo trains from scratch by design: no warning
    result = evaluate.main(["--ckpt", str(tmp_path / "best.pt"), "--split", "valid", "--workers", "0", "--json", str(tmp_path / "r.json")])
    assert result["total"] == pytest.approx(best["best_metric"], abs=1e-9)
    saved = json.load(open(tmp_path / "r.json"))
    assert set(saved["per_attribute"]) <= set(best["meta"]["attributes"]) and 0 <= saved["chance"] < 1
    test = evaluate.main(["--ckpt", str(tmp_path / "best.pt"), "--workers", "0"])
    assert 0 < test["total"] <= 1 and test["num_queries"] == 20
    # the pictures, as a user reaches them: visualize.py's command
    img = os.path.join(synth120, "images", "test", "00000.jpg")
    ckpt = str(tmp_path / "best.pt")
    drawn = visualize.main(["--ckpt", ckpt, "--workers", "0", "--out", str(tmp_path / "fig"), "--attention", img,
                            "--retrieve", img, "--attr", "colour", "--topk", "3", "--embeddings", "--compare", ckpt])
    assert sorted(os.listdir(tmp_path / "fig")) == ["attention_00000.png", "embeddings.png", "retrieval_00000_colour.png"]
    assert len(drawn["retrieval"]) == 3 and set(drawn["embeddings"]["CCA (Type-2)"]) == set(best["meta"]["attributes"])
    with pytest.raises(SystemExit, match="valid attributes"):
        visualize.main(["--ckpt", ckpt, "--workers", "0", "--out", str(tmp_path / "fig"), "--retrieve", img, "--attr", "hat"])
    # the pictures embed the split once, with embed_split: the same scores as evaluate.py's
    model, _ = evaluate.load_checkpoint(ckpt)
    both = evaluate.split_map(*evaluate.embed_split(model, best["meta"], synth120, "test", 32, torch.device("cpu"), workers=0))
    assert both == test
    with pytest.raises(SystemExit):
        visualize.main(["--ckpt", ckpt, "--workers", "0", "--compare", ckpt])  # --compare without --embeddings
    assert "--compare draws beside --embeddings" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        visualize.main(["--ckpt", ckpt])  # no picture asked for
    assert e.value.code == 2 and "nothing to draw" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", ckpt, "--attention", img])  # scoring only: the picture flags are visualize.py's
    assert e.value.code == 2 and "unrecognized arguments: --attention" in capsys.readouterr().err


def test_resume_continues_like_an_uninterrupted_run(synth120, tmp_path, capsys):
    train.main(common(synth120, tmp_path / "straight") + ["--epochs", "2"])
    train.main(common(synth120, tmp_path / "split") + ["--epochs", "1"])
    train.main(common(synth120, tmp_path / "split") + ["--epochs", "2", "--resume", str(tmp_path / "split" / "last.pt")])
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    assert b["optimizer"]["state"][0]["step"] == 4  # Adam's state came back: 2 epochs of 2 steps
    assert [h["epoch"] for h in b["history"]] == [0, 1]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6, msg=k)
    # an optimizer state that does not fit the model (one parameter group where train.py has two): one line
    groups = b["optimizer"]["param_groups"]
    b["optimizer"]["param_groups"] = [dict(groups[1], params=groups[0]["params"] + groups[1]["params"])]
    torch.save(b, tmp_path / "split" / "other.pt")
    with pytest.raises(SystemExit, match="other.pt: its optimizer state does not fit the model"):
        train.main(common(synth120, tmp_path / "split") + ["--epochs", "3", "--resume", str(tmp_path / "split" / "other.pt")])
    # a flag that shapes the model, given with --resume, must agree with the checkpoint: an error naming both values
    last = str(tmp_path / "split" / "last.pt")
    for flag, given, saved in (("--arch", "vit_r50_b16", "tiny"), ("--img-size", "64", "32"), ("--out-dim", "32", "16"),
                               ("--method", "csn", "cca"), ("--condition-type", "1", "2")):
        argv = common(synth120, tmp_path / "split")
        for f in ("--img-size", "--out-dim"):  # leave out common()'s values of these two
            i = argv.index(f)
            argv = argv[:i] + argv[i + 2:]
        with pytest.raises(SystemExit, match=re.escape(f"error: {flag} {given} conflicts with {last}, trained with {flag} {saved}")):
            train.main(argv + ["--epochs", "3", "--resume", last, flag, given])
    capsys.readouterr()
    # a finished run: nothing to do, said so, exit 0, and no "done in 0:00:00"
    train.main(common(synth120, tmp_path / "split") + ["--epochs", "2", "--resume", last])
    out = capsys.readouterr().out
    assert f"{last} has finished epoch 2, and --epochs is 2: nothing left to do" in out and "done in" not in out
    assert torch.load(last, weights_only=True)["history"] == b["history"]  # untouched


def test_resume_takes_its_data_recipe_and_folder_from_the_checkpoint(synth120, tmp_path, capsys, monkeypatch):
    """--resume alone: the run's --data-root, --num-triplets, recipe and --out-dir come from the checkpoint (never the
    defaults, which would train on other data and overwrite another run's files); --epochs may be given anew."""
    run = tmp_path / "run"
    train.main(common(synth120, run) + ["--epochs", "1", "--lr", "3e-4", "--margin", "0.15"])
    monkeypatch.chdir(tmp_path)  # the defaults would be data/synthetic and runs/synthetic here
    train.main(["--resume", str(run / "last.pt"), "--epochs", "2"])
    out = capsys.readouterr().out
    assert "2 steps of 8 triplets per epoch" in out and "epoch 2/2 step 2/2" in out  # 16 triplets of 8, not the demo's
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "data")
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and (ckpt["args"]["lr"], ckpt["args"]["margin"], ckpt["args"]["data_root"]) == (3e-4, 0.15, synth120)
    with pytest.raises(SystemExit, match=r"error: --margin 0.2 conflicts with .*last.pt, trained with --margin 0.15"):
        train.main(["--resume", str(run / "last.pt"), "--epochs", "3", "--margin", "0.2"])


def test_torchrun_two_ranks_gloo(synth120, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *common(synth120, tmp_path), "--epochs", "1", "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # one try: a teardown abort is a bug
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on 2 rank(s)" in r.stdout and "total (query-weighted" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("validation after epoch 1") == 1, r.stdout[-3000:]  # printed by rank 0 only
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    model = CCA(CCAConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # saved unwrapped: no "module." prefix


def ddp_step_worker(rank, init_file, batch, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = CCA(CCAConfig(arch="tiny", num_conditions=3, img_size=32, out_dim=16))
    ddp = torch.nn.parallel.DistributedDataParallel(train.Objective(model, 0.2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    half = [t[rank * 4:(rank + 1) * 4] for t in batch]
    train.train_step(ddp, opt, *half, use_amp=False)
    if rank == 0:
        torch.save(model.state_dict(), out)
    dist.destroy_process_group()


def test_ddp_step_on_two_ranks_equals_one_process_with_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    batch = [torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8) for _ in range(3)] + [torch.randint(0, 3, (8,), generator=g)]
    mp.spawn(ddp_step_worker, args=(str(tmp_path / "pg"), batch, str(tmp_path / "ddp.pt")), nprocs=2)
    torch.manual_seed(0)
    model = CCA(CCAConfig(arch="tiny", num_conditions=3, img_size=32, out_dim=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # SGD, not Adam: Adam's first step is about lr * sign(g), which turns float noise in near-zero
    # gradient entries into full-size differences; SGD keeps the parameters linear in the averaged gradient
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train.train_step(train.Objective(model, 0.2), opt, *batch, use_amp=False)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, before[k]))
    assert moved > 10  # the step did change the weights


def gather_worker(rank, init_file, n, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    idx = torch.tensor(evaluate.shard(n, rank, 2))
    feats = torch.stack([idx.float(), -idx.float()], 1)  # each row names its item
    gathered = evaluate.gather_by_index(feats, idx, n)
    if rank == 0:
        torch.save(gathered, out)
    dist.destroy_process_group()


def test_gather_by_index_on_uneven_shards_puts_every_item_back_once(tmp_path):
    n = 7  # rank 0 embeds 4 items, rank 1 three: rank 1's shard is padded for the all-gather
    mp.spawn(gather_worker, args=(str(tmp_path / "pg"), n, str(tmp_path / "g.pt")), nprocs=2)
    gathered = torch.load(tmp_path / "g.pt", weights_only=True)
    expected = torch.stack([torch.arange(n).float(), -torch.arange(n).float()], 1)
    assert torch.equal(gathered, expected)


def test_a_nan_loss_stops_the_run_before_any_checkpoint(synth120, tmp_path, monkeypatch):
    real = train.triplet_loss

    def nan_loss(a, p, n, margin):
        loss, acc = real(a, p, n, margin)
        return loss * float("nan"), acc

    monkeypatch.setattr(train, "triplet_loss", nan_loss)
    with pytest.raises(SystemExit, match=re.escape("error: the loss is not finite (nan or inf) at epoch 1 step 1: stopped")):
        train.main(common(synth120, tmp_path) + ["--epochs", "1"])
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


def test_a_nan_between_progress_lines_is_caught_at_its_step_and_never_saved(synth120, tmp_path, monkeypatch):
    real, calls = train.triplet_loss, []

    def nan_on_step_6(a, p, n, margin):  # step 6 of 8, between the progress lines of steps 4 and 8
        loss, acc = real(a, p, n, margin)
        calls.append(1)
        return loss * float("nan") if len(calls) == 6 else loss, acc

    monkeypatch.setattr(train, "triplet_loss", nan_on_step_6)
    args = common(synth120, tmp_path) + ["--epochs", "2", "--num-triplets", "32", "--log-every", "4"]  # 4 steps an epoch
    with pytest.raises(SystemExit, match=re.escape("error: the loss is not finite (nan or inf) at epoch 2 step 2: stopped")):
        train.main(args)
    last = torch.load(tmp_path / "last.pt", weights_only=True)  # epoch 1's, from before the nan
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["model"].values())
    assert len(calls) == 8  # stopped at the next progress line, step 4 of epoch 2, without another checkpoint


def test_triplet_loss_is_eq9_with_cosine_distance():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8], [1.0, 0.0]])  # cos 0.6, 1.0
    n = torch.tensor([[0.8, 0.6], [0.0, 1.0]])  # cos 0.8, 0.0
    loss, acc = train.triplet_loss(a, p, n, margin=0.2)
    # max(0, 0.8 - 0.6 + 0.2) = 0.4 and max(0, 0 - 1 + 0.2) = 0
    assert loss.item() == pytest.approx(0.2) and acc.item() == 0.5


def test_csn_loss_with_its_regularisers_equals_the_written_out_form():
    torch.manual_seed(0)
    model = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method="csn"))
    a, p, n = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8) for _ in range(3))
    c = torch.tensor([0, 3, 3, 1])
    # CSN's form (its main.py and csn.py): each image of the triplet embedded on its own; the Frobenius norm of a
    # (B, d) batch of unmasked embeddings over sqrt(B), averaged over the three; the L1 norm of the masks over B
    with torch.no_grad():
        E = [model.head(model.norm(model.blocks[-1](model.trunk(normalise(t))))[:, 0]) for t in (a, p, n)]
        mask = torch.relu(model.condition.mask[c])
        fa, fp, fn = (F.normalize(e * mask, dim=-1) for e in E)
        triplet = torch.clamp((fa * fn).sum(1) - (fa * fp).sum(1) + 0.1, min=0).mean()
        embed = sum(torch.sqrt((e ** 2).sum()) for e in E) / 3 / math.sqrt(4)
        l1 = mask.abs().sum() / 4
    expected = triplet + 5e-3 * embed + 5e-4 * l1
    assert 5e-3 * embed > 1e-4 and 5e-4 * l1 > 1e-4  # both terms count
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    assert (model.condition.embed_reg, model.condition.mask_reg) == (5e-3, 5e-4)  # CSN's, unless train.py is told otherwise
    loss, _ = train.train_step(train.Objective(model, 0.1), optimizer, a, p, n, c, False)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    model.condition.embed_reg = model.condition.mask_reg = 0.0
    loss, _ = train.train_step(train.Objective(model, 0.1), optimizer, a, p, n, c, False)  # without: the triplet loss alone
    torch.testing.assert_close(loss, triplet, atol=1e-6, rtol=1e-5)


def test_bad_flags_and_missing_data_give_clear_errors(synth120, tmp_path):
    for bad in (["--batch-size", "0"], ["--data", "imagenet"], ["--epochs", "-1"], ["--lr", "0"], ["--margin", "-0.1"], ["--trunk-warmup", "-1"],
                ["--condition-type", "3"], ["--csn-mask-reg", "1e-3"], ["--method", "csn", "--csn-embed-reg", "-1"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2
    args, _ = train.parse_args(common(synth120, tmp_path) + ["--batch-size", "64"])
    with pytest.raises(ValueError, match="does not divide over 3 ranks"):
        train.train(args, None, rank=0, world=3, device=torch.device("cpu"))
    r = subprocess.run([sys.executable, "train.py", "--data", "fashionai", "--data-root", str(tmp_path / "nowhere")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "nowhere" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(SystemExit, match="checkpoint not found"):
        evaluate.main(["--ckpt", str(tmp_path / "none.pt")])
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(SystemExit, match="broken.pt"):
        evaluate.main(["--ckpt", str(tmp_path / "broken.pt")])
    torch.save({"model": {}, "config": {}}, tmp_path / "partial.pt")  # a dict, but not train.py's
    with pytest.raises(SystemExit, match="partial.pt: not a train.py checkpoint .no meta, args, epoch, optimizer"):
        train.main(common(synth120, tmp_path) + ["--resume", str(tmp_path / "partial.pt")])
    # a TF-ASEN checkpoint whose weights have other names and shapes: one line naming the keys, no traceback
    sd = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method="asen")).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("condition.")}
    sd.update({"condition.attr_spatial.weight": torch.zeros(5, 128), "condition.attr_proj.weight": torch.zeros(128, 128)})
    torch.save(dict(model=sd, config=dict(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method="asen"), meta={}, args={},
                    epoch=0), tmp_path / "old_asen.pt")
    r = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / "old_asen.pt")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "old_asen.pt: the weights do not fit the asen model" in r.stderr and "condition.attr_proj.weight" in r.stderr
    assert "condition.attr_spatial.weight (5, 128) vs (512, 5)" in r.stderr


def test_defaults_are_the_recipe_on_real_data_and_the_demo_on_synthetic():
    real, demo = train.parse_args(["--data", "fashionai"])[0], train.parse_args([])[0]
    assert (real.arch, real.batch_size, real.lr, real.margin, real.epochs, real.trunk_warmup) == ("vit_r50_b16", 64, 1e-4, 0.2, 200, 0)
    assert (demo.arch, demo.img_size, demo.lr, demo.margin, demo.epochs, demo.trunk_warmup) == ("tiny", 32, 2e-4, 0.1, 45, 625)
    assert (real.cls_key, demo.cls_key, train.parse_args(["--cls-key"])[0].cls_key) == (True, False, True)
    assert (real.cls_residual, demo.cls_residual, train.parse_args(["--no-cls-residual"])[0].cls_residual) == (True, True, False)
    assert train.parse_args(["--margin", "0.3"])[0].margin == 0.3  # a flag beats either default


def test_trunk_warmup_holds_the_trunk_and_trains_the_rest(synth120, tmp_path):
    model = CCA(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16))
    trunk, rest = train.param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(trunk["params"]) + len(rest["params"]) == len(names)
    # the trunk group is exactly what HybridViT.trunk uses: a gradient from trunk() reaches it and nothing else
    model.trunk(torch.randn(2, 3, 32, 32)).sum().backward()
    assert {names[id(p)] for p in trunk["params"]} == {n for n, p in model.named_parameters() if p.grad is not None}
    assert {names[id(p)].split(".")[0] for p in rest["params"]} == {"blocks", "norm", "condition", "head"}
    opt = torch.optim.Adam([trunk, rest], lr=1e-3)
    train.tensor_lrs(opt, torch.device("cpu"))  # as train.make_optimizer
    for step, factor in ((0, 0.0), (5, 0.5), (10, 1.0), (99, 1.0)):
        train.set_trunk_lr(opt, step, 10)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3 * factor)
    train.set_trunk_lr(opt, 0, 0)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-3, rel=1e-7)  # no warmup
    # two steps with a warmup far longer than the run: the trunk stays put (rates 0 and 1e-9 of lr), block L moves
    train.main(common(synth120, tmp_path) + ["--epochs", "1", "--trunk-warmup", "1000000000"])
    torch.manual_seed(0)  # train.py --seed 0 draws these initial weights
    before = CCA(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16)).state_dict()
    after = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.allclose(after["pos_embed"], before["pos_embed"], atol=1e-6)
    assert torch.allclose(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"], atol=1e-6)
    assert not torch.allclose(after["blocks.3.attn.qkv.weight"], before["blocks.3.attn.qkv.weight"], atol=1e-6)
    assert not torch.allclose(after["condition.mask"], before["condition.mask"], atol=1e-6)


@pytest.mark.parametrize("method", ["triplet", "csn", "asen"])
def test_every_method_trains_and_evaluates(synth120, tmp_path, method):
    train.main(common(synth120, tmp_path) + ["--epochs", "1", "--method", method])
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["config"]["method"] == method
    assert (ckpt["args"]["csn_embed_reg"], ckpt["args"]["csn_mask_reg"]) == ((5e-3, 5e-4) if method == "csn" else (0, 0))  # CSN's
    result = evaluate.main(["--ckpt", str(tmp_path / "best.pt"), "--split", "valid", "--workers", "0"])
    assert result["total"] == pytest.approx(ckpt["best_metric"], abs=1e-9)


def test_zappos_trains_and_scores_triplet_accuracy(zappos, tmp_path, capsys):
    root, _ = zappos
    train.main(["--data", "zappos", "--data-root", root, "--out-dir", str(tmp_path), "--arch", "tiny", "--img-size", "32", "--out-dim", "16",
                "--batch-size", "4", "--num-triplets", "8", "--workers", "0", "--epochs", "1"])
    assert "warning: training tiny from scratch on zappos, without --pretrained" in capsys.readouterr().out  # real data
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    result = evaluate.main(["--ckpt", str(tmp_path / "best.pt"), "--workers", "0"])
    assert result["num_triplets"] == 20 and set(result["per_condition"]) == {0, 1, 2, 3}
    assert ckpt["meta"]["format"] == "zappos" and 0 <= result["total"] <= 1


def test_compare_over_two_seeds_prints_mean_and_range_with_a_random_row(synth120, tmp_path, capsys, monkeypatch):
    import compare
    import visualize

    def embed_again(*a, **kw):
        raise AssertionError("the embeddings picture re-embedded the split: it should reuse the scoring's features")
    monkeypatch.setattr(visualize, "embed_items", embed_again)

    tiny = ["--img-size", "32", "--out-dim", "16", "--batch-size", "8", "--num-triplets", "8", "--workers", "0"]
    compare.main(["--data-root", synth120, "--methods", "triplet", "cca2", "--epochs", "1", "--split", "valid", "--seeds", "0", "1",
                  "--out-dir", str(tmp_path), "--train-args"] + tiny)
    out = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    rows = [line.split("|") for line in table.splitlines()[2:5]]
    assert [r[1].strip() for r in rows] == ["random embedding", "Triplet network", "CCA (Type-2)"]
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["methods"]) == {"random", "triplet", "cca2"} and results["seeds"] == [0, 1]
    cca2 = results["methods"]["cca2"]
    for seed in (0, 1):  # each seed's run is its own, scored like evaluate.py
        ckpt = torch.load(tmp_path / f"seed{seed}" / "cca2" / "best.pt", weights_only=True)
        assert ckpt["args"]["seed"] == seed
        assert cca2["totals"][str(seed)] == pytest.approx(ckpt["best_metric"], abs=1e-9)
    totals = [cca2["totals"]["0"], cca2["totals"]["1"]]
    assert totals[0] != totals[1]  # two seeds, two runs
    assert cca2["total"] == pytest.approx(sum(totals) / 2) and (cca2["min"]["total"], cca2["max"]["total"]) == (min(totals), max(totals))
    assert cca2["std"]["total"] == pytest.approx(abs(totals[0] - totals[1]) / math.sqrt(2))
    assert f"**{100 * cca2['total']:.2f} ({100 * min(totals):.2f}-{100 * max(totals):.2f})**" in rows[2][-4]
    assert "mean over 2 seeds (0, 1)" in table and "from scratch" in table
    assert os.path.isfile(tmp_path / "embeddings.png") and "nearest-centroid accuracy" in out
    # a second call trains nothing: every (method, seed) has finished its epochs
    compare.main(["--data-root", synth120, "--methods", "triplet", "--epochs", "1", "--split", "valid", "--seeds", "1",
                  "--out-dir", str(tmp_path), "--train-args"] + tiny)
    assert "seed1/triplet has finished its 1 epochs, not trained again" in capsys.readouterr().out
    # a run that stopped short of the budget (here: one epoch of two) has a best.pt, but is resumed, not scored as it is
    compare.main(["--data-root", synth120, "--methods", "triplet", "--epochs", "2", "--split", "valid", "--seeds", "1",
                  "--out-dir", str(tmp_path), "--train-args"] + tiny)
    assert "seed1/triplet/last.pt stopped after epoch 1 of 2, resumed" in capsys.readouterr().out
    last = torch.load(tmp_path / "seed1" / "triplet" / "last.pt", weights_only=True)
    assert last["epoch"] + 1 == 2 and [h["epoch"] for h in last["history"]] == [0, 1]
    assert json.load(open(tmp_path / "results.json"))["methods"]["triplet"]["seeds"]["1"]["epochs"] == 2


def test_compare_jobs_trains_runs_in_parallel_processes_with_their_logs(synth120, tmp_path, capsys):
    """--jobs: each run is a train.py process with its own log; the seeds' checkpoints and the table are as in-process."""
    import compare

    tiny = ["--img-size", "32", "--out-dim", "16", "--batch-size", "8", "--num-triplets", "8", "--workers", "0"]
    compare.main(["--data-root", synth120, "--methods", "triplet", "csn", "--epochs", "1", "--split", "valid", "--seeds", "3",
                  "--out-dir", str(tmp_path), "--jobs", "2", "--train-args"] + tiny)
    out = capsys.readouterr().out
    assert "training 2 runs, 2 at a time" in out and "(2/2; eta 0:00:00)" in out
    results = json.load(open(tmp_path / "results.json"))
    for name in ("triplet", "csn"):
        log = (tmp_path / "seed3" / name / "train.log").read_text()
        ckpt = torch.load(tmp_path / "seed3" / name / "best.pt", weights_only=True)
        assert f"method {name} (" in log and "best" in log
        assert (ckpt["args"]["seed"], ckpt["args"]["method"]) == (3, name)
        assert results["methods"][name]["seeds"]["3"]["train_seconds"] > 0
        assert results["methods"][name]["totals"]["3"] == pytest.approx(ckpt["best_metric"], abs=1e-9)
    # a run that fails (here: its flags parse, but an epoch is smaller than a batch) stops the comparison with one line
    # naming it and its log
    with pytest.raises(SystemExit, match=r"^error: Triplet network, seed 4 failed \(exit 1\): .*less than one batch.*seed4/triplet/train.log"):
        compare.main(["--data-root", synth120, "--methods", "triplet", "--epochs", "1", "--seeds", "4", "--out-dir", str(tmp_path),
                      "--jobs", "2", "--train-args"] + tiny + ["--batch-size", "100"])


def test_compare_variants_make_an_ablation_grid_one_row_per_method_and_variant(synth120, tmp_path, capsys):
    """--variant NAME=FLAGS: each variant's flags reach its runs (OUT_DIR/NAME/seedS/METHOD), the table has a row per
    method and variant in the order given; a flag train.py refuses stops the grid before anything trains."""
    import compare

    tiny = ["--img-size", "32", "--out-dim", "16", "--batch-size", "8", "--num-triplets", "8", "--workers", "0"]
    compare.main(["--data-root", synth120, "--methods", "triplet", "asen", "--epochs", "1", "--split", "valid", "--seeds", "0",
                  "--out-dir", str(tmp_path), "--variant", "base=", "--variant", "m03=--margin 0.3 --asen-width 7",
                  "--train-args"] + tiny)
    table = (tmp_path / "table.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:7]]
    assert rows == ["random embedding", "Triplet network, base", "TF-ASEN, base", "Triplet network, m03", "TF-ASEN, m03"]
    assert "Variant base: (the defaults)" in table and "Variant m03: --margin 0.3 --asen-width 7" in table
    results = json.load(open(tmp_path / "results.json"))
    assert set(results["methods"]) == {"random", "triplet/base", "asen/base", "triplet/m03", "asen/m03"}
    for v, margin, width in (("base", 0.1, 85), ("m03", 0.3, 7)):
        ckpt = torch.load(tmp_path / v / "seed0" / "asen" / "best.pt", weights_only=True)
        assert (ckpt["args"]["margin"], ckpt["config"]["asen_width"]) == (margin, width)
        assert ckpt["model"]["condition.feat_proj.weight"].shape == (width, 128)
        assert results["methods"][f"asen/{v}"]["totals"]["0"] == pytest.approx(ckpt["best_metric"], abs=1e-9)
    with pytest.raises(SystemExit):
        compare.main(["--data-root", synth120, "--methods", "triplet", "--epochs", "1", "--seeds", "0", "--out-dir", str(tmp_path / "bad"),
                      "--variant", "ok=", "--variant", "m=--margin nope"])
    err = capsys.readouterr().err
    assert "error: Triplet network, m: train.py --margin nope: argument --margin: invalid float value: 'nope'" in err
    assert not (tmp_path / "bad" / "ok").exists()
    for bad, says in (("noequals", "is not NAME=FLAGS"), ("a b=--margin 1", "is not NAME=FLAGS"), ("q=--margin '0.2", "No closing quotation"),
                      ("q=", "--variant repeats a name")):
        with pytest.raises(SystemExit):
            compare.main(["--variant", bad] + (["--variant", "q=--margin 0.2"] if bad == "q=" else []))
        assert says in capsys.readouterr().err


def test_pretrained_trunk_from_the_shapes_set_loads_strictly_and_starts_the_comparison(synth120, tmp_path, monkeypatch):
    import compare
    from cca import load_pretrained

    monkeypatch.chdir(tmp_path)  # the default --out is runs/pretrain/ARCH.pt: the mini arch's, a stride-4 stem
    compare.main(["pretrain", "--arch", "mini", "--num-train", "32", "--num-test", "8", "--epochs", "1", "--batch-size", "32", "--workers", "1"])
    mini = torch.load(tmp_path / "runs" / "pretrain" / "mini.pt", weights_only=True)
    assert (mini["arch"], mini["img_size"], len([k for k in mini["state_dict"] if k.endswith("attn.qkv.weight")])) == ("mini", 32, 12)

    path = str(tmp_path / "pre" / "tiny.pt")
    result = compare.main(["pretrain", "--out", path, "--num-train", "64", "--num-test", "24", "--epochs", "1", "--batch-size", "32",
                           "--workers", "1"])
    assert 0 <= result["accuracy"] <= 1
    saved = torch.load(path, weights_only=True)
    assert (saved["format"], saved["arch"], saved["img_size"]) == ("cca-backbone", "tiny", 32) and "shapes" in saved["source"]
    torch.manual_seed(0)  # the pretraining's initial weights: pretraining moved them
    init = build_model(CCAConfig(arch="tiny", num_conditions=1, img_size=32, method="triplet")).state_dict()
    assert not torch.allclose(saved["state_dict"]["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    for method, ctype in (("cca", 1), ("cca", 2), ("triplet", 2), ("csn", 2), ("asen", 2)):
        model = build_model(CCAConfig(arch="tiny", num_conditions=5, condition_type=ctype, img_size=32, out_dim=16, method=method))
        report = load_pretrained(model, path, verbose=False)
        own = model.state_dict()
        assert report["new"] == [k for k in own if k.startswith(("condition.", "head."))] and report["new"]
        assert report["loaded"] == [k for k in own if not k.startswith(("condition.", "head."))] and not report["resized"]
        assert sorted(report["loaded"]) == sorted(saved["state_dict"]) and not report["dropped"]
        assert all(torch.equal(own[k], saved["state_dict"][k]) for k in report["loaded"])
    compare.main(["--data-root", synth120, "--methods", "triplet", "--epochs", "1", "--split", "valid", "--seeds", "0", "--pretrained", path,
                  "--out-dir", str(tmp_path / "cmp"), "--train-args", "--img-size", "32", "--out-dim", "16", "--batch-size", "8",
                  "--num-triplets", "16", "--workers", "0"])
    ckpt = torch.load(tmp_path / "cmp" / "seed0" / "triplet" / "best.pt", weights_only=True)
    assert (ckpt["args"]["pretrained"], ckpt["args"]["trunk_warmup"]) == (path, 0)
    assert "from the pretrained trunk" in (tmp_path / "cmp" / "table.md").read_text()


def test_missing_images_are_reported_up_front(synth120, tmp_path, capsys):
    import shutil

    root = str(tmp_path / "synthetic")
    shutil.copytree(synth120, root)
    os.remove(os.path.join(root, "images", "train", "00003.jpg"))  # a training image gone: train without it
    train.main(common(root, tmp_path / "run") + ["--epochs", "1"])
    assert "1 of 120 training images are missing" in capsys.readouterr().out
    query = open(os.path.join(root, "query_test.txt")).readline().split()[0]
    name = open(os.path.join(root, "filenames_test.txt")).read().split()[int(query)]
    os.remove(os.path.join(root, name))  # a test query gone: the metric would change, so refuse and say which
    with pytest.raises(SystemExit, match=r"1 of 20 test query images are missing.*" + name.replace(".", r"\.")):
        evaluate.main(["--ckpt", str(tmp_path / "run" / "best.pt"), "--workers", "0"])


def untrained_checkpoint(path, root):
    """A checkpoint of train.py's layout with untrained weights: enough for evaluate.py's checks, in no time."""
    from dataclasses import asdict

    from data import prepare_dataset

    meta = prepare_dataset("synthetic", root)[1]
    cfg = CCAConfig(arch="tiny", num_conditions=len(meta["attributes"]), img_size=32, out_dim=16)
    torch.save(dict(model=CCA(cfg).state_dict(), config=asdict(cfg), meta=meta, args={"data_root": root}, epoch=0), path)
    return str(path)


def test_a_real_folder_without_its_data_flag_is_named_in_train_and_evaluate(synth120, tmp_path, asen_folder):
    root = asen_folder(str(tmp_path / "fashionai"))
    with pytest.raises(SystemExit, match=re.escape(f"error: {root} looks like FashionAI (ASEN's split files), not the synthetic set: "
                                                   "add --data fashionai")):
        train.main(["--data-root", root, "--out-dir", str(tmp_path / "run")])
    ckpt = untrained_checkpoint(tmp_path / "demo.pt", synth120)
    with pytest.raises(SystemExit, match=re.escape(f"error: {ckpt} was trained on synthetic, but {root} looks like FashionAI")):
        evaluate.main(["--ckpt", ckpt, "--data-root", root, "--workers", "0"])
    assert sorted(os.listdir(root)) == sorted(ASEN_FILES)  # nothing drawn into it


def test_missing_evaluation_images_stop_training_before_its_first_step_unless_dropped(synth120, tmp_path, capsys):
    import shutil

    root = str(tmp_path / "synthetic")
    shutil.copytree(synth120, root)
    for split, role in (("valid", "query"), ("test", "candidate")):  # one image of each gone
        fid = int(open(os.path.join(root, f"{role}_{split}.txt")).readline().split()[0])
        os.remove(os.path.join(root, open(os.path.join(root, f"filenames_{split}.txt")).read().split()[fid]))
    with pytest.raises(SystemExit, match=r"error: 1 of 20 valid query images are missing.*--eval-missing drop scores without them"):
        train.main(common(root, tmp_path / "a") + ["--epochs", "1"])
    assert "step 1/" not in capsys.readouterr().out and not os.path.exists(tmp_path / "a")  # stopped before training
    train.main(common(root, tmp_path / "b") + ["--epochs", "1", "--eval-missing", "drop"])
    out = capsys.readouterr().out
    assert "warning: valid query: 1 of 20 listed images are missing" in out and "warning: test candidate: 1 of 40" in out
    note = "not comparable with published numbers: 0 of 20 queries and 1 of 40 candidates left out"
    assert "incomplete split: not comparable with published numbers: 1 of 20 queries and 0 of 40 candidates left out" in out
    valid = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["history"][0]["valid"]
    assert valid["num_queries"] == 19 and valid["left_out"] == {"query": [1, 20], "candidate": [0, 40]}
    assert valid["incomplete"].startswith("not comparable with published numbers")  # the checkpoint's history says it too
    ckpt = str(tmp_path / "b" / "best.pt")
    with pytest.raises(SystemExit, match="1 of 40 test candidate images are missing"):
        evaluate.main(["--ckpt", ckpt, "--workers", "0"])  # error is the default
    result = evaluate.main(["--ckpt", ckpt, "--workers", "0", "--eval-missing", "drop", "--json", str(tmp_path / "r.json")])
    assert result["num_queries"] == 20 and result["incomplete"].startswith(note)
    assert json.load(open(tmp_path / "r.json"))["incomplete"].startswith(note)
    assert f"incomplete split: {note}" in capsys.readouterr().out


def test_compare_table_marks_an_incomplete_split():
    import compare

    r = {"per_attribute": {0: 0.5, 1: 0.25}, "total": 0.4, "mean_over_attributes": 0.375}
    complete = compare.table([("x", compare.over_seeds([dict(r)], 2), 1.0)], {"attributes": ["a", "b"]}, 1)
    assert "comparable" not in complete
    r = evaluate.mark_incomplete(r, {"query": (1, 10), "candidate": (0, 5)})
    assert compare.table([("x", compare.over_seeds([r], 2), 1.0)], {"attributes": ["a", "b"]}, 1) == complete + (
        "\n\nIncomplete split: not comparable with published numbers: 1 of 10 queries and 0 of 5 candidates left out, "
        "their images missing (--eval-missing drop).")


def test_an_epoch_holds_every_step_when_negatives_are_redrawn_or_triplets_are_gone(synth120, zappos, tmp_path, capsys):
    import shutil

    import numpy as np

    from data import training_set

    # DeepFashion-like labels: nearly every image also carries value 0 of every attribute, so that some negatives
    # still share the anchor's value after the redraws: the epoch is topped up to whole steps all the same
    root = str(tmp_path / "multi")
    shutil.copytree(synth120, root)
    lines = open(os.path.join(root, "label_train.txt")).read().splitlines()
    with open(os.path.join(root, "label_train.txt"), "w") as f:
        f.writelines(line + ("".join(f" {a} 0" for a in range(5)) if i % 20 else "") + "\n" for i, line in enumerate(lines))
    sampler, _ = training_set("synthetic", root, 32, 16, seed=0)
    assert len(sampler._draw_some(np.random.default_rng([0, 0]), 16)) < 16  # epoch 0's first draw falls short of 16
    train.main(common(root, tmp_path / "a") + ["--epochs", "1", "--cache-images"])
    out = capsys.readouterr().out
    assert "2 steps of 8 triplets" in out and "step 2/2" in out
    # zappos: CSN's fixed list without the triplets of a missing image holds fewer than --num-triplets; the step count
    # follows the list (7 of the 8 first triplets are left: one step of 4, not two)
    zroot = str(tmp_path / "z")
    shutil.copytree(zappos[0], zroot)
    os.remove(os.path.join(zroot, "ut-zap50k-images", "Shoes/Boots/Brand 0/0.jpg"))
    train.main(["--data", "zappos", "--data-root", zroot, "--out-dir", str(tmp_path / "b"), "--arch", "tiny", "--img-size", "32",
                "--out-dim", "16", "--batch-size", "4", "--num-triplets", "8", "--workers", "0", "--epochs", "1", "--cache-images",
                "--eval-missing", "drop", "--log-every", "1"])
    out = capsys.readouterr().out
    assert "zappos: 1 steps of 4 triplets" in out and "step 1/1" in out


def corrupt_first_anchor(synth120, root):
    """A copy of the synthetic set whose first training triplet's anchor (rank 0's first image under torchrun too)
    is not a JPEG any more; returns its path."""
    import shutil

    from data import training_set

    shutil.copytree(synth120, root)
    sampler, store = training_set("synthetic", root, 32, 16, seed=0)
    path = store.paths[sampler.epoch(0)[0, 0]]
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not a JPEG after all")
    return path


def test_a_corrupt_image_read_in_a_loader_worker_stops_the_run_with_one_line_naming_it(synth120, tmp_path):
    path = corrupt_first_anchor(synth120, str(tmp_path / "synthetic"))
    args = [*common(str(tmp_path / "synthetic"), tmp_path / "run"), "--epochs", "1", "--workers", "1", "--no-cache-images"]
    with pytest.raises(SystemExit) as e:  # SystemExit's text is what the command prints: one line
        train.main(args)
    assert e.value.code.startswith(f"error: cannot read image {path}: ") and len(e.value.code.splitlines()) == 1, e.value.code
    # under torchrun the rank that meets it says the same, and the run stops: every rank, not only that one
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and f"error: cannot read image {path}: " in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 1/" not in r.stdout and not os.path.exists(tmp_path / "run" / "last.pt")
    # the other rank stops with one line of its own (torchrun's SIGTERM, or its lost peer), no Python traceback
    ours = r.stderr.split("ChildFailedError")[0]
    assert re.search(r"error: rank 1(, epoch 1)?: ", ours) and "Exception ignored" not in ours, ours[-3000:]


def test_user_errors_are_one_line_or_a_flag_error(synth120, tmp_path, capsys, monkeypatch):
    import runpy

    for bad, says in ((["--img-size", "0"], "--img-size must be at least 1, got 0"), (["--img-size", "-32"], "got -32"),
                      (["--img-size", "36"], "--img-size 36: img_size must be a positive multiple of 8, the output stride of arch 'tiny'"),
                      (["--out-dim", "0"], "--out-dim must be at least 1"), (["--device", "gpu"], "'gpu' is not a device")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
    ckpt = untrained_checkpoint(tmp_path / "demo.pt", synth120)
    with pytest.raises(SystemExit) as e:
        visualize.main(["--ckpt", ckpt, "--attr", "colour"])  # --attr alone: nothing to draw, a flag error
    assert e.value.code == 2 and "--attr names the attribute for --retrieve" in capsys.readouterr().err
    if not torch.cuda.is_available():
        for main in (train.parse_args, lambda argv: evaluate.main(["--ckpt", ckpt] + argv),
                     lambda argv: visualize.main(["--ckpt", ckpt, "--embeddings"] + argv)):
            with pytest.raises(SystemExit) as e:
                main(["--device", "cuda"])
            assert e.value.code == 2 and "cuda: no CUDA GPU is available here" in capsys.readouterr().err
    # checkpoints: a folder, a file that is no checkpoint (never PyTorch's advice to unpickle it with weights_only=False)
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path} is a folder, not a checkpoint: give its best.pt or last.pt")):
        evaluate.main(["--ckpt", str(tmp_path)])
    readme = os.path.join(ROOT, "README.md")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", readme])
    assert e.value.code.startswith(f"error: {readme}: cannot read as a PyTorch file") and "weights_only" not in e.value.code
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path} is a folder")):
        train.main(common(synth120, tmp_path / "run") + ["--resume", str(tmp_path)])
    # weights that do not fit: one line from train.py
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(SystemExit, match=r"error: .*other.pth: does not fit arch 'tiny'"):
        train.main(common(synth120, tmp_path / "run") + ["--pretrained", str(tmp_path / "other.pth")])
    # cca.py convert with a missing file, a file of no weights, a bad --img-size: one line each
    for argv, says in (([str(tmp_path / "none.npz")], "pretrained weights not found"), ([readme], "unknown weight format"),
                       ([str(tmp_path / "other.pth")], "does not fit arch"), ([ckpt, "--img-size", "0"], "img_size must be")):
        monkeypatch.setattr(sys, "argv", ["cca.py", "convert", *argv[:1], str(tmp_path / "out.pt"), "--arch", "tiny", *argv[1:]])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "cca.py"), run_name="__main__")
        assert e.value.code.startswith("error: ") and says in e.value.code and len(e.value.code.splitlines()) == 1, e.value.code


def test_no_flip_trains_on_unmirrored_images(synth120, tmp_path, monkeypatch):
    """--no-flip reaches the training set: every batch the step sees is the images as decoded."""
    seen = []
    step = train.train_step

    def spy(model, optimizer, a, p, n, c, *rest, **kw):
        seen.append(torch.stack([a, p, n]).clone())
        return step(model, optimizer, a, p, n, c, *rest, **kw)

    monkeypatch.setattr(train, "train_step", spy)
    args = ["--data-root", synth120, "--img-size", "32", "--out-dim", "16", "--batch-size", "8", "--num-triplets", "16",
            "--workers", "0", "--epochs", "1", "--eval-batch-size", "32"]
    train.main(args + ["--out-dir", str(tmp_path / "plain"), "--no-flip"])
    plain = seen[:]
    seen.clear()
    train.main(args + ["--out-dir", str(tmp_path / "flipped")])
    assert len(plain) == len(seen) == 2
    for x, y in zip(plain, seen):  # same triplets (same seed); mirrored or not, image by image
        same = (x == y).flatten(3).all(-1)
        assert torch.equal(x.flip(-1)[~same], y[~same]) and (~same).any()
    assert torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["args"]["flip"] is False


def test_tensor_learning_rates_follow_the_float_schedule_and_checkpoints_load_into_a_plain_model(tmp_path):
    """The rates live in tensors changed in place (what a CUDA-graphed step needs). Over 3 epochs of 4 steps, with the
    trunk's warm-up ending inside epoch 2 and ExponentialLR stepping at each epoch's end, the weights match
    today's schedule written with float rates, step for step; the checkpoint then loads strictly into a plain model
    and its optimizer into a fresh one."""
    args = train.argparse.Namespace(lr=3e-3, weight_decay=0.0, lr_decay=0.8, trunk_warmup=6)
    cfg = CCAConfig(arch="tiny", num_conditions=3, img_size=32, out_dim=16)
    torch.manual_seed(0)
    ours, ref = CCA(cfg), CCA(cfg)
    ref.load_state_dict(ours.state_dict())
    start = {k: v.clone() for k, v in ours.state_dict().items()}
    opt, sched = train.make_optimizer(ours, args, torch.device("cpu"))
    lr_tensors = [g["lr"] for g in opt.param_groups]
    ref_opt = torch.optim.Adam(train.param_groups(ref), lr=args.lr, fused=True)  # the float rates, as before
    ref_sched = torch.optim.lr_scheduler.ExponentialLR(ref_opt, gamma=args.lr_decay)
    g = torch.Generator().manual_seed(1)
    for epoch in range(3):
        for i in range(4):
            s = epoch * 4 + i
            a, p, n = torch.randint(0, 256, (3, 4, 3, 32, 32), dtype=torch.uint8, generator=g)
            c = torch.randint(0, 3, (4,), generator=g)
            train.set_trunk_lr(opt, s, args.trunk_warmup)
            ref_opt.param_groups[0]["lr"] = ref_opt.param_groups[1]["lr"] * min(1.0, s / args.trunk_warmup)
            train.train_step(train.Objective(ours, 0.2), opt, a, p, n, c, use_amp=False)
            train.train_step(train.Objective(ref, 0.2), ref_opt, a, p, n, c, use_amp=False)
            rates = [float(g_["lr"]) for g_ in opt.param_groups], [g_["lr"] for g_ in ref_opt.param_groups]
            assert rates[0] == pytest.approx(rates[1], rel=1e-6) and rates[0][0] < rates[0][1] or s >= args.trunk_warmup
        sched.step()
        ref_sched.step()
    assert [g_["lr"] for g_ in opt.param_groups] == lr_tensors  # the same tensors, changed in place, never replaced
    assert float(opt.param_groups[1]["lr"]) == pytest.approx(args.lr * args.lr_decay**3, rel=1e-6)
    for (name, w), w_ref, w0 in zip(ours.state_dict().items(), ref.state_dict().values(), start.values()):
        if name.endswith("attn.qkv.bias"):  # the keys' bias has no gradient but rounding noise (a softmax ignores a
            d = w.shape[0] // 3             # shift of all keys), which Adam scales up to full steps: left out
            w, w_ref, w0 = (torch.cat([t[:d], t[2 * d:]]) for t in (w, w_ref, w0))
        # apart << moved: float32 rates against Python floats round differently, and Adam grows that to about 2% of
        # the movement over these 12 steps (torch 2.14.1 on a 2-core CPU); a warm-up one step off, or one missed
        # decay, puts them 20% or more apart
        assert (w - w_ref).abs().max() <= 0.05 * (w_ref - w0).abs().max() + 1e-7, name
    # the checkpoint of the new path: plain weights, a strict load; its optimizer resumes into a fresh one
    meta = dict(name="synthetic", attributes=["a", "b", "c"])
    cca_ckpt = tmp_path / "last.pt"
    train.save_checkpoint(str(cca_ckpt), ours, opt, sched, 2, 0.5, args, meta, [])
    saved = torch.load(cca_ckpt, weights_only=True)
    plain = CCA(cfg)
    plain.load_state_dict(saved["model"], strict=True)
    fresh, fresh_sched = train.make_optimizer(plain, args, torch.device("cpu"))
    fresh.load_state_dict(saved["optimizer"])
    fresh_sched.load_state_dict(saved["scheduler"])
    train.tensor_lrs(fresh, torch.device("cpu"))
    assert all(isinstance(g_["lr"], torch.Tensor) for g_ in fresh.param_groups)
    assert [float(g_["lr"]) for g_ in fresh.param_groups] == [float(g_["lr"]) for g_ in opt.param_groups]


def test_mask_init_and_asen_width_reach_the_model_and_the_checkpoint_and_resume_refuses_others(synth120, tmp_path, capsys):
    """--mask-init draws Type-2's M from the normal given (default CSN's on real data, normal(0, 1) on the synthetic
    set), --asen-width sets TF-ASEN's width; both are recorded, a resume with another value is refused, bad values are
    one flag error, and a TF-ASEN checkpoint from before the two were recorded (512 wide at every size, CSN's
    initialisation) still loads, and resumes with the values it was trained with."""
    from dataclasses import asdict

    from cca import load_checkpoint
    for argv, (mean, std) in (([], (0.0, 1.0)), (["--data", "fashionai"], (0.9, 0.7)), (["--mask-init", "0.9,0.7"], (0.9, 0.7))):
        args, _ = train.parse_args(argv)
        assert args.mask_init == (mean, std)
        torch.manual_seed(0)
        M = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, mask_init=args.mask_init)).condition.mask
        assert abs(M.mean().item() - mean) < 0.1 and abs(M.std().item() - std) < 0.1  # 640 draws
    for bad, says in (("0.9", "is not MEAN,STD"), ("a,b", "is not MEAN,STD"), ("0,-1", "at least 0"), ("nan,1", "finite")):
        with pytest.raises(SystemExit):
            train.parse_args(["--mask-init", bad])
        assert says in capsys.readouterr().err
    train.main(common(synth120, tmp_path) + ["--epochs", "1", "--mask-init", "0,1"])
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["config"]["mask_init"] == ckpt["args"]["mask_init"] == (0.0, 1.0)
    with pytest.raises(SystemExit, match=r"--mask-init \(0.9, 0.7\) conflicts with .*last.pt, trained with --mask-init \(0.0, 1.0\)"):
        train.parse_args(["--resume", str(tmp_path / "last.pt"), "--mask-init", "0.9,0.7"])
    train.main(common(synth120, tmp_path / "asen") + ["--epochs", "1", "--method", "asen", "--asen-width", "9"])
    ckpt = torch.load(tmp_path / "asen" / "best.pt", weights_only=True)
    assert ckpt["config"]["asen_width"] == 9 and ckpt["model"]["condition.score.weight"].shape == (1, 9)
    old = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method="asen", asen_width=512))
    config = {k: v for k, v in asdict(old.cfg).items() if k not in ("asen_width", "mask_init")}  # an older checkpoint's
    torch.save(dict(ckpt, model=old.state_dict(), config=config), tmp_path / "old.pt")
    model, _ = load_checkpoint(str(tmp_path / "old.pt"))
    assert model.cfg.asen_width == 512 and torch.equal(model.condition.feat_proj.weight, old.condition.feat_proj.weight)
    # a last.pt whose optimizer state has other shapes than its model: one error, not a crash in fused Adam
    last = torch.load(tmp_path / "asen" / "last.pt", weights_only=True)
    state = next(s for s in last["optimizer"]["state"].values() if s["exp_avg"].dim() == 2)
    state["exp_avg"] = torch.zeros(3, 3)
    torch.save(last, tmp_path / "asen" / "last.pt")
    with pytest.raises(SystemExit, match=r"optimizer state does not fit the model \(its exp_avg is \(3, 3\) for a parameter of \(\d+, \d+\)"):
        train.main(["--resume", str(tmp_path / "asen" / "last.pt"), "--epochs", "2"])
    # a run of before the two flags: resumed with 512 and CSN's initialisation, the values it was trained with
    train.main(common(synth120, tmp_path / "asen512") + ["--epochs", "1", "--method", "asen", "--asen-width", "512"])
    last = torch.load(tmp_path / "asen512" / "last.pt", weights_only=True)
    last["args"] = {k: v for k, v in last["args"].items() if k not in ("asen_width", "mask_init", "cls_key", "cls_residual")}
    last["config"] = {k: v for k, v in last["config"].items() if k not in ("asen_width", "mask_init", "cls_key", "cls_residual")}
    torch.save(last, tmp_path / "asen512" / "last.pt")
    resumed, _ = train.parse_args(["--resume", str(tmp_path / "asen512" / "last.pt")])
    assert resumed.asen_width == 512 and resumed.mask_init == (0.9, 0.7) and resumed.cls_key is True and resumed.cls_residual is True
    train.main(["--resume", str(tmp_path / "asen512" / "last.pt"), "--epochs", "2"])
    ckpt = torch.load(tmp_path / "asen512" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["config"]["asen_width"] == 512 and ckpt["args"]["mask_init"] == (0.9, 0.7)
    assert ckpt["config"]["cls_key"] is True
    with pytest.raises(SystemExit, match="--cls-key"):  # a model flag: a resume with the other value is refused
        train.parse_args(["--resume", str(tmp_path / "asen512" / "last.pt"), "--no-cls-key"])
    with pytest.raises(SystemExit, match="--cls-residual"):
        train.parse_args(["--resume", str(tmp_path / "asen512" / "last.pt"), "--no-cls-residual"])


def test_linear_probe_reads_what_the_features_hold():
    import compare
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    held = F.one_hot(y, 3).float() + 0.1 * torch.randn(300, 3, generator=g)  # the value, plus noise: separable
    noise = torch.randn(300, 8, generator=g)  # nothing of the value
    assert compare.linear_probe(held[:200], y[:200], held[200:], y[200:], 3) == 1.0
    assert compare.linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.55  # 1/3 expected; 0.55 is 4.7 sd above


def test_attention_spread_against_maps_worked_out_by_hand():
    import compare
    uniform, one, half = torch.full((3, 2, 64), 1 / 64), F.one_hot(torch.tensor([5]), 64).double(), torch.zeros(1, 64)
    half[0, :2] = 0.5
    assert compare.attention_spread(uniform) == pytest.approx((1 / 64, 64))
    assert compare.attention_spread(one) == pytest.approx((1.0, 1.0))
    assert compare.attention_spread(half) == pytest.approx((0.5, 2.0))
    assert compare.attention_spread(torch.cat([one, half.double()])) == pytest.approx((0.75, 1.5))  # a mean over maps


def test_compare_probe_reports_the_attention_spread_of_an_attending_model(synth, tmp_path, capsys, monkeypatch):
    import compare
    torch.manual_seed(0)
    models = {m: build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method=m, cls_key=False)).eval()
              for m in ("cca", "csn")}
    monkeypatch.setattr(compare, "probe_model", lambda path, device: models[os.path.basename(path)])
    results = compare.main(["probe", "cca", "csn", "--data-root", synth, "--num-images", "45", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "attention" not in str(list(results["csn"]))  # TF-CSN has no attention map: no spread
    heaviest, effective = results["cca"]["attention: heaviest location"], results["cca"]["attention: effective locations"]
    assert list(heaviest) == list(effective) == ["sleeve_length", "length", "neckline", "colour", "pattern"]
    assert all(1 / 16 < heaviest[a] < 1 and 1 < effective[a] < 16 for a in heaviest)  # tiny: a 4 x 4 grid
    images = torch.stack([compare.read_image(os.path.join(synth, n), 32) for n in compare.read_filenames(os.path.join(synth, "filenames_train.txt"))])
    drawn = np.random.default_rng(0).permutation(len(images))[:45]  # every synthetic image is labelled with every attribute
    with torch.no_grad():
        maps = models["cca"].attention_maps(compare.normalise(images[drawn]), torch.full((45,), 2))  # neckline's
    assert heaviest["neckline"] == pytest.approx(maps.max(-1).values.mean().item(), rel=1e-5)
    assert f"neckline {100 * heaviest['neckline']:.1f} / {effective['neckline']:.1f}" in out


def test_compare_probe_fits_each_attribute_on_the_trunk_of_a_checkpoint_and_a_backbone(synth, tmp_path, capsys, monkeypatch):
    import compare
    from cca import save_backbone
    torch.manual_seed(0)
    model = build_model(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16, method="triplet"))
    save_backbone(model, str(tmp_path / "trunk.pt"), "a test")
    seen = []
    real = compare.linear_probe

    def spy(x_fit, y_fit, x_score, y_score, classes, **kw):
        seen.append((x_fit.shape, x_score.shape, classes))
        return real(x_fit, y_fit, x_score, y_score, classes, **kw)
    monkeypatch.setattr(compare, "linear_probe", spy)
    results = compare.main(["probe", str(tmp_path / "trunk.pt"), "--data-root", synth, "--num-images", "45", "--device", "cpu"])
    table = capsys.readouterr().out
    attrs = ["sleeve_length", "length", "neckline", "colour", "pattern"]
    assert f"| features             | {' | '.join(attrs)} |" in table
    accs = results[str(tmp_path / "trunk.pt")]
    assert list(accs) == ["[CLS]", "patch mean", "every token", "most frequent value"]
    assert all(list(a) == attrs and all(0 <= v <= 1 for v in a.values()) for a in accs.values())
    D, tokens = 128, 1 + (32 // 8) ** 2  # tiny: width 128, a 4 x 4 grid and [CLS]
    widths = [D, D, tokens * D]
    # every image of the synthetic set carries all five labels: 30 fit, 15 scored, for each attribute and probe
    assert seen == [((30, w), (15, w), 4 if a != "colour" else 6) for a in attrs for w in widths]
    with pytest.raises(ValueError, match="labelled with sleeve_length: too few to probe"):
        compare.main(["probe", str(tmp_path / "trunk.pt"), "--data-root", synth, "--num-images", "12", "--device", "cpu"])  # 8 to fit
