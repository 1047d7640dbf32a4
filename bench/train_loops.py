#!/usr/bin/env python3
"""Block-AP's elementwise training loops: scalar against the vectorised variant the CPU picks (src/quant/train_loops.h).

Runs the same Block-AP-only quantize of the default model with EQAT_CPU_KERNEL=scalar and with the default, in
turn (A B A B ...), and writes each run's wall seconds and Block-AP ms per iteration (from eqat's summary) to JSON.
The two write the same model bytes; only the time differs.
    python3 bench/train_loops.py [--runs 3] [--out bench/results/train_loops_cpu_DATE.json]
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eqat", default=str(REPO / "build/bin/eqat"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / f"bench/results/train_loops_cpu_{datetime.date.today()}.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eqat-train-loops-"))
    cmd = [a.eqat, "quantize", "--out", str(work / "q"), "--overwrite", "--samples", "256", "--threads", "1",
           "--no-progress", "--bits", "3", "--group-size", "128", "--e2e-epochs", "0"]
    runs = []
    try:
        for _ in range(a.runs):
            for loops in ("scalar", "default"):
                env = dict(os.environ, EQAT_CPU_KERNEL="scalar" if loops == "scalar" else "")
                t = time.monotonic()
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                wall = time.monotonic() - t
                block = json.loads(re.search(r"wrote \S+: (\{.*\})", p.stdout + p.stderr).group(1))["block_phase"]
                runs.append(dict(loops=loops, wall_s=round(wall, 2), block_s=round(block["seconds"], 2),
                                 block_ms_per_iteration=round(block["ms_per_iteration"], 2)))
                print(runs[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: {f: statistics.median(r[f] for r in runs if r["loops"] == k) for f in ("wall_s", "block_ms_per_iteration")}
           for k in ("scalar", "default")}
    out = dict(benchmark="train-loops", date=datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
               commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=REPO).stdout.strip(),
               cores=len(os.sched_getaffinity(0)), command=" ".join(cmd[1:]).replace(str(work), "$WORK"),
               runs=runs, median=med,
               ratio_default_over_scalar={f: round(med["default"][f] / med["scalar"][f], 3)
                                          for f in ("wall_s", "block_ms_per_iteration")})
    tmp = a.out + ".tmp"
    Path(tmp).write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, a.out)
    print(json.dumps(out["median"]), out["ratio_default_over_scalar"])


if __name__ == "__main__":
    main()
