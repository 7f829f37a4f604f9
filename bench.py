"""
Speed and memory of the CCA model's fast paths and of the image loader, measured side by side in one run.

    python bench.py                       # GPU if there is one (bf16 autocast), else CPU with the tiny model
    python bench.py --arch tiny --img-size 32 --triplets 32 --skip-loader     # the demo's training step
    python bench.py --skip-model          # only the loader (section 4)
    python bench.py --skip-loader --profile   # GPU: and where the compiled step's time goes (top kernels)

    python bench.py --gpu-check           # CUDA graphs: correctness, the 8- and 64-triplet steps, DDP + compile
    python bench.py --gpu-check --smoke   # the same at the tiny model's size: a rehearsal on the CPU (about 4 min)

Prints, for the same weights and inputs:
  FLOPs per training image, counted by torch's FlopCounterMode (forward and backward), of the paper's model at
     224 px and of the model measured;
  1. all K conditions of a batch: `embed_all` (trunk once) vs one full forward per condition;
  2. block L: the single-query cross-attention vs the paper's eq. 4 form (q_c repeated to 1+N rows);
  3. train.py's training step at 64 and at 8 triplets (8: the paper's 64 shared by 8 GPUs): ms, images per second,
     MFU, peak memory, the host's time to issue one step and its kernels' GPU time (a step that takes as long to
     issue as to run is launch-bound), eager, compiled and replayed from CUDA graphs (CUDA, bf16 autocast); at the
     first size also the levers: cudnn.benchmark, channels-last, eager fp32, and with --autotune max-autotune;
     the projection for 8 GPUs; then train.py's fused Adam vs PyTorch's default;
  4. the loader, per worker process (one thread): training images per second from JPEG decoding (512 x 512 JPEGs,
     FashionAI's size, to 224 px) against cutting whole batches out of prepared arrays (dataset_tools.py prepare);
  5. search.py index from 512 x 512 JPEGs: a worker's rate handing uint8 vs float32 images (and bytes only), and
     indexing end to end with pillow in the workers vs batched decoding on the device (decode.py), beside embed_all.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cca import ARCH_SIZES, CCA, CCAConfig, build_model
from data import TripletBatches, normalise, read_filenames, training_set
from dataset_tools import prepare_images
from runtime import autocast, default_device, gpu_peak, number, training_flops
from synthetic import SYNTH_ATTRIBUTES, draw_garment, make_synthetic
from decode import FileBytes, batched_decoder
from search import ImageList, build_index
from train import Objective, make_optimizer, train_step


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
    bench_steps(args, model, triplets, flops, peak, device, levers_at=triplets[0])


def step_modes(model, T, levers, gpu, args):
    """(label, objective, bf16 autocast, replayed from CUDA graphs, cudnn.benchmark) of section 3's rows at T triplets."""
    eager = Objective(model, 0.2)
    if not gpu:
        return [("eager", eager, False, False, False)]
    compiled = lambda mode="default", **kw: torch.compile(Objective(model, 0.2, **kw), mode=mode, dynamic=False)  # noqa: E731
    modes = [("eager", eager, True, False, False), ("compiled", compiled(), True, False, False),
             ("compiled, CUDA graphs", compiled("reduce-overhead"), True, True, False)]
    if levers:  # the levers at one size only: each compiled variant costs a minute or more of compiling
        modes += [("compiled, cudnn.benchmark", compiled(), True, False, True),
                  ("compiled, channels-last", compiled(channels_last=True), True, False, False),
                  ("eager fp32 (tf32 mm)", eager, False, False, False)]
        if args.autotune:
            modes.append(("compiled, max-autotune", compiled("max-autotune-no-cudagraphs"), True, False, False))
    return modes


def bench_steps(args, model, triplets, flops, peak, device, levers_at=None):
    """3.: train.py's step (train_step on an Objective) at each size of `triplets`, in each mode of step_modes: wall
    time, img/s, MFU, peak memory, and on CUDA the host's time to issue one step beside its kernels' GPU time: a step
    whose issue time is about its wall time is bound by launching kernels, not by the GPU."""
    gpu, K, img = device.type == "cuda", model.cfg.num_conditions, model.cfg.img_size
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as train.py
    per_gpu = {}
    for T in triplets:
        c = torch.randint(0, K, (T,), device=device)
        a, p, n = torch.randint(0, 256, (3, T, 3, img, img), dtype=torch.uint8, device=device)  # as the loader gives them
        print(f"\n3. training step, {T} triplets ({3 * T} images), fused Adam" + (", bf16 autocast unless fp32" if gpu else ", fp32"))
        if gpu:
            print(f"   {'':32s} {'ms':>8s}  {'img/s':>8s}  {'MFU':>6s}  {'peak':>9s}  {'issue ms':>8s}  {'kernels ms':>10s}")
        times, objectives = {}, {}
        for label, m, ac, graphed, cudnn_bench in step_modes(model, T, T == levers_at, gpu, args):
            objectives[label] = m
            torch.backends.cudnn.benchmark = cudnn_bench
            step = lambda: train_step(m, opt, a, p, n, c, ac, graphed)  # noqa: E731
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            t = times[label] = timeit(step, device, iters=args.iters)
            ips = 3 * T / t
            row = f"   {label:32s} {t * 1e3:8.1f}  {ips:8.0f}"
            if gpu:
                issue, kernels = issue_time(step), kernel_time(step)
                mfu = f"{flops * ips / peak[1]:6.1%}" if peak and ac else "     -"
                row += f"  {mfu}  {torch.cuda.max_memory_allocated() / 2**30:5.1f} GiB  {issue * 1e3:8.1f}  {kernels * 1e3:10.1f}"
            print(row, flush=True)
        torch.backends.cudnn.benchmark = False
        if gpu:
            base = times["eager"]
            print("   vs eager: " + ", ".join(f"{k} {base / v:.2f}x" for k, v in times.items() if k != "eager"))
            per_gpu[T] = max((3 * T / v, k) for k, v in times.items())
        if gpu and args.profile and T == triplets[0]:
            try:
                profile_step(lambda: train_step(objectives["compiled"], opt, a, p, n, c, True), T)
            except Exception as e:  # the profiler is optional to the figures above and below
                print(f"   profile failed: {type(e).__name__}: {e}")
    if not gpu:
        print("   compiled: not measured on the CPU (the demo's step gained nothing there after about a minute of "
              "compiling: docs/LOG.md)")
    elif 8 in per_gpu:  # the paper's 64 triplets per step shared by 8 GPUs
        grads = sum(p.numel() for p in model.parameters()) * 4
        ips, label = per_gpu[8]
        print(f"\n   8 GPUs at 8 triplets each (the paper's step): at most 8 x {ips:.0f} = {8 * ips:,.0f} img/s ({label}), if "
              f"the all-reduce of {grads / 2**20:,.0f} MiB of fp32 gradients a step (each GPU sends and receives "
              f"{2 * 7 / 8 * grads / 2**20:,.0f} MiB in a ring) hides behind the backward")
    T = triplets[-1]
    plain = torch.optim.Adam(model.parameters(), lr=1e-4)  # PyTorch's default implementation (foreach)
    eager = Objective(model, 0.2)
    c = torch.randint(0, K, (T,), device=device)
    a, p, n = torch.randint(0, 256, (3, T, 3, img, img), dtype=torch.uint8, device=device)
    t_fused = timeit(lambda: train_step(eager, opt, a, p, n, c, gpu), device, iters=args.iters)
    t_plain = timeit(lambda: train_step(eager, plain, a, p, n, c, gpu), device, iters=args.iters)
    print(f"   eager, {T} triplets, default Adam: {t_plain * 1e3:6.1f} ms; fused Adam (train.py) is {t_plain / t_fused:.2f}x "
          "as fast")


def check_graphs(arch, img, T, device, batches=5):
    """The step replayed from CUDA graphs (torch.compile's reduce-overhead) against the eager step, from the same
    weights over the same `batches` batches of T triplets, with train.py's optimizer: (each step's losses, eager and
    graphed; the largest difference of the head's weights at the end; their largest movement from the start).
    On the CPU, reduce-overhead compiles without graphs."""
    gpu = device.type == "cuda"
    torch.manual_seed(0)
    cfg = CCAConfig(arch=arch, num_conditions=8, img_size=img)
    models = {"eager": CCA(cfg).to(device)}
    models["graphed"] = copy.deepcopy(models["eager"])
    start = models["eager"].head.weight.detach().float().clone()
    recipe = argparse.Namespace(lr=1e-4, weight_decay=0.0, lr_decay=0.985)
    losses = {}
    for label, model in models.items():
        objective = Objective(model, 0.2)
        step = objective if label == "eager" else torch.compile(objective, mode="reduce-overhead", dynamic=False)
        opt, _ = make_optimizer(model, recipe, device)
        g = torch.Generator(device).manual_seed(1)
        losses[label] = []
        for _ in range(batches):
            a, p, n = torch.randint(0, 256, (3, T, 3, img, img), dtype=torch.uint8, device=device, generator=g)
            c = torch.randint(0, 8, (T,), device=device, generator=g)
            loss, _ = train_step(step, opt, a, p, n, c, gpu, graphed=gpu and label == "graphed")
            losses[label].append(float(loss))
    heads = [m.head.weight.detach().float() for m in models.values()]
    return losses, float((heads[0] - heads[1]).abs().max()), float((heads[0] - start).abs().max())


def gpu_check(args, device):
    """python bench.py --gpu-check [--smoke]: the CUDA graphs' check, printed as it goes so that a run cut off still
    reports. (1) the 8-triplet step: graphed against eager (check_graphs), then eager, compiled and graphed timed;
    (2) the 64-triplet step with each lever; (3) train.py under torchrun on one process with DDP and torch.compile
    in reduce-overhead mode, to show that they run together. --smoke: the tiny model at 32 px, on any device."""
    gpu = device.type == "cuda"
    arch, img = ("tiny", 32) if args.smoke else (args.arch or "vit_r50_b16", args.img_size or 224)
    small, large = (8, 16) if args.smoke else (8, 64)
    print(f"(1) {small} triplets: the step replayed from CUDA graphs against the eager step, 5 batches", flush=True)
    t0 = time.time()
    losses, apart, moved = check_graphs(arch, img, small, device)
    for label, ls in losses.items():
        print(f"   {label:8s} losses " + " ".join(f"{x:.5f}" for x in ls))
    worst = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(*losses.values()))
    print(f"   largest relative loss difference {worst:.2e}; head weights apart {apart:.2e}, moved {moved:.2e} "
          f"({time.time() - t0:.0f} s, compile included)", flush=True)
    torch.manual_seed(0)
    cfg = CCAConfig(arch=arch, num_conditions=8, img_size=img)
    model = CCA(cfg).to(device)
    flops, peak = training_flops(cfg), gpu_peak(device) if gpu else None
    args.iters = 3 if args.smoke else args.iters
    bench_steps(args, model, [small], flops, peak, device)
    print(f"\n(2) {large} triplets, with each lever", flush=True)
    bench_steps(args, model, [large], flops, peak, device, levers_at=large)
    print("\n(3) train.py under torchrun, one process: DDP and torch.compile (reduce-overhead) together", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", "--data-root",
               os.path.join(tmp, "synthetic"), "--out-dir", tmp, "--arch", arch, "--img-size", str(img), "--epochs", "1",
               "--num-triplets", str(20 * small), "--batch-size", str(small), "--log-every", "5", "--compile",
               "--compile-mode", "reduce-overhead", "--workers", "0"]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if "step" in ln or "done" in ln or "torch.compile" in ln]
        print("\n".join("   " + ln for ln in lines[-6:]) or r.stderr[-2000:])
        print(f"   exit {r.returncode} in {time.time() - t0:.0f} s" + ("" if r.returncode == 0 else ": " + r.stderr.strip()[-500:]))


def issue_time(step, steps=5):
    """The host's seconds to issue one step (the call's return, the GPU idle at its start), median of `steps`."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return sorted(times)[steps // 2]


def gpu_kernels(step, steps):
    """The CUDA kernels of `steps` calls of step, from the profiler: (their events, their total GPU microseconds).
    Only the kernels themselves: a CPU operator (aten::mm) is credited its kernels' time too, which would count twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    return events, sum(e.self_device_time_total for e in events)


def kernel_time(step, steps=3):
    """The GPU time of one step's kernels (their sum, without the gaps between them), in seconds."""
    return gpu_kernels(step, steps)[1] / steps / 1e6


def profile_step(step, T, steps=5):
    """Where a compiled training step's GPU time goes: the kernels with the most time over `steps` steps."""
    events, total = gpu_kernels(step, steps)
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
        names = read_filenames(os.path.join(root, "filenames_train.txt"))
        kb = draw_jpegs([os.path.join(root, name) for name in names])
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


def draw_jpegs(paths, size=512):
    """Draw a garment into each path as a size x size JPEG (FashionAI's images are 512 x 512); their mean KB."""
    rng = np.random.default_rng(0)
    for path in paths:
        values = [int(rng.integers(len(v))) for v in SYNTH_ATTRIBUTES.values()]
        draw_garment(values, rng, size=size, zoom=1).save(path, quality=90)
    return sum(os.path.getsize(p) for p in paths) / len(paths) / 1024


def bench_index(args, device):
    """5.: search.py index from 512 x 512 JPEGs: a loader worker's rate (one thread) handing uint8 against float32
    images, and bytes only; then indexing end to end with pillow in the workers against batched decoding on the
    device (decode.py), beside the model's embed_all alone."""
    gpu = device.type == "cuda"
    arch = args.arch or ("vit_r50_b16" if gpu else "tiny")
    img = args.img_size or (224 if arch == "vit_r50_b16" else 64)
    n, B, workers = args.index_images, 64, args.index_workers
    torch.manual_seed(0)
    model = CCA(CCAConfig(arch=arch, num_conditions=args.num_conditions, img_size=img)).to(device).eval()
    meta = dict(attributes=[f"a{k}" for k in range(args.num_conditions)], values=[[] for _ in range(args.num_conditions)])
    decoder = batched_decoder()
    print(f"\n5. search.py index: {n} JPEGs of 512 x 512 to {img} px, {arch}, batch {B}, {workers} loader workers")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i:05d}.jpg") for i in range(n)]
        kb = draw_jpegs(paths)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in a DataLoader worker
        try:
            pillow, raw = ImageList(paths, img), FileBytes(paths)
            rates = {"pillow, uint8 (search.py)": rate(lambda i: pillow[i % n], 1, args.loader_seconds),
                     "pillow, float32": rate(lambda i: normalise(pillow[i % n][0]), 1, args.loader_seconds),
                     "bytes only (batched decoding)": rate(lambda i: raw[i % n], 1, args.loader_seconds)}
        finally:
            torch.set_num_threads(threads)
        print(f"   JPEGs of {kb:.0f} KB on average; a worker (one thread):")
        for label, r in rates.items():
            print(f"   {label:32s} {r:9.0f} img/s")
        x = torch.randint(0, 256, (B, 3, img, img), dtype=torch.uint8, device=device)
        with torch.no_grad(), autocast(device):
            t = timeit(lambda: model.embed_all(normalise(x)), device, iters=args.iters)
        print(f"   embed_all alone (all {args.num_conditions} conditions): {B / t:9.0f} img/s")
        for label, dec in (("pillow in the workers", None), (f"batched, {decoder[0] if decoder else '-'} on {device}", decoder)):
            if label.startswith("batched") and decoder is None:
                print("   batched decoding: neither TorchCodec nor torchvision is installed")
                continue
            t0 = time.perf_counter()
            build_index(model, paths, os.path.join(tmp, "g.idx"), meta, batch_size=B, workers=workers, log=lambda s: None,
                        decoder=dec)
            print(f"   index end to end, {label:28s} {n / (time.perf_counter() - t0):9.0f} img/s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, choices=sorted(ARCH_SIZES), help="model size (default: vit_r50_b16 on a GPU, tiny on the CPU)")
    parser.add_argument("--img-size", type=number(int, 8), default=None, help="image size (default: 224, or 64 for tiny)")
    parser.add_argument("--batch-size", type=number(int, 1), default=None, help="images per batch in 1. and 2. (default: 64 on a GPU, 16 on the CPU)")
    parser.add_argument("--triplets", type=number(int, 1), nargs="+", default=None, help="triplets per training step in 3. (default: 64 8 on a GPU, 8 on the CPU)")
    parser.add_argument("--num-conditions", type=number(int, 1), default=8, help="K, the number of conditions")
    parser.add_argument("--iters", type=number(int, 1), default=10, help="timed iterations per measurement")
    parser.add_argument("--skip-model", action="store_true", help="leave out sections 1 to 3")
    parser.add_argument("--skip-loader", action="store_true", help="leave out section 4")
    parser.add_argument("--profile", action="store_true", help="CUDA: after 3.'s first size, the compiled step's top kernels")
    parser.add_argument("--autotune", action="store_true", help="CUDA: also torch.compile's max-autotune-no-cudagraphs in 3. "
                                                                "(minutes of autotuning)")
    parser.add_argument("--gpu-check", action="store_true", help="only the CUDA graphs' check (gpu_check): correctness, "
                                                                 "the 8- and 64-triplet steps, DDP with torch.compile")
    parser.add_argument("--smoke", action="store_true", help="with --gpu-check: the tiny model at 32 px (a CPU rehearsal)")
    parser.add_argument("--loader-size", type=number(int, 8), default=224, help="image size of section 4")
    parser.add_argument("--loader-images", type=number(int, 8), default=64, help="JPEGs drawn for section 4")
    parser.add_argument("--loader-seconds", type=number(float, above=0), default=3.0, help="seconds per loader measurement")
    parser.add_argument("--prepare-workers", type=number(int, 1), default=2, help="processes of dataset_tools.py prepare in section 4")
    parser.add_argument("--skip-index", action="store_true", help="leave out section 5")
    parser.add_argument("--index-images", type=number(int, 8), default=256, help="JPEGs indexed in section 5")
    parser.add_argument("--index-workers", type=number(int, 0), default=2, help="loader workers of section 5's index")
    args = parser.parse_args()
    device = default_device()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    if args.gpu_check:
        return gpu_check(args, device)
    if not args.skip_model:
        bench_model(args, device)
    if not args.skip_loader:
        bench_loader(args)
    if not args.skip_index:
        bench_index(args, device)


if __name__ == "__main__":
    main()
