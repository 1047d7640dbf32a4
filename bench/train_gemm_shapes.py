#!/usr/bin/env python3
"""The GEMMs of training the default model, timed with the LibTorch eqat links (the project's .venv torch wheel).

Two questions behind eqat's CPU training choices (src/quant/qat/optim.h, models/SOURCES.md, issue 18):
  - does a second thread help a GEMM this small? (fp32, 2 threads / 1 thread) -- it decides data-parallel training;
  - would bf16 GEMMs pay? (bf16 / fp32, 1 thread, conversions not counted).
Shapes y = x·Wᵀ, x [M, K], W [N, K]: M = 70 is a Block-AP batch of two samples of the default model (C 256, F 512),
M = 1100 an E2E-QP micro-batch's worth of rows summed over a step, the others the larger models' shapes for contrast.
    .venv/bin/python bench/train_gemm_shapes.py [--reps 300] [--out bench/results/train_gemm_shapes_cpu_DATE.json]
"""
import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHAPES = [(70, 256, 256), (70, 256, 512), (70, 512, 256), (1100, 256, 512), (128, 4096, 4096), (128, 4096, 11008)]


def time_linear(M: int, K: int, N: int, dtype: torch.dtype, threads: int, reps: int) -> float:
    """Median microseconds of torch.nn.functional.linear over `reps` calls, after 10 warm-up calls."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    for _ in range(10):
        torch.nn.functional.linear(x, w)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / f"bench/results/train_gemm_shapes_cpu_{datetime.date.today()}.json"))
    a = ap.parse_args()
    rows = []
    for M, K, N in SHAPES:
        reps = a.reps if M * K * N < 1 << 28 else max(5, a.reps // 30)
        f1 = time_linear(M, K, N, torch.float32, 1, reps)
        f2 = time_linear(M, K, N, torch.float32, 2, reps)
        b1 = time_linear(M, K, N, torch.bfloat16, 1, reps)
        rows.append(dict(M=M, K=K, N=N, fp32_1t_us=round(f1, 1), fp32_2t_us=round(f2, 1), bf16_1t_us=round(b1, 1),
                         two_threads_over_one=round(f2 / f1, 3), bf16_over_fp32=round(b1 / f1, 3),
                         fp32_1t_gflops=round(2 * M * K * N / f1 / 1e3, 1)))
        print(f"[{M}, {K}] x [{K}, {N}]: fp32 {f1:.1f} us, 2 threads {f2 / f1:.2f}x, bf16 {b1 / f1:.2f}x")
    out = dict(benchmark="train_gemm_shapes", date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
               torch=torch.__version__, cores=len(os.sched_getaffinity(0)),
               command="python bench/train_gemm_shapes.py (the project's .venv)", reps=a.reps,
               note="median per call; bf16 excludes the fp32->bf16 conversions a training step would add", rows=rows)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, a.out)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
