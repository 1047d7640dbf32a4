#!/usr/bin/env python3
"""fp32 against bf16 GEMMs at the shapes of a Block-AP step on the default VLM (issue 18).

A step of batch 4 packs ~140 rows; the block's GEMMs are [140, 256] x [256, 768] (q/k/v), [256, 1024] (gate/up),
[140, 512] x [512, 256] (down), [256, 256] (o), and their weight-gradient transposes. This times torch.mm on each, in
fp32 and in bf16 (LibTorch's oneDNN path, AMX where the CPU has it), at 1 and 2 threads, and prints one JSON object.
Conversions are not counted (bf16 output, no fp32 copy back): an upper bound on what bf16 GEMMs could save.

  .venv/bin/python bench/mm_dtype_bench.py [--reps 2000] > out.json
"""
import argparse
import json
import platform
import time

import torch

SHAPES = [(140, 256, 768), (140, 256, 1024), (140, 512, 256), (140, 256, 256), (256, 140, 768), (256, 140, 1024),
          (768, 140, 256)]


def time_mm(m, k, n, dtype, reps):
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(20):
        torch.mm(a, b, out=out)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=out)
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    names = [l.split(":", 1)[1].strip() for l in flags.splitlines() if l.startswith("model name")]
    res = {"what": __doc__.splitlines()[0], "torch": torch.__version__,
           "cpu": names[0] if names else platform.processor(),
           "amx_bf16": " amx_bf16" in flags, "avx512_bf16": " avx512_bf16" in flags, "shapes_mkn": SHAPES, "runs": []}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        run = {"threads": threads}
        for dtype in (torch.float32, torch.bfloat16):
            us = [time_mm(m, k, n, dtype, args.reps) * 1e6 for m, k, n in SHAPES]
            run[str(dtype).replace("torch.", "")] = {"us": [round(u, 1) for u in us], "total_us": round(sum(us), 1)}
        run["bf16_over_fp32"] = round(run["bfloat16"]["total_us"] / run["float32"]["total_us"], 3)
        res["runs"].append(run)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
