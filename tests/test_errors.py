"""Bad input and failed writes, as a user meets them: each ends in one `error: ...` line (or an argparse flag
error) and a non-zero exit, and nothing is left half-written.

    python -m pytest -q tests/test_errors.py
"""
import errno
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch

import cca
import evaluate
import search
import train
import visualize
from cca import CCA, CCAConfig, save_checkpoint
from data import prepare_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(script, argv, monkeypatch):
    """A script's command line, run in this process: its SystemExit's code or message, None if it ended without one."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    try:
        runpy.run_path(os.path.join(REPO, script), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def one_line_error(code):
    return isinstance(code, str) and code.startswith("error: ") and len(code.splitlines()) == 1


def tiny_checkpoint(path, root, out_dim=16):
    meta = prepare_dataset("synthetic", root)[1]
    cfg = CCAConfig(arch="tiny", num_conditions=len(meta["attributes"]), img_size=32, out_dim=out_dim)
    torch.save(dict(model=CCA(cfg).state_dict(), config=asdict(cfg), meta=meta, args={"data_root": root}, epoch=0), path)
    return str(path)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(synth, tmp_path, monkeypatch):
    model = CCA(CCAConfig(arch="tiny", num_conditions=5, img_size=32, out_dim=16))
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    args = train.parse_args(["--data-root", synth])[0]
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, model, opt, sched, 0, 0.5, args, {"name": "synthetic"}, [])
    before = torch.load(path, weights_only=True)
    real_save = torch.save

    def full_disk(obj, f):  # writes part of the file, then fails as torch.save does on a full disk
        real_save({"part": torch.zeros(10)}, f)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 448 vs 342")

    monkeypatch.setattr(cca.torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, model, opt, sched, 1, 0.6, args, {"name": "synthetic"}, [])
    text = str(e.value)
    assert text.startswith(f"{path}: not written ([enforce fail") and "MiB are free in" in text and "intact" in text
    assert len(text.splitlines()) == 1 and os.listdir(tmp_path) == ["last.pt"]  # no temporary file left
    after = torch.load(path, weights_only=True)
    assert after["epoch"] == 0 and all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])
    # train.py says so in one line
    monkeypatch.setattr(cca.torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(SystemExit) as e:
        train.main(["--data-root", synth, "--out-dir", str(tmp_path / "run"), "--img-size", "32", "--out-dim", "16",
                    "--batch-size", "8", "--num-triplets", "8", "--epochs", "1", "--eval-batch-size", "32"])
    assert one_line_error(e.value.code) and "best.pt: not written (" in e.value.code and "No space left" in e.value.code
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp")]


def test_convert_into_a_folder_that_is_not_there_is_one_line(tmp_path, monkeypatch):
    model = CCA(CCAConfig(arch="tiny", num_conditions=2, img_size=32))
    src = str(tmp_path / "w.pt")
    cca.save_backbone(model, src, "test")
    code = run_main("cca.py", ["convert", src, str(tmp_path / "no" / "such" / "out.pt"), "--arch", "tiny", "--img-size", "32"],
                    monkeypatch)
    assert one_line_error(code) and "out.pt: not written" in code, code


@pytest.mark.parametrize("argv, says", [(["-K", "0"], "num_conditions must be positive"),
                                        (["--img-size", "0"], "img_size must be a positive multiple"),
                                        (["--arch", "tiny", "--img-size", "36"], "multiple of 8")])
def test_cca_info_bad_sizes_are_one_line(argv, says, monkeypatch):
    code = run_main("cca.py", ["info", *[a.replace("-K", "--num-conditions") for a in argv]], monkeypatch)
    assert one_line_error(code) and says in code, code


def test_train_refuses_flags_that_cannot_be_right(capsys):
    for argv, says in ((["--num-triplets", "1000000000000"], "--num-triplets 1000000000000: drawing an epoch needs about"),
                       (["--lr-decay", "0"], "--lr-decay must be positive"), (["--lr-decay", "-0.5"], "--lr-decay must be positive"),
                       (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
                       (["--weight-decay", "-1"], "--weight-decay must be at least 0")):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 2 and says in capsys.readouterr().err, argv


def test_synth_and_import_refuse_bad_numbers_a_file_as_folder_and_an_existing_dataset(synth, tmp_path, monkeypatch, capsys):
    for argv, says in ((["--size", "0"], "argument --size: must be at least 8, got 0"),
                       (["--num-train", "-5"], "argument --num-train: must be at least 2, got -5"),
                       (["--workers", "0"], "argument --workers: must be at least 1")):
        assert run_main("dataset_tools.py", ["synth", "--out", str(tmp_path / "s"), *argv], monkeypatch) == 2
        assert says in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    code = run_main("dataset_tools.py", ["synth", "--out", str(tmp_path / "file")], monkeypatch)
    assert one_line_error(code) and "is a file, not a folder" in code
    # onto an existing dataset: refused, its files untouched, unless --overwrite
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    meta = open(os.path.join(synth, "meta.json")).read()
    open(os.path.join(copy, "meta.json"), "w").write(meta)
    code = run_main("dataset_tools.py", ["synth", "--out", copy, "--num-train", "4", "--num-query", "1", "--num-candidate", "2",
                                         "--workers", "1"], monkeypatch)
    assert one_line_error(code) and "holds a dataset already" in code and "--overwrite" in code
    assert os.listdir(copy) == ["meta.json"]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("path,attribute,value\n")
    code = run_main("dataset_tools.py", ["import", str(csv_path), "--out", copy], monkeypatch)
    assert code == 1 and "holds a dataset already" in capsys.readouterr().err and os.listdir(copy) == ["meta.json"]
    assert run_main("dataset_tools.py", ["synth", "--out", copy, "--num-train", "4", "--num-query", "1", "--num-candidate", "2",
                                         "--workers", "1", "--overwrite"], monkeypatch) is None
    assert "filenames_train.txt" in os.listdir(copy)


def test_evaluate_with_a_mistyped_data_root_draws_nothing(synth, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt", synth)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--ckpt", ckpt, "--data-root", str(tmp_path / "typo"), "--workers", "0"])
    assert one_line_error(e.value.code) and "typo: no dataset there" in e.value.code and not os.path.exists(tmp_path / "typo")


def test_visualize_compare_with_a_checkpoint_of_other_data_is_one_line(synth, tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "c.pt", synth)
    other = torch.load(ckpt, weights_only=True)
    cfg = dict(other["config"], num_conditions=3)
    other.update(model=CCA(CCAConfig(**cfg)).state_dict(), config=cfg, meta=dict(other["meta"], attributes=["a", "b", "c"],
                                                                                  values=[["x"], ["y"], ["z"]]))
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        visualize.main(["--ckpt", ckpt, "--workers", "0", "--embeddings", "--compare", str(tmp_path / "other.pt"),
                        "--out", str(tmp_path / "fig")])
    assert one_line_error(e.value.code) and "--compare needs checkpoints of the same data and size" in e.value.code


def test_an_index_from_someone_else_is_refused_naming_what_is_wrong(tmp_path):
    emb = np.zeros((2, 3, 4), dtype=np.float16)
    path = str(tmp_path / "g.idx")
    search.write_index(path, emb, ["a", "b", "c"], ["x", "y"], [["u", "v"], ["w"]], labels=[[0, 0], [1, -1], [0, 0]])
    blob = open(path, "rb").read()
    n = int.from_bytes(blob[-16:-8], "little")
    header = json.loads(blob[-16 - n:-16])

    def rewrite(**change):
        h = json.dumps({**header, **change}).encode()
        with open(path, "wb") as f:
            f.write(blob[:-16 - n] + h + len(h).to_bytes(8, "little") + b"CCAINDEX")

    for change, says in (({"paths": None}, "does not match its"), ({"labels": [[0, 5], [0, 0], [0, 0]]}, "its labels are not"),
                         ({"labels": [[0, 0]]}, "its labels are not"), ({"shape": [2, 3]}, "is not [K, N, D]")):
        rewrite(**change)
        with pytest.raises(ValueError, match="corrupt index header: .*" + re.escape(says)):
            search.read_index(path)
    header.pop("paths")
    rewrite()
    with pytest.raises(ValueError, match=r"g.idx: corrupt index header: no paths"):
        search.read_index(path)


def test_search_bench_refuses_sizes_it_cannot_measure(capsys):
    for argv, says in ((["--out-dim", "0"], "argument --out-dim: must be at least 1"),
                       (["--num-attributes", "1"], "argument --num-attributes: must be at least 2"),
                       (["--queries", "0"], "argument --queries: must be at least 1"),
                       (["--num-images", "3"], "argument --num-images: must be at least 10")):
        with pytest.raises(SystemExit) as e:
            search.main(["bench", *argv])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_a_full_disk_at_the_start_of_an_index_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    def no_room(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(search.os, "posix_fallocate", no_room)
    with pytest.raises(OSError, match=r"g.idx\.\d+\.tmp: no room for the index: it needs"):
        search.write_index(str(tmp_path / "g.idx"), np.zeros((2, 30, 8)), [str(i) for i in range(30)], ["a", "b"], [[], []])
    assert os.listdir(tmp_path) == []


def test_a_full_disk_at_the_end_of_search_bench_leaves_no_file(tmp_path, monkeypatch):
    def no_room(fd):  # the header and trailer written, then flushed to a disk that has no room for them
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(search.os, "fsync", no_room)
    with pytest.raises(OSError, match="No space left"):
        search.bench(1000, 3, [8], str(tmp_path), queries=1, device="cpu")
    assert os.listdir(tmp_path) == []


def test_compare_refuses_zero_epochs(capsys):
    import compare

    with pytest.raises(SystemExit) as e:
        compare.main(["--epochs", "0"])
    assert e.value.code == 2 and "argument --epochs: must be at least 1, got 0" in capsys.readouterr().err


def test_dataset_tools_cli_prepare_flag_errors():
    r = subprocess.run([sys.executable, os.path.join(REPO, "dataset_tools.py"), "prepare", "--img-size", "0"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "argument --img-size: must be at least 1, got 0" in r.stderr and "Traceback" not in r.stderr


def test_check_finds_what_it_said_ok_to(synth, tmp_path):
    def check(root, *more):
        r = subprocess.run([sys.executable, os.path.join(REPO, "dataset_tools.py"), "check", "--data-root", root, *more],
                           capture_output=True, text=True, cwd=REPO)
        assert "Traceback" not in r.stderr, r.stderr
        return r

    r = check(synth, "--data", "fashionai")  # a synthetic folder is no FashionAI
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {synth} looks like the synthetic set (drawn by synthetic.py), not FashionAI: add --data synthetic"]
    root = shutil.copytree(synth, str(tmp_path / "s"))
    names = open(os.path.join(root, "filenames_valid.txt")).read().splitlines()
    with open(os.path.join(root, "filenames_valid.txt"), "w") as f:
        f.writelines(n + "\n" for n in names[:-1] + names[:1])  # one image listed twice (same count of lines)
    jpeg = os.path.join(root, "images", "test", "00003.jpg")
    blob = open(jpeg, "rb").read()
    open(jpeg, "wb").write(blob[:-50])  # truncated: the header still parses
    r = check(root)
    assert r.returncode == 1 and "problem: filenames_valid.txt lists 1 images more than once" in r.stdout
    assert "unreadable images: 1" in r.stdout and "00003.jpg (truncated: no JPEG end marker)" in r.stdout
    for name in ("filenames_train.txt", "label_train.txt"):
        open(os.path.join(root, name), "w").close()
    r = check(root)
    assert "problem: filenames_train.txt lists no image" in r.stdout
    open(os.path.join(root, "query_test.txt"), "wb").write("0 1 2\n\xe9t\xe9\n".encode("latin-1"))
    r = check(root)
    assert r.returncode == 1 and r.stderr.strip() == f"error: {os.path.join(root, 'query_test.txt')}: not UTF-8 text " \
                                                   "(byte 6: invalid continuation byte)"


def test_ctrl_c_during_prepare_is_one_line_and_leaves_no_temporary_file(synth, tmp_path):
    import signal
    import time

    root = shutil.copytree(synth, str(tmp_path / "s"))
    names = open(os.path.join(root, "filenames_train.txt")).read().split()
    with open(os.path.join(root, "filenames_train.txt"), "w") as f:  # the 60 images listed over and over: a long prepare
        f.writelines(names[i % len(names)] + "\n" for i in range(40_000))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "dataset_tools.py"), "prepare", "--data-root", root,
                             "--img-size", "16", "--workers", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # SIG_DFL as in a terminal: a suite started in the background (`pytest &`) ignores SIGINT, and so would its children
    prepared = os.path.join(root, "prepared")
    deadline = time.time() + 120
    while not (os.path.isdir(prepared) and any(f.endswith(".tmp") for f in os.listdir(prepared))):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before its first array was started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert err.strip().splitlines() == ["error: prepare interrupted: no temporary file is left, and the splits finished "
                                        "before keep their arrays"]
    left = os.listdir(prepared)
    assert not [f for f in left if ".tmp" in f]
    assert all(f[:-4] + ".json" in left for f in left if f.endswith(".npy"))  # a finished split keeps its header


def test_a_folder_another_live_run_writes_is_refused_and_a_stale_lock_taken_over(synth, tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / "train.lock").write_text(str(sleeper.pid))  # a live run holds the folder
        argv = ["--data-root", synth, "--out-dir", str(run), "--img-size", "32", "--out-dim", "16", "--batch-size", "8",
                "--num-triplets", "8", "--epochs", "1", "--eval-batch-size", "32"]
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert one_line_error(e.value.code) and f"is being written by another run (process {sleeper.pid}" in e.value.code
        assert not os.path.exists(run / "last.pt")
    finally:
        sleeper.kill()
        sleeper.wait()
    train.main(argv)  # its process is gone: the lock is taken over, and released at the end
    assert os.path.exists(run / "last.pt") and not os.path.exists(run / "train.lock")


def torchrun_train(root, out, extra, act=None):
    """train.py under torchrun, 2 ranks on gloo: (exit code, stdout lines, stderr, seconds from `act` to the end).
    act=(text, signal[, s]): when rank 0 prints a line holding text, send rank 1 the signal (SIGSTOP: it hangs, s seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", "--data",
           "synthetic", "--data-root", root, "--out-dir", str(out), "--img-size", "32", "--out-dim", "16", "--batch-size",
           "8", "--num-triplets", "96", "--workers", "0", "--log-every", "1", "--epochs", "3", "--eval-every", "100",
           "--device", "cpu", *extra]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, acted = [], None
    for line in p.stdout:
        lines.append(line)
        if act and acted is None and act[0] in line:
            for pid in subprocess.check_output(["pgrep", "-P", str(p.pid)], text=True).split():
                if b"RANK=1" in open(f"/proc/{pid}/environ", "rb").read().split(b"\0"):
                    os.kill(int(pid), act[1])
                    acted = time.time()
                    if act[1] == signal.SIGSTOP:  # woken once the other has timed out, so that torchrun ends it at once
                        threading.Timer(act[2], os.kill, (int(pid), signal.SIGCONT)).start()
    try:
        p.wait(timeout=120)
    finally:
        p.kill()
    return p.returncode, lines, p.stderr.read(), (time.time() - acted) if acted else None


def losses(lines):
    """{(epoch, step): (loss, triplet acc)} of rank 0's progress lines."""
    found = (re.search(r"epoch (\d+)/\d+ step (\d+)/\d+ loss (\S+) triplet acc (\S+)", line) for line in lines)
    return {m.groups()[:2]: m.groups()[2:] for m in found if m}


def test_a_rank_killed_or_hung_mid_epoch_stops_the_others_and_resume_repeats_the_run(synth120, tmp_path):
    rc, full, err, _ = torchrun_train(synth120, tmp_path / "full", [])
    assert rc == 0, err[-3000:]
    # SIGKILL rank 1 in epoch 2: rank 0 stops at once, in one line of its own; torchrun's summary names rank 1
    rc, cut, err, took = torchrun_train(synth120, tmp_path / "cut", [], ("epoch 2/3 step 3/", signal.SIGKILL))
    assert rc != 0 and took is not None and took < 60, err[-3000:]
    # which comes first, gloo's closed connection or torchrun's SIGTERM, is a race: either line is right
    assert re.search(r"error: rank 0(, epoch 2: another rank is gone|: stopped by Ctrl-C or SIGTERM)", err), err[-3000:]
    assert "--resume" in err.split("error: rank 0", 1)[1].splitlines()[0], err[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9", err), err[-3000:]
    assert "Traceback" not in err.split("error: rank 0", 1)[0]  # nothing of ours before the line
    saved = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert saved["epoch"] == 0 and not [f for f in os.listdir(tmp_path / "cut") if f.endswith((".tmp", ".lock"))]
    # resumed, it goes on from epoch 2 with the same losses, step for step, as the run never stopped
    rc, resumed, err, _ = torchrun_train(synth120, tmp_path / "cut", ["--resume", str(tmp_path / "cut" / "last.pt")])
    assert rc == 0, err[-3000:]
    after, before = losses(resumed), losses(full)
    assert len(after) == 24 and min(int(e) for e, _ in after) == 2 and all(before[k] == v for k, v in after.items())
    # a rank that hangs (SIGSTOP) leaves the other waiting --dist-timeout seconds, then stopping with one line
    rc, _, err, took = torchrun_train(synth120, tmp_path / "hung", ["--dist-timeout", "5"], ("epoch 2/3 step 3/", signal.SIGSTOP, 10))
    assert rc != 0 and took < 60, err[-3000:]
    assert "error: rank 0, epoch 2: no word from another rank for 5 s (--dist-timeout)" in err, err[-3000:]
