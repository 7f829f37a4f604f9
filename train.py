"""
Train CCA with conditioned triplets (paper sections 3.3 and 4.2), on one process or many.

    python train.py                                        # the demo: tiny model, synthetic data, CPU, minutes
    python evaluate.py --ckpt runs/synthetic/best.pt       # then score it on the test split

    python cca.py convert R50+ViT-B_16.npz vit_r50_b16_224.pt
    torchrun --nproc_per_node=8 train.py --data fashionai --pretrained vit_r50_b16_224.pt
    python data.py import catalogue.csv --out data/shop          # your own catalogue (a CSV of labels), then
    torchrun --nproc_per_node=8 train.py --data custom --data-root data/shop --pretrained vit_r50_b16_224.pt

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
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

from cca import (ARCH_SIZES, CHECKPOINT_KEYS, METHODS, RESUME_KEYS, CCAConfig, autocast, build_model, count_parameters, default_device,
                 load_model_state, load_pretrained, read_checkpoint, save_checkpoint)
from data import (DATASETS, EVAL_MISSING, TripletBatches, TripletDataset, chance_map, check_eval_images, describe_images, error_message,
                  normalise, prepare_dataset)
from evaluate import NOT_COMPARABLE, device_arg, evaluate_split, format_results

# Defaults that depend on the dataset: the paper's recipe on real data, a laptop budget on the synthetic set.
RECIPE = dict(arch="vit_r50_b16", epochs=200, batch_size=64, lr=1e-4, margin=0.2, trunk_warmup=0, workers=8, cache_images=False,
              eval_every=1)
# The demo keeps the recipe's shape with a budget for a laptop CPU (docs/DESIGN.md, "Training"; how each value was
# chosen: docs/LOG.md). Margin 0.1 and the trunk's warm-up (625 steps, 5 epochs) let the attributes leave the
# collapsed start sooner when training from scratch. Its 6,000 training images are decoded once into memory (18 MB)
# and batched in the training process: a loader worker decoding JPEGs would take one of a laptop's few cores.
# CSN's regularisers for --method csn: the defaults of --embed_loss and --mask_loss in CSN's main.py (csn_regularisers)
CSN_REG = dict(csn_embed_reg=5e-3, csn_mask_reg=5e-4)
DEMO = dict(arch="tiny", img_size=32, epochs=45, batch_size=32, num_triplets=4_000, lr=2e-4, margin=0.1, trunk_warmup=625, workers=0,
            cache_images=True, eval_every=3)


# The flags that shape the model: --resume takes them from the checkpoint, and refuses a different value given.
MODEL_FLAGS = ("arch", "img_size", "method", "condition_type", "out_dim")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data", default="synthetic", choices=DATASETS, help="dataset (synthetic is built on first use; custom: a folder written by data.py import)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: data/NAME)")
    p.add_argument("--num-triplets", type=int, default=None, help="triplets per epoch (default: 100,000; zappos 200,000; synthetic 4,000)")
    p.add_argument("--workers", type=int, default=None, help="data-loading processes per rank (default: 8; synthetic 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="mirror each training image left-right at random, per image (default: on; our choice, the "
                        "evaluation images are never flipped)")
    p.add_argument("--cache-images", action=argparse.BooleanOptionalAction, default=None,
                   help="decode the training images once into memory, 3*S*S bytes each per rank, and batch them without "
                        "loader workers (default: synthetic only; prepared arrays of 'data.py prepare' are used instead when there are)")
    # model
    p.add_argument("--arch", default=None, choices=sorted(ARCH_SIZES), help="backbone size (default: vit_r50_b16; synthetic tiny)")
    p.add_argument("--method", default=None, choices=METHODS, help="cca (the paper's model, the default), or a comparison of its tables: triplet, csn (TF-CSN), asen (TF-ASEN)")
    p.add_argument("--condition-type", type=int, default=None, choices=(1, 2), help="condition token: 1 FC(onehot(c)), 2 FC(ReLU(M[c])) (paper eq. 2/3; default 2)")
    p.add_argument("--img-size", type=int, default=None, help="input size (default: 224 for vit_r50_b16, 64 for tiny; synthetic 32)")
    p.add_argument("--out-dim", type=int, default=None, help="embedding width (default 1024)")
    p.add_argument("--pretrained", default=None, help="R50+ViT-B/16 weights: Google .npz, timm .safetensors/.bin/.pth, or a 'cca.py convert' .pt")
    # optimization
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: 200; synthetic 45)")
    p.add_argument("--batch-size", type=int, default=None, help="triplets per step over all ranks (default: 64, the paper; synthetic 32)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 1e-4, the paper; synthetic 2e-4)")
    p.add_argument("--lr-decay", type=float, default=0.985, help="learning rate factor after each epoch (ASEN)")
    p.add_argument("--trunk-warmup", type=int, default=None,
                   help="steps over which the trunk's (blocks 1..L-1 and the stem) learning rate rises linearly from 0, while "
                        "block L, the condition token and the head train at the full rate from the start (default: 0; synthetic 625)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    p.add_argument("--margin", type=float, default=None, help="triplet margin m of eq. 9 (default: 0.2, the paper; synthetic 0.1)")
    p.add_argument("--csn-embed-reg", type=float, default=None,
                   help="TF-CSN: weight of CSN's penalty on the unmasked embedding's norm (csn_regularisers; default: "
                        "CSN's 5e-3 for --method csn; 0 turns it off)")
    p.add_argument("--csn-mask-reg", type=float, default=None,
                   help="TF-CSN: weight of CSN's L1 penalty on the masks (default: CSN's 5e-4 for --method csn; 0 turns it off)")
    # evaluation
    p.add_argument("--eval-every", type=int, default=None, help="validate every N epochs and after the last (default: 1; synthetic 3)")
    p.add_argument("--eval-batch-size", type=int, default=128, help="images per batch when embedding the validation split")
    p.add_argument("--eval-missing", default="error", choices=EVAL_MISSING,
                   help="a valid or test image that is missing (checked before the first step): error (default), or drop: "
                        "validate without it, the numbers then marked not comparable with published numbers")
    # system
    p.add_argument("--out-dir", default=None, help="where checkpoints go (default: runs/DATA)")
    p.add_argument("--resume", default=None, help="a last.pt or best.pt to continue from (model, optimizer, epoch, best)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights' initialisation and the triplet draws")
    p.add_argument("--device", default=None, type=device_arg, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model for training; checkpoints keep the plain weights (default: on with CUDA; off "
                        "on the CPU, where the demo's step gained nothing after about a minute of compiling)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="feed the ResNet stem channels-last (NHWC) images on CUDA, the layout cuDNN's bf16 convolutions "
                        "prefer (default: off; bench.py measures both)")
    args = p.parse_args(argv)
    defaults = DEMO if args.data == "synthetic" else RECIPE
    for k, v in defaults.items():
        if getattr(args, k) is None and not (args.resume and k in MODEL_FLAGS):
            setattr(args, k, v)
    if args.num_triplets is None:
        args.num_triplets = 200_000 if args.data == "zappos" else 100_000  # CSN's fixed list; ASEN++'s epoch
    # the model's shape: --resume takes it from the checkpoint, so there a flag left out stays None (train() fills it)
    if not args.resume:
        for k, v in dict(method="cca", condition_type=2, out_dim=1024, img_size=224 if args.arch == "vit_r50_b16" else 64).items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    for k in ("img_size", "out_dim"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if args.img_size is not None and args.arch is not None:
        try:
            CCAConfig(arch=args.arch, img_size=args.img_size)
        except ValueError as e:
            p.error(f"--img-size {args.img_size}: {e}")
    args.data_root = args.data_root or os.path.join("data", args.data)
    args.out_dir = args.out_dir or os.path.join("runs", args.data)
    if args.trunk_warmup < 0:
        p.error(f"--trunk-warmup must be at least 0, got {args.trunk_warmup}")
    for k in ("epochs", "batch_size", "num_triplets", "eval_every", "log_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    if args.workers < 0:
        p.error(f"--workers must be 0 or more, got {args.workers}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    if args.margin < 0:
        p.error(f"--margin must be at least 0, got {args.margin}")
    for k in CSN_REG:  # their defaults are set in train(), where the method is known (also on --resume)
        flag, v = f"--{k.replace('_', '-')}", getattr(args, k)
        if v is not None and v < 0:
            p.error(f"{flag} must be at least 0, got {v}")
        if v is not None and args.method != "csn" and not args.resume:
            p.error(f"{flag} is for --method csn, not {args.method}")
    return args


# -----------------------------------------------------------------------------
# distributed setup: `python train.py` is one process with no process group; torchrun sets RANK etc.


def setup(device_arg):
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
    else:
        rank, world = 0, 1
        device = default_device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # DDP and set_device want an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def cleanup(finished):
    """Tear the process group down. After a finished run every rank first waits at a barrier, so that no rank
    leaves while rank 0 still validates and saves. After an error there is no barrier: the other ranks may never
    reach it."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank(main):
    """Run a command's main; under torchrun, leave with os._exit once it has returned, after flushing the output.

    A rank must not go through the interpreter's finalization: gloo's worker threads outlive
    destroy_process_group, and one that drops the last reference to a collective's Python-owned tensors (the last
    all_gather or all_reduce) asks for the GIL; during finalization Python ends such a thread with pthread_exit,
    which unwinds through a noexcept destructor and aborts the whole process ("terminate called without an
    active exception", SIGABRT) after the run has finished. docs/LOG.md has the backtrace. Everything the run
    writes (checkpoints, JSON) is complete and renamed into place before main returns."""
    if "RANK" not in os.environ:  # one process, no process group: an ordinary exit
        return main()
    try:
        main()
        code = 0
    except SystemExit as e:  # main's one-line errors and argparse's exits
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# -----------------------------------------------------------------------------
# the loss (paper eq. 9)


def triplet_loss(a, p, n, margin):
    """max(0, DIST(a, p) - DIST(a, n) + m) with the cosine distance 1 - cos, on unit-norm embeddings:
    = max(0, cos(a, n) - cos(a, p) + m). Also returns the fraction of triplets ranked right."""
    cos_ap, cos_an = (a * p).sum(-1), (a * n).sum(-1)
    return F.relu(cos_an - cos_ap + margin).mean(), (cos_ap > cos_an).float().mean()


def csn_regularisers(emb, mask, embed_weight, mask_weight):
    """CSN's two penalties (Veit et al., CVPR 2017; their main.py, csn.py, tripletnet.py), in their form:

        embed_weight * mean_t ||E_t||_F / sqrt(B)  +  mask_weight * ||ReLU(M[c])||_1 / B

    emb (3, B, d): FC(x_cls) of anchors, positives and negatives, before the mask and before the L2 norm (E_t,
    CSN's embeddingnet output); mask (3, B, d): ReLU(M[c]), the same rows for the three. ||E_t||_F / sqrt(B) is
    the root mean square of the per-image norms (not squared), averaged over the three images as CSN does; the
    mask's L1 norm is summed over the batch and divided by B. CSN's defaults are 5e-3 and 5e-4 (CSN_REG).

    Where they apply, and what they do here. CSN compares masked embeddings by Euclidean distance, unnormalised:
    there the embedding penalty keeps the embeddings in a ball (scaling them up would meet any margin) and the
    L1 term makes the masks sparse. TF-CSN compares l2(FC(x_cls) * ReLU(M[c])) by cosine (paper eq. 9), so a
    penalty on the output would be a constant (its norm is 1): the penalties go where CSN puts them, on the
    embedding before the mask and on the mask. The triplet loss is unchanged when either is scaled, so neither
    trades against the margin as in CSN; they shrink the scale of FC(x_cls) and of the masks (which, for a
    scale-free loss, sets how large each Adam step is relative to them, as weight decay does on a normalised
    layer) and the L1 term still drives the mask entries the triplet loss does not need to zero, CSN's sparse
    masks. Both act on the method's own parts with values that are CSN's defaults, not tuned per dataset, so we
    count them as part of the method and use them for --method csn (train.py --csn-embed-reg, --csn-mask-reg).
    """
    B = emb.shape[1]
    embed = emb.float().flatten(1).norm(dim=1).mean() / math.sqrt(B)  # mean over (a, p, n) of ||E_t||_F / sqrt(B)
    l1 = mask.float().abs().sum() / (3 * B)  # ||ReLU(M[c])||_1 / B, the three copies averaged
    return embed_weight * embed + mask_weight * l1


def param_groups(model):
    """Two Adam groups: the trunk (model.trunk_parameters()), then the rest: block L, the condition token or the
    baseline's conditional parts, the final norm and the head. --trunk-warmup sets the first group's rate."""
    trunk = model.trunk_parameters()
    ids = {id(p) for p in trunk}
    return [dict(params=trunk, name="trunk"), dict(params=[p for p in model.parameters() if id(p) not in ids], name="rest")]


def set_trunk_lr(optimizer, step, warmup):
    """The trunk's rate is the scheduled rate times min(1, step / warmup); the other group carries the schedule."""
    trunk, rest = optimizer.param_groups
    trunk["lr"] = rest["lr"] * (min(1.0, step / warmup) if warmup > 0 else 1.0)


def lr_text(optimizer):
    trunk, rest = (g["lr"] for g in optimizer.param_groups)
    return f"{rest:.2e}" if trunk == rest else f"{rest:.2e} (trunk {trunk:.2e})"


def train_step(model, optimizer, a, p, n, c, margin, use_amp, csn_reg=None):
    """One optimisation step on a batch of triplets; returns (loss, triplet accuracy) as device tensors.
    csn_reg: (embed weight, mask weight) of csn_regularisers for TF-CSN, or None."""
    B, x = a.shape[0], torch.cat([a, p, n])  # (3B, 3, S, S): one forward for all three
    with autocast(x.device, enabled=use_amp):
        if csn_reg:  # TF-CSN's penalties need the unmasked embeddings and the masks too
            f, emb, mask = model(x, c.repeat(3), csn_parts=True)
        else:
            f = model(x, c.repeat(3))  # all three embedded under the triplet's condition
    f = f.view(3, B, -1)
    loss, acc = triplet_loss(f[0], f[1], f[2], margin)
    if csn_reg:
        loss = loss + csn_regularisers(emb.view(3, B, -1), mask.view(3, B, -1), *csn_reg)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), acc


# Dense (no sparsity) bf16 tensor-core peaks of NVIDIA's data sheets, in TFLOP/s, for the model FLOPs utilisation
# (MFU): the first entry whose words all appear in torch.cuda.get_device_name() (case ignored) is the GPU.
GPU_PEAKS = [(("h100", "pcie"), "H100 PCIe", 756), (("h100", "nvl"), "H100 NVL", 835), (("h100",), "H100 SXM", 989),
             (("h200", "nvl"), "H200 NVL", 835), (("h200",), "H200 SXM", 989), (("a100",), "A100", 312)]


def gpu_peak(device):
    """(name, dense bf16 FLOP/s) of a known CUDA GPU, else None: no MFU without a peak."""
    name = torch.cuda.get_device_name(device).lower()
    for words, label, tflops in GPU_PEAKS:
        if all(w in name for w in words):
            return f"{label} {tflops} TFLOP/s dense bf16", tflops * 1e12
    return None


def training_flops(cfg):
    """FLOPs of one image in a training step (forward and backward of a triplet, over its 3 images), counted by torch's
    FlopCounterMode: matmuls, convolutions and attention (as its two matmuls), not norms or element-wise ops. Counted
    on the meta device, where nothing is allocated or computed."""
    with torch.device("meta"):
        model = build_model(cfg)
        x, c = torch.zeros(3, 3, cfg.img_size, cfg.img_size), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        f = model(x, c.repeat(3)).view(3, 1, -1)
        triplet_loss(f[0], f[1], f[2], 0.2)[0].backward()
    return counter.get_total_flops() / 3


def nonfinite_error(first_bad, steps):
    """The error that stops a run whose loss was nan or inf; first_bad is this rank's first such step, -1 if none."""
    s = int(first_bad)
    where = f"at epoch {s // steps + 1} step {s % steps + 1}" if s >= 0 else "on another rank"
    return FloatingPointError(f"the loss is not finite (nan or inf) {where}: stopped before saving any weights trained "
                              "on it (lower --lr?)")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup(args.device)
    finished = False
    try:
        train(args, rank, world, device)
        finished = True
    except (OSError, ValueError, FloatingPointError) as e:  # a missing or corrupt file, a bad split file, a nan loss
        raise SystemExit(f"error: {error_message(e)}")
    finally:
        cleanup(finished)


def train(args, rank, world, device):
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not divide over {world} ranks")
    per_rank = args.batch_size // world
    # the synthetic set is written by rank 0 only while the others wait; real data is checked by every rank,
    # so that a missing file stops all of them rather than leaving the others at the barrier
    if rank == 0 or args.data != "synthetic":
        root, meta = prepare_dataset(args.data, args.data_root)
    if world > 1:
        dist.barrier()
    if rank != 0 and args.data == "synthetic":
        root, meta = prepare_dataset(args.data, args.data_root)
    K = len(meta["attributes"])
    # every valid and test image, before the first step: checked by every rank, so that all of them stop together
    for split, roles in check_eval_images(args.data, root, args.eval_missing).items():
        for role, (n, listed) in roles.items():
            if n:
                print0(f"warning: {split} {role}: {n} of {listed} listed images are missing; --eval-missing drop scores "
                       f"without them ({NOT_COMPARABLE})")

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    resume = read_checkpoint(args.resume, CHECKPOINT_KEYS + RESUME_KEYS) if args.resume else None
    if resume is not None:
        if resume["meta"]["name"] != args.data:
            raise ValueError(f"{args.resume} was trained on {resume['meta']['name']}, not on --data {args.data}")
        cfg = CCAConfig(**resume["config"])
        for k in MODEL_FLAGS:  # a flag given must agree with the checkpoint; one left out takes its value
            given, saved = getattr(args, k), getattr(cfg, k)
            if given is not None and given != saved:
                flag = "--" + k.replace("_", "-")
                raise ValueError(f"{flag} {given} conflicts with {args.resume}, trained with {flag} {saved}: leave {flag} out "
                                 "to resume it, or start a new run in another --out-dir")
            setattr(args, k, saved)
        if resume["epoch"] + 1 >= args.epochs:
            print0(f"{args.resume} has finished epoch {resume['epoch'] + 1}, and --epochs is {args.epochs}: nothing left to do "
                   "(give a larger --epochs to train on)")
            return
    else:
        cfg = CCAConfig(arch=args.arch, num_conditions=K, condition_type=args.condition_type, img_size=args.img_size, out_dim=args.out_dim,
                        method=args.method)
    if cfg.num_conditions != K:
        raise ValueError(f"the checkpoint has {cfg.num_conditions} conditions, dataset {args.data} has {K}")
    model = build_model(cfg)
    if args.pretrained and resume is None:
        load_pretrained(model, args.pretrained, verbose=rank == 0)
    elif args.data != "synthetic" and resume is None:
        print0(f"warning: training {cfg.arch} from scratch on {args.data}, without --pretrained: the paper starts from "
               "ImageNet-21k weights (R50+ViT-B_16.npz; see cca.py convert), and from scratch the recipe is far slower "
               "and far worse")
    model.to(device)
    print0(f"model {cfg.arch}, method {cfg.method} (type-{cfg.condition_type} condition token for cca), {K} conditions, img {cfg.img_size}: {count_parameters(model):,} parameters")

    # fused: one kernel for the whole update (CUDA and CPU); a few per cent of the demo's CPU step (bench.py, 3.)
    optimizer = torch.optim.Adam(param_groups(model), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=args.lr_decay)  # stepped once per epoch
    start_epoch, best, history = 0, -1.0, []
    if resume is not None:
        load_model_state(model, resume["model"], args.resume)
        if len(resume["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"{args.resume}: written by an older train.py with one learning-rate group; it cannot be resumed, "
                             "but evaluate.py still scores it")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start_epoch, best, history = resume["epoch"] + 1, resume["best_metric"], resume["history"]
        print0(f"resumed from {args.resume} at epoch {start_epoch} (best so far {best:.4f})")
    raw = model  # what is saved and evaluated: not compiled, not wrapped
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.compile:
        model = torch.compile(model)  # compiles on the first steps (a minute or more for the paper's model)
    if world > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    channels_last = args.channels_last and device.type == "cuda"
    peak = flops = None
    if device.type == "cuda":
        flops, peak = training_flops(cfg), gpu_peak(device)
        print0(f"{flops / 1e9:.1f} GFLOPs per training image (counted); "
               + (f"MFU against {peak[0]}" if peak else f"no MFU: no peak known for {torch.cuda.get_device_name(device)}"))
    print0(f"torch.compile {'on' if args.compile else 'off'}, channels-last {'on' if channels_last else 'off'}")

    data = TripletDataset(args.data, root, cfg.img_size, args.num_triplets, seed=args.seed, rank=rank, world_size=world, flip=args.flip,
                          cache=args.cache_images)
    # from what the epoch holds (zappos: CSN's list without the triplets of missing images), not from --num-triplets;
    # len(data) is the same on every rank: DDP needs every rank to take each step
    steps = len(data) // per_rank
    if steps == 0:
        raise ValueError(f"an epoch holds {len(data) * world} triplets, less than one batch of {args.batch_size}")
    stored = (f"{data.prepared.path} (prepared, memory-mapped)" if data.prepared is not None else
              "decoded once into memory" if data.images is not None else
              f"decoded from the image files by {args.workers} loader workers per rank")
    print0(f"images: train {stored}; valid {describe_images(args.data, root, 'valid', cfg.img_size)}")
    chance = chance_map(args.data, root, "valid", args.eval_missing) if rank == 0 else None  # printed by rank 0
    os.makedirs(args.out_dir, exist_ok=True)
    use_amp = device.type == "cuda"
    for k, v in CSN_REG.items():  # CSN's values for TF-CSN, 0 for the other methods; recorded in the checkpoint's args
        if getattr(args, k) is None:
            setattr(args, k, v if cfg.method == "csn" else 0.0)
        elif getattr(args, k) and cfg.method != "csn":
            raise ValueError(f"--{k.replace('_', '-')} is for method csn; {args.resume} is method {cfg.method}")
    csn_reg = (args.csn_embed_reg, args.csn_mask_reg) if cfg.method == "csn" and (args.csn_embed_reg or args.csn_mask_reg) else None
    print0(f"{args.data}: {steps} steps of {args.batch_size} triplets per epoch on {world} rank(s), {args.epochs} epochs, device {device}")

    t_start, done_steps = time.time(), 0
    total_steps = (args.epochs - start_epoch) * steps
    # the run's step of the first non-finite loss (-1: none), kept on the device: checked every step without a host
    # sync, read where the progress line syncs anyway and before anything is validated or saved
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    for epoch in range(start_epoch, args.epochs):
        data.set_epoch(epoch)
        # the random flips depend on (seed, epoch, rank) only, so a resumed run repeats an uninterrupted one
        torch.manual_seed(args.seed + 1000 * epoch + rank)
        if data.images is not None or (data.prepared is not None and args.workers == 0):
            # stored images: a batch is a few tensor ops in this process, no loader
            loader = (data.raw_batch(np.arange(i * per_rank, (i + 1) * per_rank)) for i in range(steps))
        elif data.prepared is not None:  # the workers cut whole uint8 batches from the one memory-mapped file
            loader = torch.utils.data.DataLoader(TripletBatches(data, per_rank), batch_size=None, num_workers=args.workers,
                                                 pin_memory=use_amp)
        else:
            loader = torch.utils.data.DataLoader(data, batch_size=per_rank, shuffle=False, drop_last=True, num_workers=args.workers,
                                                 pin_memory=use_amp, persistent_workers=False)
        model.train()
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros((), device=device)
        n_sum, t_log = 0, time.time()
        for step, (a, p, n, c) in enumerate(loader):
            if step == steps:
                break
            a, p, n, c = (t.to(device, non_blocking=True) for t in (a, p, n, c))
            if a.dtype == torch.uint8:  # stored images travel as uint8, a quarter of float32's bytes; normalised here
                a, p, n = normalise(a), normalise(p), normalise(n)
            if channels_last:
                a, p, n = (t.contiguous(memory_format=torch.channels_last) for t in (a, p, n))
            set_trunk_lr(optimizer, epoch * steps + step, args.trunk_warmup)
            loss, acc = train_step(model, optimizer, a, p, n, c, args.margin, use_amp, csn_reg)
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), epoch * steps + step, first_bad)
            loss_sum += loss  # accumulated on the device: no host sync inside the step
            acc_sum += acc
            n_sum += 1
            done_steps += 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps:
                stats = torch.stack([loss_sum / n_sum, acc_sum / n_sum, (first_bad >= 0).float()])
                if world > 1:
                    dist.all_reduce(stats)
                    stats[:2] /= world
                loss_v, acc_v, bad = stats.tolist()
                if bad:  # on any rank: every rank stops here
                    raise nonfinite_error(first_bad, steps)
                dt = time.time() - t_log
                ips = 3 * args.batch_size * n_sum / dt
                eta = (time.time() - t_start) / done_steps * (total_steps - done_steps)
                mfu = f" mfu {flops * ips / world / peak[1]:.1%}" if peak else ""  # ips counts every rank's images
                print0(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps} loss {loss_v:.4f} triplet acc {acc_v:.3f} "
                       f"lr {lr_text(optimizer)} {ips:.0f} img/s{mfu} eta {fmt_time(eta)}")
                loss_sum.zero_()
                acc_sum.zero_()
                n_sum, t_log = 0, time.time()
        scheduler.step()
        bad = (first_bad >= 0).float()  # the progress line has read it already; once more before validating and saving
        if world > 1:
            dist.all_reduce(bad)
        if bad.item():
            raise nonfinite_error(first_bad, steps)

        record = dict(epoch=epoch, lr=optimizer.param_groups[1]["lr"])
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            t0 = time.time()
            result = evaluate_split(raw, meta, root, "valid", cfg.img_size, device, args.eval_batch_size, args.workers, rank, world,
                                    args.eval_missing)
            if rank == 0:  # the metric exists on rank 0 only, and only rank 0 writes checkpoints
                record["valid"] = result
                print0(f"validation after epoch {epoch + 1} ({time.time() - t0:.0f} s):\n{format_results(result, meta, chance)}")
                if result["total"] > best:
                    best = result["total"]
                    save_checkpoint(os.path.join(args.out_dir, "best.pt"), raw, optimizer, scheduler, epoch, best, args, meta, history + [record])
                    print0(f"new best {100 * best:.2f}: saved {os.path.join(args.out_dir, 'best.pt')}")
        history.append(record)
        if rank == 0:
            save_checkpoint(os.path.join(args.out_dir, "last.pt"), raw, optimizer, scheduler, epoch, best, args, meta, history)
    print0(f"done in {fmt_time(time.time() - t_start)}; best validation {100 * best:.2f}; checkpoints in {args.out_dir}")


if __name__ == "__main__":
    exit_rank(main)
