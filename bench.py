"""
Speed and memory of the CCA model's fast paths, measured side by side in one run.

    python bench.py                       # GPU if there is one (bf16 autocast), else CPU with the tiny model
    python bench.py --arch tiny --img-size 64 --batch-size 32

Prints, for the same weights and inputs:
  1. all K conditions of a batch: `embed_all` (trunk once) vs one full forward per condition;
  2. block L: the single-query cross-attention vs the paper's eq. 4 form (q_c repeated to 1+N rows);
  3. train.py's training step on triplets, fp32 vs bf16 autocast (CUDA; TF32 matmuls on in both, as in
     train.py), with images per second and peak memory; then train.py's fused Adam vs PyTorch's default.
"""

import argparse
import time

import torch
from cca import CCA, CCAConfig
from train import train_step


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=None, help="model size (default: vit_r50_b16 on a GPU, tiny on the CPU)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: 224, or 64 for tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: 64 on a GPU, 16 on the CPU)")
    parser.add_argument("--num-conditions", type=int, default=8, help="K, the number of conditions")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    arch = args.arch or ("vit_r50_b16" if gpu else "tiny")
    img = args.img_size or (224 if arch == "vit_r50_b16" else 64)
    B = args.batch_size or (64 if gpu else 16)
    K = args.num_conditions
    torch.manual_seed(0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = CCA(CCAConfig(arch=arch, num_conditions=K, img_size=img)).to(device)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"device {name}, torch {torch.__version__}, arch {arch}, img {img}, batch {B}, K {K}")
    x = torch.randn(B, 3, img, img, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)

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
    c = torch.randint(0, K, (B // 3,), device=device)
    xs = torch.randn(3 * (B // 3), 3, img, img, device=device)

    a, p, n = xs.chunk(3)

    print(f"\n3. training step, {B // 3} triplets ({3 * (B // 3)} images), fused Adam")
    modes = [("fp32 (tf32 mm)", False), ("bf16 autocast", True)] if gpu else [("fp32", False)]
    times = {}
    for label, ac in modes:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        times[label] = timeit(lambda: train_step(model, opt, a, p, n, c, 0.2, ac), device, iters=args.iters)
        mem = f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if gpu else ""
        print(f"   {label:14s} {times[label] * 1e3:8.1f} ms  {3 * (B // 3) / times[label]:8.0f} img/s  {mem}")
    if gpu:
        print(f"   bf16 speed-up: {times['fp32 (tf32 mm)'] / times['bf16 autocast']:.2f}x")
    label, ac = modes[-1]
    plain = torch.optim.Adam(model.parameters(), lr=1e-4)  # PyTorch's default implementation (foreach)
    t_plain = timeit(lambda: train_step(model, plain, a, p, n, c, 0.2, ac), device, iters=args.iters)
    print(f"   {label}, default Adam:  {t_plain * 1e3:6.1f} ms; fused Adam (train.py) is {t_plain / times[label]:.2f}x as fast")


if __name__ == "__main__":
    main()
