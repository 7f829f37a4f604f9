"""
Train CCA with conditioned triplets (paper sections 3.3 and 4.2), on one process or many.

    python train.py                                        # the demo: tiny model, synthetic data, CPU, minutes
    python evaluate.py --ckpt runs/synthetic/best.pt       # then score it on the test split

    python cca.py convert R50+ViT-B_16.npz vit_r50_b16_224.pt
    torchrun --nproc_per_node=8 train.py --data fashionai --pretrained vit_r50_b16_224.pt
    python dataset_tools.py import catalogue.csv --out data/shop   # your own catalogue (a CSV of labels), then
    torchrun --nproc_per_node=8 train.py --data custom --data-root data/shop --pretrained vit_r50_b16_224.pt
    python train.py --resume runs/fashionai/last.pt        # continue a run: its data, recipe and folder

The paper's recipe is the default on real data: 64 triplets per step in total (split over the ranks),
Adam at 1e-4, margin 0.2, 100,000 fresh triplets per epoch (Zappos: CSN's 200,000 fixed triplets),
200 epochs, validation mAP every epoch, the best checkpoint kept. The paper does not give the
optimizer or the schedule; we follow ASEN's: Adam, the rate times 0.985 after each epoch.
The demo (`--data synthetic`, the default) keeps the recipe's shape with a budget for a laptop CPU; training
the tiny model from scratch, it also uses margin 0.1 and warms the trunk's learning rate up over 625 steps
(DEMO below).
Prints a progress line every --log-every steps and the validation table after each evaluation;
writes OUT_DIR/last.pt every epoch and OUT_DIR/best.pt on a new best (rank 0, write then rename).
"""

import argparse
import contextlib
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from cca import (ARCH_SIZES, CHECKPOINT_KEYS, CSN_PENALTY, METHODS, RESUME_KEYS, CCAConfig, build_model, count_parameters,
                 load_model_state, load_pretrained, read_checkpoint, save_checkpoint)
from data import (DATASETS, EVAL_MISSING, TripletBatches, check_eval_images, describe_images, normalise, prepare_dataset,
                  training_set)
from evaluate import NOT_COMPARABLE, chance_map, evaluate_split, format_results
from runtime import (autocast, cleanup, default_device, device_arg, error_message, exit_rank, fmt_time, gpu_peak, held,
                     number, output_folder, print0, setup, training_flops)

# -----------------------------------------------------------------------------
# the flags and their defaults, resolved once (resolve) before anything is trained

# Defaults that depend on the dataset: the paper's recipe on real data, a laptop budget on the synthetic set.
RECIPE = dict(arch="vit_r50_b16", epochs=200, batch_size=64, lr=1e-4, margin=0.2, trunk_warmup=0, workers=8, cache_images=False,
              eval_every=1, mask_init=(0.9, 0.7), cls_key=True)
# The demo keeps the recipe's shape with a budget for a laptop CPU (docs/DESIGN.md, "Training"; how each value was
# chosen: docs/LOG.md). Margin 0.1 and the trunk's warm-up (625 steps, 5 epochs) let the attributes leave the
# collapsed start sooner when training from scratch. Its 6,000 training images are decoded once into memory (18 MB)
# and batched in the training process: a loader worker decoding JPEGs would take one of a laptop's few cores. Type-2's
# table M is drawn from normal(0, 1), not CSN's normal(0.9, 0.7), whose condition tokens start alike, and block L
# attends over the patch tokens alone: from scratch its heads settle on [CLS] and leave attributes at chance.
DEMO = dict(arch="tiny", img_size=32, epochs=45, batch_size=32, num_triplets=4_000, lr=2e-4, margin=0.1, trunk_warmup=625, workers=0,
            cache_images=True, eval_every=3, mask_init=(0.0, 1.0), cls_key=False)
# Defaults that depend on nothing (img_size, num_triplets, compile and TF-CSN's penalties are worked out in resolve).
GENERAL = dict(data="synthetic", method="cca", condition_type=2, out_dim=1024, flip=True, lr_decay=0.985, weight_decay=0.0,
               eval_batch_size=128, eval_missing="error", seed=0, log_every=20, channels_last=False, compile_mode="default",
               asen_width=0, cls_residual=True)
# What a checkpoint written before a flag existed was trained with: --resume takes these where its args lack them.
BEFORE_FLAGS = dict(asen_width=512, mask_init=(0.9, 0.7), cls_key=True, cls_residual=True)

# The flags that shape the model: --resume takes them from the checkpoint, and refuses a different value given.
MODEL_FLAGS = ("arch", "img_size", "method", "condition_type", "out_dim", "asen_width", "cls_key", "cls_residual")
# What else makes a run the run it is: --resume takes these from the checkpoint too, and refuses a different value, so
# that a resumed run repeats the uninterrupted one. Everything else (--epochs, --data-root, --out-dir, the system
# flags) may be given anew; left out, how far the run goes comes from the checkpoint, the system from here, and it
# writes beside the checkpoint it resumes.
RUN_FLAGS = MODEL_FLAGS + ("data", "seed", "num_triplets", "batch_size", "lr", "lr_decay", "trunk_warmup", "weight_decay", "margin",
                           "csn_embed_reg", "csn_mask_reg", "flip", "mask_init")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
FROM_CHECKPOINT = RUN_FLAGS + ("data_root", "epochs", "eval_every", "eval_missing", "cache_images")


def mean_std(text):
    """'MEAN,STD' -> (mean, std), std >= 0: --mask-init's type."""
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MEAN,STD (two numbers, e.g. 0.9,0.7)") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: the mean must be finite and the std finite and at least 0")
    return mean, std


def parse_args(argv=None):
    """(args, the --resume checkpoint or None): every flag's value, defaults resolved once (resolve)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", choices=DATASETS, help="dataset (default: synthetic, built on first use; custom: a folder written by "
                                                    "dataset_tools.py import)")
    p.add_argument("--data-root", help="dataset folder (default: data/NAME)")
    p.add_argument("--num-triplets", type=int, help="triplets per epoch (default: 100,000; zappos 200,000; synthetic 4,000)")
    p.add_argument("--workers", type=int, help="data-loading processes per rank (default: 8; synthetic 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="mirror each training image left-right at random, per image (default: on; our choice, the "
                        "evaluation images are never flipped)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction,
                   help="decode the training images once into memory, 3*S*S bytes each per rank (default: synthetic only; "
                        "prepared arrays of 'dataset_tools.py prepare' are used instead when there are)")
    # model
    p.add_argument("--arch", choices=sorted(ARCH_SIZES), help="backbone size (default: vit_r50_b16; synthetic tiny)")
    p.add_argument("--method", choices=METHODS, help="cca (the paper's model, the default), or a comparison of its tables: "
                                                     "triplet, csn (TF-CSN), asen (TF-ASEN)")
    p.add_argument("--condition-type", type=int, choices=(1, 2), help="condition token: 1 FC(onehot(c)), 2 FC(ReLU(M[c])) "
                                                                      "(paper eq. 2/3; default 2)")
    p.add_argument("--img-size", type=int, help="input size (default: 224 for vit_r50_b16, 64 for tiny; synthetic 32)")
    p.add_argument("--out-dim", type=int, help="embedding width (default 1024)")
    p.add_argument("--asen-width", type=number(int, 1), help="TF-ASEN's joint width (default: ASEN's 512 at the paper's "
                                                              "width 768, scaled with the arch's width: tiny 85, mini 43)")
    p.add_argument("--mask-init", type=mean_std, help="MEAN,STD of the normal that draws Type-2's table M (default: CSN's 0.9,0.7; "
                                                          "synthetic 0,1)")
    p.add_argument("--cls-key", action=argparse.BooleanOptionalAction, help="block L's keys and values include [CLS] "
                                                                              "(default: yes; synthetic: no, the patch tokens alone)")
    p.add_argument("--cls-residual", action=argparse.BooleanOptionalAction, help="block L adds its attention output to [CLS] "
                   "(default: yes, eq. 1's residual; --no-cls-residual: the output alone, an ablation)")
    p.add_argument("--pretrained", help="R50+ViT-B/16 weights: Google .npz, timm .safetensors/.bin/.pth, or a 'cca.py convert' .pt")
    # optimization
    p.add_argument("--epochs", type=int, help="epochs (default: 200; synthetic 45)")
    p.add_argument("--batch-size", type=int, help="triplets per step over all ranks (default: 64, the paper; synthetic 32)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-4, the paper; synthetic 2e-4)")
    p.add_argument("--lr-decay", type=float, help="learning rate factor after each epoch (default: 0.985, ASEN's)")
    p.add_argument("--trunk-warmup", type=int,
                   help="steps over which the trunk's (blocks 1..L-1 and the stem) learning rate rises linearly from 0, while "
                        "block L, the condition token and the head train at the full rate from the start (default: 0; synthetic 625)")
    p.add_argument("--weight-decay", type=float, help="Adam weight decay (default 0)")
    p.add_argument("--margin", type=float, help="triplet margin m of eq. 9 (default: 0.2, the paper; synthetic 0.1)")
    p.add_argument("--csn-embed-reg", type=float,
                   help="TF-CSN: weight of CSN's penalty on the unmasked embedding's norm (default: CSN's 5e-3 for --method "
                        "csn; 0 turns it off)")
    p.add_argument("--csn-mask-reg", type=float,
                   help="TF-CSN: weight of CSN's L1 penalty on the masks (default: CSN's 5e-4 for --method csn; 0 turns it off)")
    # evaluation
    p.add_argument("--eval-every", type=int, help="validate every N epochs and after the last (default: 1; synthetic 3)")
    p.add_argument("--eval-batch-size", type=int, help="images per batch when embedding the validation split (default 128)")
    p.add_argument("--eval-missing", choices=EVAL_MISSING,
                   help="a valid or test image that is missing (checked before the first step): error (default), or drop: "
                        "validate without it, the numbers then marked not comparable with published numbers")
    # system
    p.add_argument("--out-dir", help="where checkpoints go (default: runs/DATA; on --resume the checkpoint's)")
    p.add_argument("--resume", help="a last.pt or best.pt to continue from: model, optimizer, epoch and best, the data, "
                                    "the recipe and the folder it was written to")
    p.add_argument("--seed", type=int, help="seed of the weights' initialisation and the triplet draws (default 0)")
    p.add_argument("--device", type=device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-every", type=int, help="steps between progress lines (default 20)")
    p.add_argument("--dist-timeout", type=number(int, 1), default=1800,
                   help="under torchrun: seconds a rank waits for the others in a collective before it stops with an "
                        "error naming itself (default 1800: room for rank 0's validation and checkpoint)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step; checkpoints keep the plain weights (default: on with CUDA; off "
                        "on the CPU, where the demo's step gained nothing after about a minute of compiling)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode (default: default). reduce-overhead replays the step's forward and backward "
                        "from CUDA graphs, for a step bound by launching kernels (few triplets per GPU); bench.py measures each")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="feed the ResNet stem channels-last (NHWC) images on CUDA, the layout cuDNN's bf16 convolutions "
                        "prefer (default: off; bench.py measures both)")
    given = p.parse_args(argv)
    resume = None
    if given.resume:  # a checkpoint that cannot be read, or disagrees with a flag given: one error line
        try:
            resume = read_checkpoint(given.resume, CHECKPOINT_KEYS + RESUME_KEYS)
            resume["args"] = {**BEFORE_FLAGS, **resume["args"]}
            check_resume(given, resume)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: {e}")
    try:
        return resolve(given, resume), resume
    except ValueError as e:  # a value no run can have: a flag error
        p.error(str(e))


def check_resume(given, resume):
    """Refuse a RUN_FLAGS flag given with --resume that differs from the checkpoint's."""
    saved = resume["args"]
    for k in RUN_FLAGS:
        v = getattr(given, k)
        if v is not None and k in saved and v != saved[k]:
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag} {v} conflicts with {given.resume}, trained with {flag} {saved[k]}: leave {flag} "
                             "out to resume it, or start a new run in another --out-dir")


def resolve(given, resume=None):
    """Every flag's value, once: the value given, else on --resume the checkpoint's (FROM_CHECKPOINT), else the
    dataset's default (DEMO or RECIPE), else GENERAL's. Raises ValueError naming a flag that cannot be right."""
    saved = resume["args"] if resume is not None else {}
    data = given.data or saved.get("data") or GENERAL["data"]
    dataset = DEMO if data == "synthetic" else RECIPE
    args = argparse.Namespace()
    for k, v in vars(given).items():
        if v is None and k in FROM_CHECKPOINT and k in saved:
            v = saved[k]
        if v is None:
            v = dataset.get(k, GENERAL.get(k))
        setattr(args, k, v)
    args.data = data
    if args.img_size is None:
        args.img_size = 224 if args.arch == "vit_r50_b16" else 64
    if args.num_triplets is None:
        args.num_triplets = 200_000 if data == "zappos" else 100_000  # CSN's fixed list; ASEN++'s epoch
    # absolute, so that a checkpoint names its data wherever evaluate.py or --resume runs from
    args.data_root = os.path.abspath(args.data_root or os.path.join("data", data))
    args.out_dir = args.out_dir or (os.path.dirname(os.path.abspath(given.resume)) if resume is not None else os.path.join("runs", data))
    if args.compile is None:
        args.compile = default_device(args.device).type == "cuda"
    for k, v in CSN_PENALTY.items():  # CSN's values for TF-CSN, 0 for the other methods; recorded in the checkpoint's args
        k = f"csn_{k}"
        if getattr(args, k) is not None and getattr(args, k) and args.method != "csn":
            raise ValueError(f"--{k.replace('_', '-')} is for --method csn, not {args.method}")
        if getattr(args, k) is None:
            setattr(args, k, v if args.method == "csn" else 0.0)
    for k in ("img_size", "out_dim", "epochs", "batch_size", "num_triplets", "eval_every", "eval_batch_size", "log_every"):
        if getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    for k in ("workers", "trunk_warmup", "margin", "weight_decay", "csn_embed_reg", "csn_mask_reg"):
        if getattr(args, k) < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 0, got {getattr(args, k)}")
    for k in ("lr", "lr_decay"):
        if not getattr(args, k) > 0:
            raise ValueError(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    need, have = 96 * args.num_triplets, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:  # an epoch's draw holds about a dozen int64 arrays of num_triplets
        raise ValueError(f"--num-triplets {args.num_triplets}: drawing an epoch needs about {need / 2**30:,.0f} GiB of "
                         f"memory, this machine has {have / 2**30:,.0f} GiB")
    try:
        CCAConfig(arch=args.arch, img_size=args.img_size)
    except ValueError as e:
        raise ValueError(f"--img-size {args.img_size}: {e}") from None
    return args


# -----------------------------------------------------------------------------
# the objective: eq. 9's triplet loss, and the method's own penalty


def triplet_loss(a, p, n, margin):
    """max(0, DIST(a, p) - DIST(a, n) + m) with the cosine distance 1 - cos, on unit-norm embeddings:
    = max(0, cos(a, n) - cos(a, p) + m). Also returns the fraction of triplets ranked right."""
    cos_ap, cos_an = (a * p).sum(-1), (a * n).sum(-1)
    return F.relu(cos_an - cos_ap + margin).mean(), (cos_ap > cos_an).float().mean()


class Objective(nn.Module):
    """A training step's forward as one module, the one that DDP wraps and torch.compile compiles: uint8 triplet
    images normalised on the device, the three embedded under the triplet's condition in one batch, eq. 9's loss
    plus the method's own penalty (TF-CSN's, CSN_PENALTY; zero for the others). Returns (loss, triplet accuracy)."""

    def __init__(self, model, margin, channels_last=False):
        super().__init__()
        self.model, self.margin, self.channels_last = model, margin, channels_last

    def forward(self, a, p, n, c):
        B = a.shape[0]
        x = normalise(torch.cat([a, p, n]))  # (3B, 3, S, S) float32 in [-1, 1]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f, penalty = self.model.embed_and_penalty(x, c.repeat(3))  # all three under the triplet's condition
        f = f.view(3, B, -1)
        loss, acc = triplet_loss(f[0], f[1], f[2], self.margin)
        return loss + penalty, acc


def train_step(objective, optimizer, a, p, n, c, use_amp, graphed=False):
    """One optimisation step on a batch of triplets; returns (loss, triplet accuracy) as device tensors, valid until
    the next step when `graphed` (torch.compile's reduce-overhead mode replays the step from CUDA graphs, whose
    outputs the next replay overwrites)."""
    if graphed:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last one's outputs may be overwritten
    with autocast(a.device, enabled=use_amp):
        loss, acc = objective(a, p, n, c)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), acc


def param_groups(model):
    """Two Adam groups: the trunk (model.trunk_parameters()), then the rest: block L, the condition token or the
    baseline's conditional parts, the final norm and the head. --trunk-warmup sets the first group's rate."""
    trunk = model.trunk_parameters()
    ids = {id(p) for p in trunk}
    return [dict(params=trunk, name="trunk"), dict(params=[p for p in model.parameters() if id(p) not in ids], name="rest")]


def make_optimizer(model, args, device):
    """Adam over param_groups, fused (one kernel for the whole update; a few per cent of the demo's CPU step, bench.py
    3.), its rates as tensors (tensor_lrs); ExponentialLR steps the rate once per epoch (ASEN's schedule)."""
    optimizer = torch.optim.Adam(param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True, capturable=True)
    tensor_lrs(optimizer, device)
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)


def tensor_lrs(optimizer, device):
    """Each group's rate as a float32 tensor of its own on `device`, changed in place from then on (set_trunk_lr,
    ExponentialLR's fill_): a step captured in a CUDA graph reads the rate from that memory each replay, where a
    Python float would be frozen into the graph. Called again after load_state_dict, which puts floats back."""
    for g in optimizer.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=device)


def set_trunk_lr(optimizer, step, warmup):
    """The trunk's rate is the scheduled rate times min(1, step / warmup); the other group carries the schedule. Past
    the warm-up there is nothing to do, and no work in the step: ExponentialLR scales both groups' equal rates alike."""
    if step > warmup:
        return
    trunk, rest = optimizer.param_groups
    trunk["lr"].copy_(rest["lr"] * (step / warmup if warmup > 0 else 1.0))


def lr_text(optimizer):
    trunk, rest = (float(g["lr"]) for g in optimizer.param_groups)
    return f"{rest:.2e}" if trunk == rest else f"{rest:.2e} (trunk {trunk:.2e})"


def nonfinite_error(first_bad, steps):
    """The error that stops a run whose loss was nan or inf; first_bad is this rank's first such step, -1 if none."""
    s = int(first_bad)
    where = f"at epoch {s // steps + 1} step {s % steps + 1}" if s >= 0 else "on another rank"
    return FloatingPointError(f"the loss is not finite (nan or inf) {where}: stopped before saving any weights trained "
                              "on it (lower --lr?)")


def lost_rank(e, rank, epoch, args):
    """A collective that failed because another rank died or hung, as the ConnectionError that stops this rank with
    one line; None for any other error. gloo raises these; NCCL's watchdog ends the process with its own message."""
    text = str(e)
    if "Timed out" in text or "timed out" in text:
        what = f"no word from another rank for {args.dist_timeout} s (--dist-timeout): one of them hung or died"
    elif "closed by peer" in text or "reset by peer" in text or "Broken pipe" in text:
        what = "another rank is gone (its connection closed): it died"
    else:
        return None
    last = os.path.join(args.out_dir, "last.pt")
    return ConnectionError(f"rank {rank}, epoch {epoch + 1}: {what}; continue with python train.py --resume {last}")


# -----------------------------------------------------------------------------
# training, in named steps: open the data, build the run, one epoch, validate and save


def main(argv=None):
    args, resume = parse_args(argv)
    rank, world, device = setup(args.device, args.dist_timeout)
    finished = False
    # SIGTERM (a scheduler, or torchrun ending the other ranks when one fails) as Ctrl-C: one line, the lock freed
    before = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        train(args, resume, rank, world, device)
        finished = True
    except (OSError, ValueError, FloatingPointError) as e:  # a missing or corrupt file, a bad split file, a nan loss
        raise SystemExit(f"error: {error_message(e)}")
    except KeyboardInterrupt:
        last = os.path.join(args.out_dir, "last.pt")
        why = " (under torchrun: another rank failed; the launcher's summary names it)" if world > 1 else ""
        kept = (f"{last} holds the last finished epoch: continue with python train.py --resume {last}"
                if os.path.isfile(last) else "no epoch had finished, nothing was saved")
        raise SystemExit(f"error: rank {rank}: stopped by Ctrl-C or SIGTERM{why}; {kept}")
    finally:
        signal.signal(signal.SIGTERM, before)
        cleanup(finished)


def stop_on_sigterm(signum, frame):
    """SIGTERM as Ctrl-C. The loader workers get the same signal and die by it; the DataLoader's SIGCHLD handler
    would then raise an error of its own in the middle of the stop, so SIGCHLD goes back to its default first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    raise KeyboardInterrupt


def open_data(args, rank, world):
    """(root, meta), with every valid and test image looked for before the first step. The synthetic set is drawn by
    rank 0 only while the others wait; real data is checked by every rank, so that a missing file stops all of them
    rather than leaving the others at the barrier."""
    if rank == 0 or args.data != "synthetic":
        root, meta = prepare_dataset(args.data, args.data_root)
    if world > 1:
        dist.barrier()
    if rank != 0 and args.data == "synthetic":
        root, meta = prepare_dataset(args.data, args.data_root)
    for split, roles in check_eval_images(args.data, root, args.eval_missing).items():
        for role, (n, listed) in roles.items():
            if n:
                print0(f"warning: {split} {role}: {n} of {listed} listed images are missing; --eval-missing drop scores "
                       f"without them ({NOT_COMPARABLE})")
    return root, meta


def build(args, resume, meta, device, rank):
    """The model (plain: what is saved and evaluated), the Objective to step (compiled, DDP-wrapped), the optimizer,
    its schedule, and where the run stands (start epoch, best, history), from --resume or fresh."""
    K = len(meta["attributes"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    cfg = CCAConfig(arch=args.arch, num_conditions=K, condition_type=args.condition_type, img_size=args.img_size,
                    out_dim=args.out_dim, method=args.method, asen_width=args.asen_width, mask_init=args.mask_init,
                    cls_key=args.cls_key, cls_residual=args.cls_residual)
    model = build_model(cfg)
    if cfg.method == "csn":
        model.condition.embed_reg, model.condition.mask_reg = args.csn_embed_reg, args.csn_mask_reg
    if args.pretrained and resume is None:
        load_pretrained(model, args.pretrained, verbose=rank == 0)
    elif args.data != "synthetic" and resume is None:
        print0(f"warning: training {cfg.arch} from scratch on {args.data}, without --pretrained: the paper starts from "
               "ImageNet-21k weights (R50+ViT-B_16.npz; see cca.py convert), and from scratch the recipe is far slower "
               "and far worse")
    model.to(device)
    print0(f"model {cfg.arch}, method {cfg.method} (type-{cfg.condition_type} condition token for cca), {K} conditions, "
           f"img {cfg.img_size}: {count_parameters(model):,} parameters")
    optimizer, scheduler = make_optimizer(model, args, device)
    start_epoch, best, history = 0, -1.0, []
    if resume is not None:
        if resume["config"]["num_conditions"] != K:
            raise ValueError(f"{args.resume} has {resume['config']['num_conditions']} conditions, {args.data_root} has {K}")
        load_model_state(model, resume["model"], args.resume)
        try:
            optimizer.load_state_dict(resume["optimizer"])
            for p, state in optimizer.state.items():  # load_state_dict checks the counts, not the shapes (fused Adam would crash)
                for name, t in state.items():
                    if torch.is_tensor(t) and t.dim() and t.shape != p.shape:
                        raise ValueError(f"its {name} is {tuple(t.shape)} for a parameter of {tuple(p.shape)}")
            scheduler.load_state_dict(resume["scheduler"])
            tensor_lrs(optimizer, device)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{args.resume}: its optimizer state does not fit the model ({e})") from None
        start_epoch, best, history = resume["epoch"] + 1, resume["best_metric"], resume["history"]
        print0(f"resumed from {args.resume} at epoch {start_epoch} (best so far {best:.4f})")
    objective = step = Objective(model, args.margin, args.channels_last and device.type == "cuda")
    if dist.is_initialized():
        # DDP first, then compile, as PyTorch's torch.compile FAQ has it: Dynamo's DDPOptimizer then splits the graph
        # at DDP's bucket boundaries, so that each bucket's all-reduce starts while the backward goes on.
        # gradient_as_bucket_view: the gradients live in the buckets themselves (no copy into them, no second copy).
        step = DDP(step, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if args.compile:  # compiles on the first steps (a minute or more for the paper's model); static shapes
        step = torch.compile(step, mode=args.compile_mode, dynamic=False)
    mode = f"on, mode {args.compile_mode}" if args.compile else "off"
    print0(f"torch.compile {mode}, channels-last {'on' if objective.channels_last else 'off'}")
    return model, step, optimizer, scheduler, start_epoch, best, history


def train(args, resume, rank, world, device):
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over {world} ranks")
    per_rank = args.batch_size // world
    root, meta = open_data(args, rank, world)
    if resume is not None and resume["meta"]["name"] != args.data:
        raise ValueError(f"{args.resume} was trained on {resume['meta']['name']}, not on --data {args.data}")
    if resume is not None and resume["epoch"] + 1 >= args.epochs:
        print0(f"{args.resume} has finished epoch {resume['epoch'] + 1}, and --epochs is {args.epochs}: nothing left to do "
               "(give a larger --epochs to train on)")
        return
    model, step, optimizer, scheduler, start_epoch, best, history = build(args, resume, meta, device, rank)
    peak = flops = None
    if device.type == "cuda":
        flops, peak = training_flops(model.cfg), gpu_peak(device)
        print0(f"{flops / 1e9:.1f} GFLOPs per training image (counted); "
               + (f"MFU against {peak[0]}" if peak else f"no MFU: no peak known for {torch.cuda.get_device_name(device)}"))
    sampler, store = training_set(args.data, root, args.img_size, args.num_triplets, args.seed, rank, world, args.cache_images)
    # from what the epoch holds (zappos: CSN's list without the triplets of missing images), not from --num-triplets;
    # the same on every rank: DDP needs every rank to take each step
    steps = len(sampler) // per_rank
    if steps == 0:
        raise ValueError(f"an epoch holds {len(sampler) * world} triplets, less than one batch of {args.batch_size}")
    loading = store.describe() + ("" if store.stored or args.workers == 0 else f" by {args.workers} loader workers per rank")
    print0(f"images: train {loading}; valid {describe_images(args.data, root, 'valid', args.img_size)}")
    chance = chance_map(args.data, root, "valid", args.eval_missing) if rank == 0 else None  # printed by rank 0
    output_folder(args.out_dir, "--out-dir")
    print0(f"{args.data}: {steps} steps of {args.batch_size} triplets per epoch on {world} rank(s), {args.epochs} epochs, device {device}")
    lock = held(os.path.join(args.out_dir, "train.lock"), args.out_dir) if rank == 0 else contextlib.nullcontext()
    with lock:  # one live run writes a folder's checkpoints
        clock = dict(start=time.time(), done=0, total=(args.epochs - start_epoch) * steps, flops=flops, peak=peak)
        for epoch in range(start_epoch, args.epochs):
            batches = TripletBatches(sampler.epoch(epoch), store, per_rank, args.flip)
            try:
                train_one_epoch(args, step, optimizer, batches, epoch, steps, device, rank, world, clock)
                scheduler.step()
                record = dict(epoch=epoch, lr=float(optimizer.param_groups[1]["lr"]))
                if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                    best = validate_and_save(args, model, optimizer, scheduler, meta, root, device, rank, world, chance, epoch,
                                             best, history, record)
            except RuntimeError as e:
                lost = lost_rank(e, rank, epoch, args) if world > 1 else None
                if lost is None:
                    raise
                raise lost from None
            history.append(record)
            if rank == 0:
                save_checkpoint(os.path.join(args.out_dir, "last.pt"), model, optimizer, scheduler, epoch, best, args, meta, history)
    print0(f"done in {fmt_time(time.time() - clock['start'])}; best validation {100 * best:.2f}; checkpoints in {args.out_dir}")


def train_one_epoch(args, step, optimizer, batches, epoch, steps, device, rank, world, clock):
    """One pass over `batches`, with a progress line every --log-every steps. A non-finite loss stops the run."""
    # the random flips depend on (seed, epoch, rank) only, so a resumed run repeats an uninterrupted one
    torch.manual_seed(args.seed + 1000 * epoch + rank)
    use_amp = device.type == "cuda"
    graphed = args.compile and args.compile_mode == "reduce-overhead" and device.type == "cuda"
    if args.workers == 0:  # a batch is a few tensor ops (stored images) or decodes (files) in this process
        loader = (batches[i] for i in range(steps))
    else:  # workers build whole uint8 batches
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers, pin_memory=use_amp)
    step.train()
    loss_sum = torch.zeros((), device=device)
    acc_sum = torch.zeros((), device=device)
    # the run's step of the first non-finite loss (-1: none), kept on the device: checked every step without a host
    # sync, read where the progress line syncs anyway and before anything is validated or saved
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    n_sum, t_log = 0, time.time()
    for i, (a, p, n, c) in enumerate(loader):
        if i == steps:
            break
        a, p, n, c = (t.to(device, non_blocking=True) for t in (a, p, n, c))
        set_trunk_lr(optimizer, epoch * steps + i, args.trunk_warmup)
        loss, acc = train_step(step, optimizer, a, p, n, c, use_amp, graphed)
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), epoch * steps + i, first_bad)
        loss_sum += loss  # accumulated on the device: no host sync inside the step
        acc_sum += acc
        n_sum += 1
        clock["done"] += 1
        if (i + 1) % args.log_every == 0 or i + 1 == steps:
            stats = torch.stack([loss_sum / n_sum, acc_sum / n_sum, (first_bad >= 0).float()])
            if world > 1:
                dist.all_reduce(stats)
                stats[:2] /= world
            loss_v, acc_v, bad = stats.tolist()
            if bad:  # on any rank: every rank stops here
                raise nonfinite_error(first_bad, steps)
            ips = 3 * args.batch_size * n_sum / (time.time() - t_log)
            eta = (time.time() - clock["start"]) / clock["done"] * (clock["total"] - clock["done"])
            mfu = f" mfu {clock['flops'] * ips / world / clock['peak'][1]:.1%}" if clock["peak"] else ""  # ips: every rank's
            print0(f"epoch {epoch + 1}/{args.epochs} step {i + 1}/{steps} loss {loss_v:.4f} triplet acc {acc_v:.3f} "
                   f"lr {lr_text(optimizer)} {ips:.0f} img/s{mfu} eta {fmt_time(eta)}")
            loss_sum.zero_()
            acc_sum.zero_()
            n_sum, t_log = 0, time.time()


def validate_and_save(args, model, optimizer, scheduler, meta, root, device, rank, world, chance, epoch, best, history, record):
    """Score the valid split (every rank embeds its shard); on rank 0 print the table, add it to this epoch's record,
    and on a new best write best.pt. Returns the best total so far."""
    t0 = time.time()
    result = evaluate_split(model, meta, root, "valid", args.img_size, device, args.eval_batch_size, args.workers, rank, world,
                            args.eval_missing)
    if rank != 0:  # the metric exists on rank 0 only, and only rank 0 writes checkpoints
        return best
    record["valid"] = result
    print0(f"validation after epoch {epoch + 1} ({time.time() - t0:.0f} s):\n{format_results(result, meta, chance)}")
    if result["total"] <= best:
        return best
    path = os.path.join(args.out_dir, "best.pt")
    save_checkpoint(path, model, optimizer, scheduler, epoch, result["total"], args, meta, history + [record])
    print0(f"new best {100 * result['total']:.2f}: saved {path}")
    return result["total"]


if __name__ == "__main__":
    exit_rank(main)
