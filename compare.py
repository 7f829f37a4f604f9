"""
The paper's comparison (Table 2) in miniature: every method on the same backbone, data and budget, over several seeds.

    python compare.py                               # synthetic data, tiny model, 5 methods x seeds 0 1 2: 15 runs
    python compare.py --seeds 0 1 2 3 4             # more seeds
    python compare.py --methods cca2 triplet        # a subset
    python compare.py --epochs 10                   # a smaller budget for every method
    python compare.py --jobs 15 --device cuda       # 15 trainings at once on one GPU (each a process)
    python compare.py --methods cca2 asen --variant base= --variant m02="--margin 0.2"   # an ablation grid
    python compare.py --jobs 15 --device cuda --train-args --arch mini      # the paper's proportions (cca.py's mini)
    python compare.py probe runs/compare/seed0/cca2/best.pt                 # what its trunk holds (linear probes)

Trains CCA Type-2, CCA Type-1, TF-CSN, TF-ASEN and the Triplet network with train.py (its defaults for the
dataset, the same for every method) into OUT_DIR/seedS/NAME for each seed S, scores each best checkpoint on the
test split with evaluate.py's code, adds a row of random embeddings, and prints a table shaped like the paper's
Table 2: per attribute and in total, the mean over the seeds with the lowest and highest seed in brackets, the
paper's FashionAI totals beside. A run whose folder OUT_DIR/seedS/NAME has finished its epochs is not trained again
(delete the folder to retrain); one that stopped short goes on from its last.pt. Writes OUT_DIR/table.md, OUT_DIR/results.json (every seed's numbers, and the mean, min, max and standard
deviation) and OUT_DIR/embeddings.png (CCA Type-2 beside the Triplet network for the first seed, the paper's
Figure 5).

An ablation grid: each `--variant NAME=FLAGS` adds train.py flags to every method's run (NAME= alone: none, the
defaults), trained into OUT_DIR/NAME/seedS/METHOD; the table has one row per method and variant, in the order given,
and the flags of each variant under it. A variant's flags are checked with train.py's parser before anything trains.

From a pretrained trunk, in miniature. The paper fine-tunes every method from ImageNet-21k weights; here a trunk is
pretrained on another image family with its own classes (synthetic.py's shapes set: 8 figures x 3 fills, 24 classes,
drawn at random colours, sizes and places; no garment, no attribute of the synthetic set), by cross-entropy of a
linear classifier on [CLS], and saved in the layout `--pretrained` loads:

    python compare.py pretrain --out runs/pretrain/tiny.pt                  # 12,000 images, 10 epochs
    python compare.py --pretrained runs/pretrain/tiny.pt                    # into runs/compare-pretrained

Every method then starts from that trunk with --trunk-warmup 0, as on real data; everything else is the same.
`pretrain` prints its accuracy on a held-out draw (chance: 1/24) and writes it into the file's "source" line.

What a trunk holds, whether or not a method's conditional part reads it out:

    python compare.py probe runs/pretrain/mini.pt runs/compare/seed0/cca2/best.pt

fits a linear classifier per attribute on the frozen shared trunk's output (blocks 1..L-1) of training images, on
its [CLS] token, on the mean of its patch tokens, and on every token side by side, and prints each one's accuracy
on other training images beside the most frequent value's share. For CCA and TF-ASEN it also prints how spread
out each condition's attention over the patch locations is (block L's query, or TF-ASEN's spatial attention): the
heaviest location's share of the weight and exp(entropy), the effective number of locations.
"""

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import evaluate
import train
import visualize
from cca import (ARCH_SIZES, METHOD_TITLES, CCAConfig, build_model, count_parameters, load_checkpoint, load_pretrained, read_checkpoint,
                 save_backbone, torch_load)
from data import DATASETS, EVAL_MISSING, normalise, prepare_dataset, read_filenames, read_image, read_labels
from evaluate import chance_map, embed_split, mean_average_precision, split_map
from runtime import default_device, device_arg, error_message, fmt_time, number, output_file, output_folder
from synthetic import SHAPE_CLASSES, make_shapes

# name: (row label, train.py flags, the paper's FashionAI total mAP in Table 2)
METHODS = {
    "triplet": (METHOD_TITLES["triplet", None], ["--method", "triplet"], 38.52),
    "csn": (METHOD_TITLES["csn", None], ["--method", "csn"], 64.86),
    "asen": (METHOD_TITLES["asen", None], ["--method", "asen"], 64.21),
    "cca1": (METHOD_TITLES["cca", 1], ["--method", "cca", "--condition-type", "1"], 66.06),
    "cca2": (METHOD_TITLES["cca", 2], ["--method", "cca", "--condition-type", "2"], 69.03),
}
PAPER_RANDOM = 15.79


def variant_arg(text):
    """--variant's type: 'NAME=FLAGS' -> (NAME, [train.py flags])."""
    name, sep, flags = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FLAGS, e.g. m02='--margin 0.2' (NAME: letters, digits, _ . -)")
    try:
        return name, shlex.split(flags)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def random_row(items, dim, seed):
    """mAP of random unit embeddings for the split's {"query", "candidate"} items: the 'random' row of the paper's tables."""
    g = torch.Generator().manual_seed(seed)
    q, c = items["query"], items["candidate"]
    result = mean_average_precision(torch.randn(len(q), dim, generator=g), q.attrs, q.values,
                                    torch.randn(len(c), dim, generator=g), c.attrs, c.values)
    return evaluate.mark_incomplete(result, {"query": (q.left_out, q.listed), "candidate": (c.left_out, c.listed)})


def over_seeds(runs, num_attributes):
    """Mean, min, max and standard deviation (n - 1; 0 for one seed) over the seeds' results, per attribute and in
    total: {stat: {"total", "mean_over_attributes", "per_attribute": {a: value}}}, and "incomplete": the seeds' notes
    of a split scored without some of its images (evaluate.mark_incomplete)."""
    def stats(values):
        v = np.array(values, dtype=np.float64)
        return dict(mean=v.mean(), min=v.min(), max=v.max(), std=v.std(ddof=1) if len(v) > 1 else 0.0)
    cols = {"total": stats([r["total"] for r in runs]), "mean_over_attributes": stats([r["mean_over_attributes"] for r in runs])}
    per = {a: stats([r["per_attribute"][a] for r in runs]) for a in range(num_attributes) if all(a in r["per_attribute"] for r in runs)}
    agg = {s: dict(total=float(cols["total"][s]), mean_over_attributes=float(cols["mean_over_attributes"][s]),
                   per_attribute={a: float(v[s]) for a, v in per.items()}) for s in ("mean", "min", "max", "std")}
    return dict(agg, incomplete=sorted({r["incomplete"] for r in runs if "incomplete" in r}))


def cell(agg, get, seeds):
    """'mean' for one seed, else 'mean (min-max)', in per cent."""
    if get(agg["mean"]) is None:
        return "n/a"
    text = f"{100 * get(agg['mean']):.2f}"
    return text if seeds == 1 else text + f" ({100 * get(agg['min']):.2f}-{100 * get(agg['max']):.2f})"


def table(rows, meta, seeds):
    """Markdown table: one row per method, mAP per attribute, the query-weighted total, the paper's total."""
    names = meta["attributes"]
    head = "| method | " + " | ".join(names) + " | total (query-weighted) | mean over attributes | paper, FashionAI total |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for label, agg, paper in rows:
        cells = [cell(agg, lambda r, a=a: r["per_attribute"].get(a), seeds) for a in range(len(names))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{cell(agg, lambda r: r['total'], seeds)}** | "
                     f"{cell(agg, lambda r: r['mean_over_attributes'], seeds)} | {paper:.2f} |")
    notes = sorted({n for _, agg, _ in rows for n in agg["incomplete"]})
    return "\n".join(lines + [f"\nIncomplete split: {n}." for n in notes])


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["pretrain"]:
        return pretrain(argv[1:])
    if argv[:1] == ["probe"]:
        return probe(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", choices=[d for d in DATASETS if d != "zappos"], help="an mAP dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/NAME)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which methods to run")
    p.add_argument("--epochs", type=number(int, 1), default=None, help="epochs for every method (default: train.py's for the dataset)")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="the split scored")
    p.add_argument("--seeds", type=number(int, 0), nargs="+", default=[0, 1, 2], help="every method is trained once per seed")
    p.add_argument("--pretrained", default=None, help="start every method from this trunk ('compare.py pretrain' or 'cca.py convert' .pt), "
                                                      "with --trunk-warmup 0")
    p.add_argument("--out-dir", default=None, help="where the runs and the table go (default: runs/compare, or runs/compare-pretrained "
                                                   "with --pretrained)")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--eval-missing", default="error", choices=EVAL_MISSING,
                   help="a listed valid or test image that is missing: error (default), or drop: score without it, the "
                        "table then marked not comparable with published numbers")
    p.add_argument("--jobs", type=number(int, 1), default=1,
                   help="trainings run at once, each in its own train.py process with its output in OUT_DIR/seedS/NAME/train.log "
                        "(default: 1, in this process). The tiny models leave a GPU mostly idle: several share it well")
    p.add_argument("--variant", type=variant_arg, action="append", default=None, metavar="NAME=FLAGS",
                   help="an ablation: these train.py flags for every method, into OUT_DIR/NAME (repeat for a grid; NAME= alone: "
                        "the defaults); the table has a row per method and variant")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every method (put last)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds repeats a seed: {args.seeds}")
    variants = dict(args.variant or [(None, [])])  # name -> flags; None: no grid, the runs in OUT_DIR/seedS/METHOD
    if len(variants) != len(args.variant or [None]):
        p.error(f"--variant repeats a name: {[v for v, _ in args.variant]}")
    if args.pretrained and not os.path.isfile(args.pretrained):
        p.error(f"--pretrained {args.pretrained}: no such file (make one with: python compare.py pretrain --out {args.pretrained})")
    out_dir = output_folder(args.out_dir or os.path.join("runs", "compare-pretrained" if args.pretrained else "compare"),
                            "--out-dir")
    root, meta = prepare_dataset(args.data, args.data_root)
    device = default_device(args.device)
    common = ["--data", args.data, "--data-root", root, "--eval-missing", args.eval_missing] + (
        ["--epochs", str(args.epochs)] if args.epochs else [])
    if args.pretrained:
        common += ["--pretrained", args.pretrained, "--trunk-warmup", "0"]
    if args.device:
        common += ["--device", args.device]
    grid = [(v, name) for v in variants for name in args.methods]  # the table's rows, random embeddings' aside
    label = {(v, name): METHODS[name][0] + (f", {v}" if v else "") for v, name in grid}
    for v, name in grid:  # a flag train.py refuses stops the grid now, not after hours of the other runs
        try:
            with contextlib.redirect_stderr(io.StringIO()) as said:
                train.parse_args(common + METHODS[name][1] + variants[v] + args.train_args)
        except SystemExit:
            why = (said.getvalue().strip().splitlines() or ["refused"])[-1].split("error: ", 1)[-1]
            p.error(f"{label[v, name]}: train.py {shlex.join(variants[v] + args.train_args)}: {why}")
    A, t_all = len(meta["attributes"]), time.time()
    runs = {key: {} for key in [(None, "random")] + grid}  # (variant, name) -> seed -> result
    todo, seconds = [], {}  # (label, out, train.py flags) to train; out -> training seconds
    folder = {(v, seed, name): os.path.join(out_dir, *([v] if v else []), f"seed{seed}", name) for v, name in grid for seed in args.seeds}
    for seed in args.seeds:  # a run that finished is scored as it is; one that stopped early goes on from its last.pt
        for v, name in grid:
            out, what = folder[v, seed, name], f"{label[v, name]}, seed {seed}"
            flags = common + METHODS[name][1] + variants[v] + ["--seed", str(seed), "--out-dir", out] + args.train_args
            done, wanted, last = finished_epochs(out), train.parse_args(flags)[0].epochs, os.path.join(out, "last.pt")
            if done >= wanted and os.path.isfile(os.path.join(out, "best.pt")):
                print(f"== {what}: {out} has finished its {done} epochs, not trained again")
            elif done:
                print(f"== {what}: {last} stopped after epoch {done} of {wanted}, resumed")
                todo.append((what, out, flags + ["--resume", last]))
            else:
                todo.append((what, out, flags))
    if args.jobs == 1:
        for what, out, flags in todo:
            print(f"== {what}: training into {out}")
            t0 = time.time()
            train.main(flags)
            seconds[out] = time.time() - t0
    else:
        seconds = train_in_parallel(todo, args.jobs)
    figure = {}  # the first seed's CCA Type-2 and Triplet network: (model, items, features) for the embeddings picture
    for seed in args.seeds:
        for v, name in grid:
            out = folder[v, seed, name]
            model, _ = load_checkpoint(os.path.join(out, "best.pt"), device)
            items, feats = embed_split(model, meta, root, args.split, model.cfg.img_size, device, missing=args.eval_missing)
            r = split_map(items, feats)  # evaluate_split's mAP, with the features kept for the picture
            runs[v, name][seed] = dict(epochs=finished_epochs(out), train_seconds=seconds.get(out), **r)
            print(f"{label[v, name]}, seed {seed}: {args.split} total mAP {100 * r['total']:.2f}")
            if seed == args.seeds[0] and v == next(iter(variants)) and name in ("cca2", "triplet"):
                figure[name] = model, items, feats
        runs[None, "random"][seed] = random_row(items, 1024, seed)

    results, rows = {}, []
    for (v, name), by_seed in runs.items():
        text, _, paper = METHODS[name] if name != "random" else ("random embedding", None, PAPER_RANDOM)
        agg = over_seeds(list(by_seed.values()), A)
        rows.append((label.get((v, name), text), agg, paper))
        results[f"{name}/{v}" if v else name] = dict(
            label=label.get((v, name), text), variant=v, paper_fashionai_total=paper, totals={s: r["total"] for s, r in by_seed.items()},
            **agg["mean"], **{k: agg[k] for k in ("min", "max", "std")}, seeds=by_seed,
            **({"incomplete": agg["incomplete"]} if agg["incomplete"] else {}))
    chance = chance_map(args.data, root, args.split, args.eval_missing)
    n = len(args.seeds)
    text = (table(rows, meta, n) + f"\n\n{args.split} mAP in per cent" + (f", mean over {n} seeds ({', '.join(map(str, args.seeds))}) "
            "with the lowest and highest seed in brackets" if n > 1 else f", seed {args.seeds[0]}")
            + (f"; every method from the pretrained trunk {args.pretrained}" if args.pretrained else "; every method from scratch")
            + f". Chance level of this split (expected AP of a random ranking, query-weighted): {100 * chance:.2f}."
            + "".join(f"\nVariant {v}: {shlex.join(flags) or '(the defaults)'}" for v, flags in variants.items() if v))
    print("\n" + text)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(dict(data=args.data, split=args.split, chance=chance, seeds=args.seeds, pretrained=args.pretrained, machine=machine(device),
                       variants={v: flags for v, flags in variants.items() if v},
                       wall_seconds=time.time() - t_all, methods=results), f, indent=2, default=str)
    if len(figure) == 2:  # the paper's Figure 5: CCA beside the Triplet network, features from the scoring above
        (cca2, items, f_cca2), (triplet, _, f_triplet) = figure["cca2"], figure["triplet"]
        scores = visualize.embeddings_picture([cca2, triplet], items, meta, os.path.join(out_dir, "embeddings.png"), device,
                                              feats=[f_cca2, f_triplet])
        print(visualize.format_separation(scores))
        print(f"wrote {out_dir}/embeddings.png")
    print(f"wrote {out_dir}/table.md, results.json")


def finished_epochs(out):
    """How many epochs the run in folder `out` has finished, from its last.pt (0 without one)."""
    last = os.path.join(out, "last.pt")
    return read_checkpoint(last, ("epoch",))["epoch"] + 1 if os.path.isfile(last) else 0


def train_in_parallel(todo, jobs):
    """Run train.py once per (what, out, flags) of todo, at most `jobs` processes at a time, each with one CPU thread
    and its output in out/train.log. Returns {out: seconds}; stops at the first failure, ending the others, with the
    end of that run's log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    waiting, running, seconds, t_all = list(todo), {}, {}, time.time()
    print(f"training {len(todo)} runs, {jobs} at a time; each run's output in its folder's train.log")
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                what, out, flags = waiting.pop(0)
                os.makedirs(out, exist_ok=True)
                log = open(os.path.join(out, "train.log"), "w")
                running[what] = (subprocess.Popen([sys.executable, script] + flags, stdout=log, stderr=subprocess.STDOUT,
                                                         env=env), log, out, time.time())
            time.sleep(0.5)
            for what, (proc, log, out, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[what]
                if proc.returncode != 0:
                    with open(log.name) as f:
                        tail = f.read().strip().splitlines()[-1:] or ["(no output)"]
                    raise SystemExit(f"error: {what} failed (exit {proc.returncode}): {tail[0]} (whole log: {log.name})")
                seconds[out] = time.time() - t0
                done = len(seconds)
                eta = (time.time() - t_all) / done * (len(todo) - done)  # at the rate of runs finished so far
                print(f"{what}: trained in {fmt_time(seconds[out])} ({done}/{len(todo)}; "
                      f"eta {fmt_time(eta)})", flush=True)
    finally:
        for proc, log, _, _ in running.values():
            proc.kill()
            proc.wait()
            log.close()
    return seconds


# -----------------------------------------------------------------------------
# compare.py pretrain: the tiny backbone pretrained on the shapes set


def pretrain(argv=None):
    """Train every block of the plain hybrid ViT with a linear classifier on [CLS] (after the final norm) to tell the
    shapes set's 24 classes apart; score it on a held-out draw; save the backbone for --pretrained."""
    p = argparse.ArgumentParser(prog="compare.py pretrain", description=pretrain.__doc__)
    p.add_argument("--out", default=None, help="the backbone file written (default: runs/pretrain/ARCH.pt)")
    p.add_argument("--arch", default="tiny", choices=sorted(ARCH_SIZES), help="backbone size (the comparison's: tiny)")
    p.add_argument("--img-size", type=number(int, 1), default=32, help="input size (the comparison's: 32)")
    p.add_argument("--num-train", type=number(int, 1), default=12_000, help="training images, drawn once")
    p.add_argument("--num-test", type=number(int, 1), default=2_400, help="held-out images (another draw) for the accuracy")
    p.add_argument("--epochs", type=number(int, 1), default=10, help="passes over the training images")
    p.add_argument("--batch-size", type=number(int, 1), default=128, help="images per step")
    p.add_argument("--lr", type=number(float, above=0), default=5e-4, help="Adam learning rate, after a linear warm-up over the first epoch, "
                                                          "then a cosine decay to 0")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the images and of the weights")
    p.add_argument("--workers", type=number(int, 1), default=min(8, os.cpu_count() or 1),
                   help="processes drawing the images (default: the cores, at most 8; the images do not depend on it)")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-every", type=number(int, 1), default=20, help="steps between progress lines")
    args = p.parse_args(argv)
    for k in ("num_train", "num_test", "epochs", "batch_size", "log_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if args.num_train < args.batch_size:
        p.error(f"--num-train {args.num_train} is less than one batch of {args.batch_size}")
    args.out = args.out or os.path.join("runs", "pretrain", f"{args.arch}.pt")
    output_file(args.out, "--out file")  # before the training whose result it keeps
    device = default_device(args.device)
    t0 = time.time()
    x_train, y_train = make_shapes(args.num_train, args.img_size, seed=2 * args.seed, workers=args.workers)
    x_test, y_test = make_shapes(args.num_test, args.img_size, seed=2 * args.seed + 1, workers=args.workers)
    print(f"shapes: {args.num_train} training and {args.num_test} held-out images of {len(SHAPE_CLASSES)} classes, "
          f"{args.img_size} px, drawn in {time.time() - t0:.0f} s")

    torch.manual_seed(args.seed)
    model = build_model(CCAConfig(arch=args.arch, num_conditions=1, img_size=args.img_size, method="triplet")).to(device)
    classifier = nn.Linear(model.cfg.sizes["embed_dim"], len(SHAPE_CLASSES)).to(device)  # dropped after pretraining
    backbone = set(model.backbone_keys())  # all but the unused comparison head
    params = [p for n, p in model.named_parameters() if n in backbone] + list(classifier.parameters())
    optimizer = torch.optim.Adam(params, lr=args.lr)
    steps_per_epoch = args.num_train // args.batch_size
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    print(f"model {args.arch}: {count_parameters(model) - count_parameters(model.head):,} backbone parameters; {total} steps of "
          f"{args.batch_size} on {device}")

    def logits(x):
        return classifier(model.features(normalise(x.to(device)))[:, 0])

    t_start, step = time.time(), 0
    for epoch in range(args.epochs):
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(args.num_train, generator=g)
        loss_sum, correct, seen, t_log = 0.0, 0, 0, time.time()
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx].to(device)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # a mirrored figure keeps its class
            out = logits(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(idx)
            if (i + 1) % args.log_every == 0 or i + 1 == steps_per_epoch:
                if not math.isfinite(loss_sum):
                    raise SystemExit(f"error: pretraining loss is {loss_sum} at epoch {epoch + 1} step {i + 1} (lower --lr?)")
                eta = (time.time() - t_start) / step * (total - step)
                print(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps_per_epoch} loss {loss_sum / seen:.4f} "
                      f"accuracy {correct / seen:.3f} lr {scheduler.get_last_lr()[0]:.2e} {seen / (time.time() - t_log):.0f} img/s "
                      f"eta {fmt_time(eta)}", flush=True)
                loss_sum, correct, seen, t_log = 0.0, 0, 0, time.time()

    model.eval()
    with torch.no_grad():
        pred = torch.cat([logits(x_test[i:i + 256]).argmax(1).cpu() for i in range(0, args.num_test, 256)])
    accuracy = (pred == y_test).float().mean().item()
    seconds = time.time() - t_start
    print(f"held-out accuracy {100 * accuracy:.2f} (chance {100 / len(SHAPE_CLASSES):.2f}) after {fmt_time(seconds)} of training")
    save_backbone(model.cpu(), args.out, f"compare.py pretrain: shapes set, {len(SHAPE_CLASSES)} classes, {args.num_train} images, "
                                         f"{args.epochs} epochs, seed {args.seed}; held-out accuracy {accuracy:.4f}")
    return dict(accuracy=accuracy, seconds=seconds)


# -----------------------------------------------------------------------------
# compare.py probe: what a trunk holds, read by a linear classifier per attribute

PROBES = {"[CLS]": lambda t: t[:, 0], "patch mean": lambda t: t[:, 1:].mean(1), "every token": lambda t: t.flatten(1)}


def linear_probe(x_fit, y_fit, x_score, y_score, classes, weight_decay=1e-3, iters=300):
    """The accuracy on (x_score, y_score) of a softmax regression over `classes` values fit to (x_fit, y_fit): features
    standardised with the fitting set's mean and deviation, cross-entropy plus weight_decay x the squared weights,
    minimised by L-BFGS (a convex problem: the fit does not depend on a seed or a learning rate)."""
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_score = (x_fit - mu) / sd, (x_score - mu) / sd
    w = torch.zeros(x_fit.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x_fit @ w + b, y_fit) + weight_decay * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x_score @ w + b).argmax(1) == y_score).float().mean().item()


def attention_spread(maps):
    """(heaviest, effective) of attention maps (..., N) whose last axis sums to 1: the mean over every leading index
    (images, heads) of the largest weight, and of exp(entropy), the number of equally weighted locations with the same
    entropy (N for a uniform map, 1 for one location)."""
    maps = maps.double().flatten(0, -2)
    entropy = -(maps * maps.clamp_min(1e-30).log()).sum(-1)
    return maps.max(-1).values.mean().item(), entropy.exp().mean().item()


def probe_model(path, device):
    """A train.py checkpoint's model, or a plain one holding a 'compare.py pretrain' backbone file; in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compare.py probe: no such file: {path}")
    obj = torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == "cca-backbone":
        model = build_model(CCAConfig(arch=obj["arch"], num_conditions=1, img_size=obj["img_size"], method="triplet"))
        load_pretrained(model, path, verbose=False)
        return model.to(device).eval()
    return load_checkpoint(path, device)[0]


def probe(argv=None):
    """Linear probes of each model's shared trunk (blocks 1..L-1, frozen): per attribute, a softmax regression on the
    features of two thirds of a random draw of training images labelled with it, scored on the other third."""
    p = argparse.ArgumentParser(prog="compare.py probe", description=probe.__doc__)
    p.add_argument("models", nargs="+", help="train.py checkpoints or 'compare.py pretrain' backbone files")
    p.add_argument("--data", default="synthetic", choices=[d for d in DATASETS if d != "zappos"], help="an ASEN-format dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/NAME)")
    p.add_argument("--num-images", type=number(int, 3), default=3000, help="training images drawn (default 3,000)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the draw and of its split")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    args = p.parse_args(argv)
    root, meta = prepare_dataset(args.data, args.data_root)
    names = read_filenames(os.path.join(root, "filenames_train.txt"))
    rows = read_labels(os.path.join(root, "label_train.txt"), len(names), meta, multi=True)
    labelled = np.unique(rows[:, 0])
    drawn = np.random.default_rng(args.seed).permutation(labelled)[:args.num_images]
    position = {int(f): i for i, f in enumerate(drawn)}
    device, images, results = default_device(args.device), {}, {}
    for path in args.models:
        model = probe_model(path, device)
        size = model.cfg.img_size
        if size not in images:  # uint8, as the loader gives them
            images[size] = torch.stack([read_image(os.path.join(root, names[f]), size) for f in drawn])
        with torch.no_grad():
            trunk = torch.cat([model.trunk(normalise(images[size][i:i + 256].to(device))).float().cpu()
                               for i in range(0, len(drawn), 256)])
        feats = {name: f(trunk) for name, f in PROBES.items()}
        results[path] = {name: {} for name in [*PROBES, "most frequent value"]}
        spread = {}  # attribute: (heaviest, effective), for a model whose conditional part attends (CCA, TF-ASEN)
        for a, attr in enumerate(meta["attributes"]):
            mine = rows[(rows[:, 1] == a) & np.isin(rows[:, 0], drawn)]
            at = np.array([position[int(f)] for f in mine[:, 0]], dtype=np.int64)
            order = np.argsort(at)  # in the draw's random order, not the label file's: the split is then random too
            at, y = torch.as_tensor(at[order]), torch.as_tensor(mine[order, 2])
            n_fit = 2 * len(at) // 3
            if n_fit < 10 or len(at) - n_fit < 5:
                raise ValueError(f"{root}: {len(at)} of the {len(drawn)} images drawn are labelled with {attr}: too few to "
                                 "probe (raise --num-images)")
            classes = len(meta["values"][a])
            for name, x in feats.items():
                results[path][name][attr] = linear_probe(x[at[:n_fit]], y[:n_fit], x[at[n_fit:]], y[n_fit:], classes)
            results[path]["most frequent value"][attr] = torch.bincount(y[n_fit:], minlength=classes).max().item() / (len(at) - n_fit)
            if model.cfg.method in ("cca", "asen"):  # over every image labelled with the attribute, under its condition
                with torch.no_grad():
                    maps = torch.cat([model.trunk_attention_maps(trunk[at[i:i + 256]].to(device),  # the trunk's output, kept
                                                                 torch.full((len(at[i:i + 256]),), a, device=device)).float().cpu()
                                      for i in range(0, len(at), 256)])
                spread[attr] = attention_spread(maps / maps.sum(-1, keepdim=True))  # [CLS] as a key: its share left out
        if spread:
            results[path]["attention: heaviest location"] = {attr: h for attr, (h, _) in spread.items()}
            results[path]["attention: effective locations"] = {attr: e for attr, (_, e) in spread.items()}
        print(f"\n{path} ({model.cfg.arch}, {size} px): linear-probe accuracy in per cent on {len(drawn)} training images "
              f"of {args.data}, two thirds fit and one third scored per attribute")
        print(f"| {'features':20s} | " + " | ".join(meta["attributes"]) + " |")
        for name, accs in results[path].items():
            if not name.startswith("attention"):
                print(f"| {name:20s} | " + " | ".join(f"{100 * accs[attr]:.1f}" for attr in meta["attributes"]) + " |")
        if spread:
            n = model.cfg.grid ** 2
            print(f"the conditional part's attention (CCA: block L's query; TF-ASEN: its spatial attention) under each "
                  f"condition over the {n} patch locations (uniform: {100 / n:.1f}% each, {n} effective), mean over images "
                  "and heads: heaviest location in per cent / exp(entropy)")
            print("| " + " | ".join(f"{attr} {100 * h:.1f} / {e:.1f}" for attr, (h, e) in spread.items()) + " |")
    return results


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a missing dataset or image, an unreadable checkpoint: one line
        raise SystemExit(f"error: {error_message(e)}")
