"""Every command, given bad input as a new user would give it: prints a markdown table of each input, the command and
how it ended (one line, traceback, silent, or a report). Not part of the default test run (a few minutes: every
case starts a Python process); the errors that matter most have tests of their own in test_errors.py.

    python tests/bad_inputs.py                  # the table on stdout, one row as each case ends
    python tests/bad_inputs.py --only search    # the cases of commands whose line holds 'search'
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixtures(tmp):
    """A small synthetic set, a checkpoint trained on it for one epoch, an index of its test images, and bad files."""
    py = [sys.executable]
    run = lambda *a: subprocess.run(py + list(a), cwd=REPO, check=True, capture_output=True, text=True)  # noqa: E731
    s = os.path.join(tmp, "s")
    run("dataset_tools.py", "synth", "--out", s, "--num-train", "60", "--num-query", "10", "--num-candidate", "30",
        "--size", "32", "--workers", "1")
    run("train.py", "--data-root", s, "--out-dir", f"{tmp}/run", "--epochs", "1", "--num-triplets", "16", "--batch-size", "8",
        "--out-dim", "16", "--log-every", "1")
    run("search.py", "index", "--ckpt", f"{tmp}/run/best.pt", "--data-root", s, "--split", "test", "--out", f"{tmp}/g.idx",
        "--workers", "0")
    open(f"{tmp}/empty", "w").close()
    with open(f"{tmp}/garbage.pt", "w") as f:
        f.write("not a checkpoint\n")
    with open(f"{tmp}/run/best.pt", "rb") as f, open(f"{tmp}/truncated.pt", "wb") as g:
        g.write(f.read(4000))
    with open(f"{tmp}/text.jpg", "w") as f:
        f.write("this is not a picture")
    with open(f"{tmp}/g.idx", "rb") as f, open(f"{tmp}/truncated.idx", "wb") as g:
        g.write(f.read(3000))
    os.makedirs(f"{tmp}/dir.pt")
    with open(f"{tmp}/bad.csv", "w") as f:
        f.write("path,colour\nimages/a.jpg,red\n")
    with open(f"{tmp}/header_only.csv", "w") as f:
        f.write("path,attribute,value\n")
    with open(f"{tmp}/binary.csv", "wb") as f:
        f.write(b"\xff\xfe\x00garbage\x00\x00")
    shutil.copytree(s, f"{tmp}/nometa")
    os.remove(f"{tmp}/nometa/meta.json")
    shutil.copytree(s, f"{tmp}/badmeta")
    with open(f"{tmp}/badmeta/meta.json", "w") as f:
        f.write("{ not json")
    shutil.copytree(s, f"{tmp}/badsplit")
    with open(f"{tmp}/badsplit/query_valid.txt", "a") as f:
        f.write("9999 0 1\n")
    return s


def cases(t, s):
    ck, idx, img = f"{t}/run/best.pt", f"{t}/g.idx", f"{s}/images/test/00000.jpg"
    tr = ["train.py", "--data-root", s, "--out-dir", f"{t}/o", "--epochs", "1", "--num-triplets", "16", "--batch-size", "8"]
    return [
        # train.py
        ("--epochs 0", tr + ["--epochs", "0"]), ("--batch-size -8", tr + ["--batch-size", "-8"]),
        ("--lr 0", tr + ["--lr", "0"]), ("--lr nan", tr + ["--lr", "nan"]), ("--margin -1", tr + ["--margin", "-1"]),
        ("--mask-init one number", tr + ["--mask-init", "0.9"]), ("--asen-width 0", tr + ["--asen-width", "0"]),
        ("--num-triplets 1e12", tr + ["--num-triplets", "1000000000000"]), ("--img-size 0", tr + ["--img-size", "0"]),
        ("--img-size 33 (not a patch multiple)", tr + ["--img-size", "33"]), ("--out-dim 0", tr + ["--out-dim", "0"]),
        ("--workers -1", tr + ["--workers", "-1"]), ("--log-every 0", tr + ["--log-every", "0"]),
        ("--dist-timeout 0", tr + ["--dist-timeout", "0"]), ("--device cuda on a CPU machine", tr + ["--device", "cuda"]),
        ("--device tpu", tr + ["--device", "tpu"]), ("--batch-size 100 > the epoch", tr + ["--batch-size", "100"]),
        ("--csn-embed-reg with --method cca", tr + ["--csn-embed-reg", "0.1"]),
        ("--data-root missing folder", ["train.py", "--data", "fashionai", "--data-root", f"{t}/nothere", "--epochs", "1"]),
        ("--data-root a file", ["train.py", "--data", "fashionai", "--data-root", f"{t}/empty", "--epochs", "1"]),
        ("--data fashionai on the synthetic folder", ["train.py", "--data", "fashionai", "--data-root", s, "--epochs", "1"]),
        ("a meta.json that is not JSON", tr[:1] + ["--data-root", f"{t}/badmeta"] + tr[3:]),
        ("a split row naming image 9999", tr[:1] + ["--data-root", f"{t}/badsplit"] + tr[3:]),
        ("--out-dir a file", tr + ["--out-dir", f"{t}/empty"]),
        ("--pretrained missing", tr + ["--pretrained", f"{t}/nothere.npz"]),
        ("--pretrained garbage", tr + ["--pretrained", f"{t}/garbage.pt"]),
        ("--pretrained an empty file", tr + ["--pretrained", f"{t}/empty"]),
        ("--resume missing", ["train.py", "--resume", f"{t}/nothere.pt"]),
        ("--resume garbage", ["train.py", "--resume", f"{t}/garbage.pt"]),
        ("--resume truncated", ["train.py", "--resume", f"{t}/truncated.pt"]),
        ("--resume a folder", ["train.py", "--resume", f"{t}/dir.pt"]),
        ("--resume with another --margin", ["train.py", "--resume", ck, "--margin", "0.3"]),
        ("--resume with another --arch", ["train.py", "--resume", ck, "--arch", "vit_r50_b16"]),
        # evaluate.py
        ("--ckpt missing", ["evaluate.py", "--ckpt", f"{t}/nothere.pt"]),
        ("--ckpt garbage", ["evaluate.py", "--ckpt", f"{t}/garbage.pt"]),
        ("--ckpt truncated", ["evaluate.py", "--ckpt", f"{t}/truncated.pt"]),
        ("--ckpt a folder", ["evaluate.py", "--ckpt", f"{t}/dir.pt"]),
        ("--data-root without meta.json", ["evaluate.py", "--ckpt", ck, "--data-root", f"{t}/nometa"]),
        ("--data-root missing", ["evaluate.py", "--ckpt", ck, "--data-root", f"{t}/nothere"]),
        ("--batch-size 0", ["evaluate.py", "--ckpt", ck, "--batch-size", "0"]),
        ("--workers -2", ["evaluate.py", "--ckpt", ck, "--workers", "-2"]),
        ("--json into a folder not there (made: exit 0 is right)", ["evaluate.py", "--ckpt", ck, "--json", f"{t}/made/r.json"]),
        ("--json a folder", ["evaluate.py", "--ckpt", ck, "--json", f"{t}/dir.pt"]),
        # search.py
        ("index: --images missing", ["search.py", "index", "--ckpt", ck, "--images", f"{t}/nothere", "--out", f"{t}/x.idx"]),
        ("index: --images an empty folder", ["search.py", "index", "--ckpt", ck, "--images", f"{t}/dir.pt", "--out", f"{t}/x.idx"]),
        ("index: --out a folder", ["search.py", "index", "--ckpt", ck, "--data-root", s, "--out", f"{t}/dir.pt"]),
        ("index: --batch-size 0", ["search.py", "index", "--ckpt", ck, "--data-root", s, "--out", f"{t}/x.idx", "--batch-size", "0"]),
        ("index: --ckpt garbage", ["search.py", "index", "--ckpt", f"{t}/garbage.pt", "--data-root", s, "--out", f"{t}/x.idx"]),
        ("index: both --images and --data-root", ["search.py", "index", "--ckpt", ck, "--images", s, "--data-root", s, "--out", f"{t}/x.idx"]),
        ("query: --index missing", ["search.py", "query", "--index", f"{t}/nothere.idx", "--ckpt", ck, "--image", img, "--attr", "colour"]),
        ("query: --index truncated", ["search.py", "query", "--index", f"{t}/truncated.idx", "--ckpt", ck, "--image", img, "--attr", "colour"]),
        ("query: --index a checkpoint", ["search.py", "query", "--index", ck, "--ckpt", ck, "--image", img, "--attr", "colour"]),
        ("query: --attr unknown", ["search.py", "query", "--index", idx, "--ckpt", ck, "--image", img, "--attr", "hat"]),
        ("query: --image not a picture", ["search.py", "query", "--index", idx, "--ckpt", ck, "--image", f"{t}/text.jpg", "--attr", "colour"]),
        ("query: --image missing", ["search.py", "query", "--index", idx, "--ckpt", ck, "--image", f"{t}/no.jpg", "--attr", "colour"]),
        ("query: --topk 0", ["search.py", "query", "--index", idx, "--ckpt", ck, "--image", img, "--attr", "colour", "--topk", "0"]),
        ("query: more --weight than --attr", ["search.py", "query", "--index", idx, "--ckpt", ck, "--image", img, "--attr", "colour",
                                              "--weight", "1", "--weight", "2"]),
        ("query: --ckpt another model", ["search.py", "query", "--index", idx, "--ckpt", f"{t}/run2.pt", "--image", img, "--attr", "colour"]),
        ("bench: --out-dim 0", ["search.py", "bench", "--out-dim", "0"]),
        ("bench: --queries 0", ["search.py", "bench", "--queries", "0"]),
        ("bench: --dir a file", ["search.py", "bench", "--num-images", "100", "--dir", f"{t}/empty"]),
        # visualize.py
        ("--attention a missing image", ["visualize.py", "--ckpt", ck, "--attention", f"{t}/no.jpg", "--out", f"{t}/fig"]),
        ("--attention not a picture", ["visualize.py", "--ckpt", ck, "--attention", f"{t}/text.jpg", "--out", f"{t}/fig"]),
        ("--retrieve without --attr", ["visualize.py", "--ckpt", ck, "--retrieve", img, "--out", f"{t}/fig"]),
        ("--topk 0", ["visualize.py", "--ckpt", ck, "--retrieve", img, "--attr", "colour", "--topk", "0", "--out", f"{t}/fig"]),
        ("--out a file", ["visualize.py", "--ckpt", ck, "--attention", img, "--out", f"{t}/empty"]),
        ("--compare garbage", ["visualize.py", "--ckpt", ck, "--embeddings", "--compare", f"{t}/garbage.pt", "--out", f"{t}/fig"]),
        # compare.py
        ("--epochs 0", ["compare.py", "--epochs", "0"]), ("--seeds -1", ["compare.py", "--seeds", "-1"]),
        ("--jobs 0", ["compare.py", "--jobs", "0"]), ("--pretrained missing", ["compare.py", "--pretrained", f"{t}/no.pt", "--epochs", "1"]),
        ("--variant without =", ["compare.py", "--variant", "m02"]),
        ("probe a missing file", ["compare.py", "probe", f"{t}/no.pt", "--data-root", s]),
        ("probe garbage", ["compare.py", "probe", f"{t}/garbage.pt", "--data-root", s]),
        ("--variant with a bad train.py flag", ["compare.py", "--variant", "x=--margin nope", "--data-root", s, "--out-dir", f"{t}/cmp"]),
        # cca.py
        ("info --img-size 0", ["cca.py", "info", "--img-size", "0"]), ("info -K 0", ["cca.py", "info", "--num-conditions", "0"]),
        ("convert a missing file", ["cca.py", "convert", f"{t}/no.npz", f"{t}/o.pt"]),
        ("convert garbage", ["cca.py", "convert", f"{t}/garbage.pt", f"{t}/o.pt"]),
        ("convert into a missing folder", ["cca.py", "convert", ck, f"{t}/nothere/o.pt"]),
        ("convert --img-size 0", ["cca.py", "convert", ck, f"{t}/o.pt", "--img-size", "0"]),
        # dataset_tools.py
        ("synth --size 0", ["dataset_tools.py", "synth", "--out", f"{t}/sy", "--size", "0"]),
        ("synth --num-train -5", ["dataset_tools.py", "synth", "--out", f"{t}/sy", "--num-train", "-5"]),
        ("synth --out a file", ["dataset_tools.py", "synth", "--out", f"{t}/empty"]),
        ("synth onto a dataset", ["dataset_tools.py", "synth", "--out", s]),
        ("check a missing folder", ["dataset_tools.py", "check", "--data-root", f"{t}/nothere"]),
        ("check a meta.json that is not JSON", ["dataset_tools.py", "check", "--data-root", f"{t}/badmeta"]),
        ("prepare --img-size 0", ["dataset_tools.py", "prepare", "--data-root", s, "--img-size", "0"]),
        ("prepare a folder without meta.json", ["dataset_tools.py", "prepare", "--data-root", f"{t}/nometa", "--img-size", "32"]),
        ("import a missing CSV", ["dataset_tools.py", "import", f"{t}/no.csv", "--out", f"{t}/imp"]),
        ("import a CSV naming missing images", ["dataset_tools.py", "import", f"{t}/bad.csv", "--out", f"{t}/imp"]),
        ("import a CSV with a header only", ["dataset_tools.py", "import", f"{t}/header_only.csv", "--out", f"{t}/imp"]),
        ("import a binary file", ["dataset_tools.py", "import", f"{t}/binary.csv", "--out", f"{t}/imp"]),
        ("import --valid-frac 1.5", ["dataset_tools.py", "import", f"{t}/bad.csv", "--out", f"{t}/imp", "--valid-frac", "1.5"]),
        ("import onto a dataset", ["dataset_tools.py", "import", f"{t}/bad.csv", "--out", s]),
        # bench.py
        ("--iters 0", ["bench.py", "--iters", "0"]), ("--triplets 0", ["bench.py", "--triplets", "0"]),
        ("--img-size 0", ["bench.py", "--img-size", "0"]), ("--arch huge", ["bench.py", "--arch", "huge"]),
    ]


def outcome(r):
    """How a command ended: 'one line' (a non-zero exit whose last line is an error), 'traceback', 'silent' (exit 0)."""
    err = r.stderr.strip().splitlines()
    if "Traceback (most recent call last)" in r.stderr:
        return "traceback"
    if r.returncode == 0:
        return "silent (exit 0)"
    last = err[-1] if err else ""
    if last.startswith("error: ") or ": error: " in last:
        return "one line"
    return f"exit {r.returncode}, last line {last[:60]!r}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="the cases whose command holds this text")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as t:
        s = fixtures(t)
        shutil.copy(f"{t}/run/best.pt", f"{t}/run2.pt")
        subprocess.run([sys.executable, "train.py", "--data-root", s, "--out-dir", f"{t}/run2", "--epochs", "1", "--num-triplets",
                        "16", "--batch-size", "8", "--out-dim", "24"], cwd=REPO, check=True, capture_output=True)
        shutil.copy(f"{t}/run2/best.pt", f"{t}/run2.pt")
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        print("| # | input | command | outcome | last line |\n|---:|---|---|---|---|", flush=True)
        counts = {}
        for i, (what, argv) in enumerate(c for c in cases(t, s) if args.only in " ".join(c[1])):
            try:
                r = subprocess.run([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=t, capture_output=True,
                                   text=True, timeout=300, env=env)
                how = outcome(r)
            except subprocess.TimeoutExpired as e:
                r, how = subprocess.CompletedProcess(argv, None, "", e.stderr or ""), "still running after 300 s"
            counts[how] = counts.get(how, 0) + 1
            last = (r.stderr.strip().splitlines() or [""])[-1].replace(t, "T").replace("|", "/")[:150]
            print(f"| {i + 1} | {what} | `{' '.join(argv[:2]) if argv[0] in ('search.py', 'cca.py', 'dataset_tools.py') else argv[0]}` "
                  f"| {how} | {last} |", flush=True)
        print("\n" + ", ".join(f"{n} {k}" for k, n in counts.items()))


if __name__ == "__main__":
    main()
