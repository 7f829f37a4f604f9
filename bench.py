"""
Speed and memory of the CCA model's fast paths and of the image loader, measured side by side in one run.

    python bench.py                       # GPU if there is one (bf16 autocast), else CPU with the tiny model
    python bench.py --arch tiny --img-size 32 --triplets 32 --skip-loader     # the demo's training step
    python bench.py --skip-model          # only the loader (section 4)
    python bench.py --skip-loader --profile   # GPU: and where the compiled step's time goes (top kernels)

Prints, for the same weights and inputs:
  FLOPs per training image, counted by torch's FlopCounterMode (forward and backward), of the paper's model at
     224 px and of the model measured;
  1. all K conditions of a batch: `embed_all` (trunk once) vs one full forward per condition;
  2. block L: the single-query cross-attention vs the paper's eq. 4 form (q_c repeated to 1+N rows);
  3. train.py's training step at 64 and at 8 triplets (8: the paper's 64 shared by 8 GPUs): images per second,
     MFU and peak memory, eager and torch.compile'd (CUDA, bf16 autocast); at the first size also compiled with
     channels-last images and eager fp32 (TF32 matmuls, as in train.py); then train.py's fused Adam vs PyTorch's default;
  4. the loader, per worker process (one thread): training images per second from JPEG decoding (512 x 512 JPEGs,
     FashionAI's size, to 224 px) against cutting whole batches out of prepared arrays (dataset_tools.py prepare).
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cca import CCA, CCAConfig, build_model
from data import TripletBatches, normalise, read_filenames, training_set
from dataset_tools import prepare_images
from runtime import autocast, default_device, gpu_peak, training_flops
from synthetic import SYNTH_ATTRIBUTES, draw_garment, make_synthetic
from train import Objective, train_step


def timeit(fn, device, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def forward_flops(cfg):
    """FLOPs of one image's forward pass, counted as training_flops counts them (meta device)."""
    with torch.device("meta"):
        model = build_model(cfg)
        x, c = torch.zeros(1, 3, cfg.img_size, cfg.img_size), torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, c)
    return counter.get_total_flops()


def bench_model(args, device):
    gpu = device.type == "cuda"
    arch = args.arch or ("vit_r50_b16" if gpu else "tiny")
    img = args.img_size or (224 if arch == "vit_r50_b16" else 64)
    B = args.batch_size or (64 if gpu else 16)
    K = args.num_conditions
    triplets = args.triplets or ([64, 8] if gpu else [8])
    torch.manual_seed(0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = CCAConfig(arch=arch, num_conditions=K, img_size=img)
    model = CCA(cfg).to(device)
    peak = gpu_peak(device) if gpu else None
    print(f"arch {arch}, img {img}, batch {B}, K {K}")
    if not gpu:
        print("no GPU: sections 1 to 3 time this model in fp32; the paper's model at 224 px, bf16, torch.compile, "
              "channels-last, MFU and peak memory are CUDA rows, skipped here")

    paper, plain = CCAConfig(num_conditions=K, img_size=224), CCAConfig(num_conditions=K, img_size=224, method="triplet")
    flops = training_flops(cfg)
    print("\nFLOPs per image (FlopCounterMode: matmuls, convolutions, attention; counted on the meta device)")
    print(f"   the paper's model at 224 px: training step {training_flops(paper) / 1e9:.1f} GFLOPs "
          f"(forward {forward_flops(paper) / 1e9:.1f})")
    print(f"   the plain hybrid (every block self-attention) at 224 px: training step {training_flops(plain) / 1e9:.1f} "
          f"GFLOPs (forward {forward_flops(plain) / 1e9:.1f})")
    print(f"   {arch} at {img} px: training step {flops / 1e9:.3g} GFLOPs (forward {forward_flops(cfg) / 1e9:.3g})")
    print(f"   MFU against {peak[0]}" if peak else f"   no MFU: {torch.cuda.get_device_name(device)} is not in runtime.GPU_PEAKS"
          if gpu else "   no MFU on the CPU (no peak to compare with)")

    x = torch.randn(B, 3, img, img, device=device)
    amp = autocast(device)  # bf16 on the GPU, fp32 on the CPU

    # 1. all conditions: embed_all vs K full forwards
    model.eval()
    with torch.no_grad(), amp:
        t_all = timeit(lambda: model.embed_all(x), device, iters=args.iters)
        t_loop = timeit(lambda: [model(x, torch.full((B,), k, device=device)) for k in range(K)], device, iters=max(2, args.iters // 4))
        xt = model.trunk(x)
        q_c = model.condition(torch.zeros(B, dtype=torch.long, device=device))[:, None]
        t_single = timeit(lambda: model.blocks[-1](xt, q_c), device, iters=args.iters)
        # eq. 4: the same block with the condition token repeated to all 1+N positions (attention, proj and
        # MLP on 1+N rows; row 0 is the single query's output)
        t_eq4 = timeit(lambda: model.blocks[-1](xt, q_c.expand(-1, xt.shape[1], -1)), device, iters=args.iters)
        t_trunk = timeit(lambda: model.trunk(x), device, iters=args.iters)
    print(f"\n1. embeddings under all {K} conditions, {B} images")
    print(f"   embed_all (trunk once):        {t_all * 1e3:8.1f} ms  {B / t_all:8.0f} img/s")
    print(f"   one forward per condition:     {t_loop * 1e3:8.1f} ms  {B / t_loop:8.0f} img/s")
    print(f"   speed-up: {t_loop / t_all:.2f}x   (trunk alone {t_trunk * 1e3:.1f} ms)")
    print(f"\n2. block L on {xt.shape[1]} tokens, one condition")
    print(f"   single query (ours):           {t_single * 1e3:8.2f} ms")
    print(f"   eq. 4, query repeated 1+N x:   {t_eq4 * 1e3:8.2f} ms")
    print(f"   speed-up: {t_eq4 / t_single:.2f}x")

    # 3. training step on triplets
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as train.py
    for T in triplets:
        c = torch.randint(0, K, (T,), device=device)
        a, p, n = torch.randint(0, 256, (3, T, 3, img, img), dtype=torch.uint8, device=device)  # as the loader gives them
        print(f"\n3. training step, {T} triplets ({3 * T} images), fused Adam" + (", bf16 autocast unless fp32" if gpu else ", fp32"))
        eager = Objective(model, 0.2)
        if gpu:
            compiled = torch.compile(eager, dynamic=False)  # static shapes: one graph per batch size
            modes = [("eager", eager, True), ("compiled", compiled, True)]
            # channels-last and fp32 at the first size only: each compiled variant costs a minute or more of compiling
            modes += [("compiled, channels-last", torch.compile(Objective(model, 0.2, channels_last=True), dynamic=False), True),
                      ("eager fp32 (tf32 mm)", eager, False)] if T == triplets[0] else []
        else:
            modes = [("eager", eager, False)]
        times = {}
        for label, m, ac in modes:
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            t = times[label] = timeit(lambda: train_step(m, opt, a, p, n, c, ac), device, iters=args.iters)
            ips = 3 * T / t
            mfu = f"  MFU {flops * ips / peak[1]:6.1%}" if peak and ac else ""
            mem = f"  peak {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB" if gpu else ""
            print(f"   {label:26s} {t * 1e3:8.1f} ms  {ips:8.0f} img/s{mfu}{mem}")
        if gpu and args.profile and T == triplets[0]:
            try:
                profile_step(lambda: train_step(compiled, opt, a, p, n, c, True), T)
            except Exception as e:  # the profiler is optional to the figures above and below
                print(f"   profile failed: {type(e).__name__}: {e}")
        if gpu:
            print(f"   compiled / eager: {times['eager'] / times['compiled']:.2f}x"
                  + (f"; with channels-last {times['eager'] / times['compiled, channels-last']:.2f}x; bf16 / fp32 (eager): "
                     f"{times['eager fp32 (tf32 mm)'] / times['eager']:.2f}x" if T == triplets[0] else ""))
        else:
            print("   compiled: not measured on the CPU (the demo's step gained nothing there after about a minute of "
                  "compiling: docs/LOG.md)")
    label, m, ac = modes[0]
    plain = torch.optim.Adam(model.parameters(), lr=1e-4)  # PyTorch's default implementation (foreach)
    t_plain = timeit(lambda: train_step(m, plain, a, p, n, c, ac), device, iters=args.iters)
    print(f"   {label}, {T} triplets, default Adam: {t_plain * 1e3:6.1f} ms; "
          f"fused Adam (train.py) is {t_plain / times[label]:.2f}x as fast")


def profile_step(step, T, steps=5):
    """Where a compiled training step's GPU time goes: the kernels with the most time over `steps` steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    # the GPU kernels themselves: a CPU operator (aten::mm) is credited its kernels' time too, which would count it twice
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"\n   profile of the compiled step, {T} triplets, {steps} steps: {total / steps / 1e3:.1f} ms of GPU kernels a step; "
          f"the kernels with the most time:")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
        print(f"   {100 * e.self_device_time_total / total:5.1f}%  {e.self_device_time_total / steps / 1e3:7.2f} ms  "
              f"x{e.count // steps:<4d} {e.key[:90]}")


def rate(fn, images_per_call, min_time):
    """Images per second of fn(i), called with i = 0, 1, ... for at least min_time seconds after one warm-up call."""
    fn(0)
    calls, t0 = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < min_time:
        fn(calls)
        calls += 1
    return images_per_call * calls / (time.perf_counter() - t0)


def bench_loader(args):
    S, n, T = args.loader_size, args.loader_images, 64
    print(f"\n4. the loader, per worker process (one thread): {n} JPEGs of 512 x 512 to {S} px, {T} triplets a batch")
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "synthetic")
        make_synthetic(root, num_train=n, num_query=4, num_candidate=8, size=64, workers=1)
        # FashionAI's images are 512 x 512 JPEGs: the training images drawn again at that size
        rng = np.random.default_rng(0)
        names = read_filenames(os.path.join(root, "filenames_train.txt"))
        for name in names:
            values = [int(rng.integers(len(v))) for v in SYNTH_ATTRIBUTES.values()]
            draw_garment(values, rng, size=512, zoom=1).save(os.path.join(root, name), quality=90)
        kb = sum(os.path.getsize(os.path.join(root, name)) for name in names) / n / 1024
        t0 = time.perf_counter()
        prepare_images("synthetic", root, S, workers=args.prepare_workers, splits=("train",))
        t_prepare = time.perf_counter() - t0
        loaders = {}
        for label, prepared in (("JPEG decoding", False), ("prepared arrays", True)):
            sampler, store = training_set("synthetic", root, S, 8 * T, prepared=prepared)
            loaders[label] = TripletBatches(sampler.epoch(0), store, T)
        torch.set_num_threads(1)  # as in a DataLoader worker
        rates = {}
        try:
            for label, batches in loaders.items():
                # a worker's batch as train.py reads it (uint8), and normalised to float32 in the worker instead
                rates[label, "uint8"] = rate(lambda i: batches[i % len(batches)], 3 * T, args.loader_seconds)
                rates[label, "float32"] = rate(lambda i: [normalise(x) for x in batches[i % len(batches)][:3]], 3 * T,
                                               args.loader_seconds)
        finally:
            torch.set_num_threads(threads)
    print(f"   JPEGs of {kb:.0f} KB on average; prepare: {n / t_prepare:.0f} img/s with {args.prepare_workers} processes")
    base = rates["JPEG decoding", "uint8"]
    for (label, dtype), r in rates.items():
        print(f"   {label + ', ' + dtype + (' (train.py)' if dtype == 'uint8' else ''):38s} {r:9.0f} img/s  {r / base:6.1f}x")
    print("   (the array was just written, so it is in the page cache, as it is after the first epoch)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="model size (default: vit_r50_b16 on a GPU, tiny on the CPU)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: 224, or 64 for tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch in 1. and 2. (default: 64 on a GPU, 16 on the CPU)")
    parser.add_argument("--triplets", type=int, nargs="+", default=None, help="triplets per training step in 3. (default: 64 8 on a GPU, 8 on the CPU)")
    parser.add_argument("--num-conditions", type=int, default=8, help="K, the number of conditions")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    parser.add_argument("--skip-model", action="store_true", help="leave out sections 1 to 3")
    parser.add_argument("--skip-loader", action="store_true", help="leave out section 4")
    parser.add_argument("--profile", action="store_true", help="CUDA: after 3.'s first size, the compiled step's top kernels")
    parser.add_argument("--loader-size", type=int, default=224, help="image size of section 4")
    parser.add_argument("--loader-images", type=int, default=64, help="JPEGs drawn for section 4")
    parser.add_argument("--loader-seconds", type=float, default=3.0, help="seconds per loader measurement")
    parser.add_argument("--prepare-workers", type=int, default=2, help="processes of dataset_tools.py prepare in section 4")
    args = parser.parse_args()
    device = default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if not args.skip_model:
        bench_model(args, device)
    if not args.skip_loader:
        bench_loader(args)


if __name__ == "__main__":
    main()
