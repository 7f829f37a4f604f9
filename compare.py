"""
The paper's comparison (Table 2) in miniature: every method on the same backbone, data, budget and seed.

    python compare.py                               # synthetic data, tiny model, CPU: about 50 minutes on 2 cores
    python compare.py --methods cca2 triplet        # a subset
    python compare.py --epochs 10                   # a smaller budget for every method

Trains CCA Type-2, CCA Type-1, TF-CSN, TF-ASEN and the Triplet network with train.py (its defaults for the
dataset, the same for every method) into OUT_DIR/NAME, scores each best checkpoint on the test split with
evaluate.py's code, adds a row of random embeddings, and prints a table shaped like the paper's Table 2 with
the paper's FashionAI totals beside ours. A method whose OUT_DIR/NAME/best.pt exists is not trained again
(delete it to retrain). Writes OUT_DIR/table.md, OUT_DIR/results.json and OUT_DIR/embeddings.png (CCA Type-2
beside the Triplet network, the paper's Figure 5).
"""

import argparse
import json
import os
import time

import torch

import evaluate
import train
from data import DATASETS, EVAL_MISSING, EvalItems, chance_map, error_message, prepare_dataset
from evaluate import evaluate_split, load_checkpoint, mean_average_precision

# name: (row label, train.py flags, the paper's FashionAI total mAP in Table 2)
METHODS = {
    "triplet": ("Triplet network", ["--method", "triplet"], 38.52),
    "csn": ("TF-CSN", ["--method", "csn"], 64.86),
    "asen": ("TF-ASEN", ["--method", "asen"], 64.21),
    "cca1": ("CCA (Type-1)", ["--method", "cca", "--condition-type", "1"], 66.06),
    "cca2": ("CCA (Type-2)", ["--method", "cca", "--condition-type", "2"], 69.03),
}
PAPER_RANDOM = 15.79


def random_row(root, meta, split, dim, seed, missing="error"):
    """mAP of random unit embeddings: the 'random' row of the paper's tables."""
    g = torch.Generator().manual_seed(seed)
    q, c = (EvalItems(meta["name"], root, split, role, 32, missing) for role in ("query", "candidate"))
    result = mean_average_precision(torch.randn(len(q), dim, generator=g), q.attrs, q.values,
                                    torch.randn(len(c), dim, generator=g), c.attrs, c.values)
    return evaluate.mark_incomplete(result, {"query": (q.left_out, q.listed), "candidate": (c.left_out, c.listed)})


def table(rows, meta):
    """Markdown table: one row per method, mAP per attribute, the query-weighted total, the paper's total."""
    names = meta["attributes"]
    head = "| method | " + " | ".join(names) + " | total (query-weighted) | mean over attributes | paper, FashionAI total |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for label, r, paper in rows:
        cells = [f"{100 * r['per_attribute'].get(a, float('nan')):.2f}" for a in range(len(names))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | **{100 * r['total']:.2f}** | {100 * r['mean_over_attributes']:.2f} | {paper:.2f} |")
    notes = sorted({r["incomplete"] for _, r, _ in rows if "incomplete" in r})
    return "\n".join(lines + [f"\nIncomplete split: {n}." for n in notes])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", choices=[d for d in DATASETS if d != "zappos"], help="an mAP dataset")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/NAME)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="which methods to run")
    p.add_argument("--epochs", type=int, default=None, help="epochs for every method (default: train.py's for the dataset)")
    p.add_argument("--split", default="test", choices=("valid", "test"), help="the split scored")
    p.add_argument("--seed", type=int, default=0, help="the same seed for every method")
    p.add_argument("--out-dir", default=os.path.join("runs", "compare"), help="where the runs and the table go")
    p.add_argument("--device", default=None, type=evaluate.device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--eval-missing", default="error", choices=EVAL_MISSING,
                   help="a listed valid or test image that is missing: error (default), or drop: score without it, the "
                        "table then marked not comparable with published numbers")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more train.py flags for every method (put last)")
    args = p.parse_args(argv)
    root, meta = prepare_dataset(args.data, args.data_root)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    common = ["--data", args.data, "--data-root", root, "--seed", str(args.seed), "--eval-missing", args.eval_missing] + (
        ["--epochs", str(args.epochs)] if args.epochs else [])
    if args.device:
        common += ["--device", args.device]
    rows, results, times = [], {}, {}
    for name in args.methods:
        label, flags, paper = METHODS[name]
        out = os.path.join(args.out_dir, name)
        ckpt_path = os.path.join(out, "best.pt")
        if os.path.isfile(ckpt_path):
            print(f"== {label}: {ckpt_path} exists, not trained again")
        else:
            print(f"== {label}: training into {out}")
            t0 = time.time()
            train.main(common + flags + ["--out-dir", out] + args.train_args)
            times[name] = time.time() - t0
        model, ckpt = load_checkpoint(ckpt_path, device)
        r = evaluate_split(model, meta, root, args.split, model.cfg.img_size, device, missing=args.eval_missing)
        results[name] = dict(label=label, paper_fashionai_total=paper, epochs=ckpt["args"]["epochs"], train_seconds=times.get(name), **r)
        rows.append((label, r, paper))
        print(f"{label}: {args.split} total mAP {100 * r['total']:.2f}")
    rnd = random_row(root, meta, args.split, 1024, args.seed, args.eval_missing)
    rows.insert(0, ("random embedding", rnd, PAPER_RANDOM))
    results["random"] = dict(label="random embedding", paper_fashionai_total=PAPER_RANDOM, **rnd)
    chance = chance_map(args.data, root, args.split, args.eval_missing)
    text = table(rows, meta) + f"\n\nChance level of this split (expected AP of a random ranking, query-weighted): {100 * chance:.2f}."
    print("\n" + text)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump(dict(data=args.data, split=args.split, chance=chance, methods=results), f, indent=2, default=str)
    if "cca2" in args.methods and "triplet" in args.methods:  # the paper's Figure 5: CCA beside the Triplet network
        ckpt = lambda name: os.path.join(args.out_dir, name, "best.pt")  # noqa: E731
        evaluate.main(["--ckpt", ckpt("cca2"), "--compare", ckpt("triplet"), "--embeddings", "--no-score", "--split", args.split,
                       "--data-root", root, "--out", args.out_dir, "--eval-missing", args.eval_missing]
                      + (["--device", args.device] if args.device else []))
    print(f"wrote {args.out_dir}/table.md, results.json")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError) as e:  # a missing dataset or image, an unreadable checkpoint: one line
        raise SystemExit(f"error: {error_message(e)}")
