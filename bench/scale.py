#!/usr/bin/env python3
"""Real-size checkpoints on this machine (issue 17): random weights in the real shapes, measured as whole processes.

For each --like model (default llava-1.5-7b): `eqat data random-model` (streamed, sharded), `eqat inspect`, and
`eqat ask` with a 336 px image (--dtype bfloat16 on the CPU), then optionally `eqat quantize --method rtn`
(--quantize). Peak RSS is the kernel's ru_maxrss of each process (what /usr/bin/time -v reports), wall and user
seconds from os.wait4. Results go to bench/results/scale_cpu_<date>.json. Checkpoints are written under --work (default
/tmp/eqat-scale, outside the repository: 14 GB for 7B, 27 GB for 13B) and deleted afterwards unless --keep.
Usage: python3 bench/scale.py [--like llava-1.5-7b,llava-1.5-13b] [--dtype float16] [--quantize] [--keep]
"""
import argparse, datetime, json, os, shutil, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--like", default="llava-1.5-7b")
p.add_argument("--dtype", default="float16", help="checkpoint dtype of the random model")
p.add_argument("--eqat", default=os.path.join(ROOT, "build/bin/eqat"))
p.add_argument("--work", default="/tmp/eqat-scale")
p.add_argument("--quantize", action="store_true", help="also RTN W4g128 (bf16 weights)")
p.add_argument("--keep", action="store_true")
p.add_argument("--out", default=os.path.join(ROOT, "bench/results",
                                            "scale_cpu_%s.json" % datetime.date.today().isoformat()))
a = p.parse_args()


results = {"benchmark": "scale", "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
           "cores": len(os.sched_getaffinity(0)), "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") *
                                                                        os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
           "models": []}
os.makedirs(a.work, exist_ok=True)
image = os.path.join(ROOT, "models/shapes-llava/demo/shapes_0.png")
for like in a.like.split(","):
    d = os.path.join(a.work, like)
    steps = []
    def step(name, cmd):
        t0 = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "TIME %M %U %S"] + cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate()
        wall = time.monotonic() - t0
        lines = err.strip().splitlines()
        rss_kib, user, sys_s = next((l.split()[1:] for l in reversed(lines) if l.startswith("TIME ")), (0, 0, 0))
        r = {"step": name, "command": " ".join(cmd), "exit": proc.returncode, "wall_s": round(wall, 1),
             "user_s": float(user), "sys_s": float(sys_s), "peak_rss_gib": round(int(rss_kib) / 2**20, 2),
             "stdout_tail": out.strip().splitlines()[-2:],
             "stderr_tail": [l for l in lines if not l.startswith("TIME ")][-2:]}
        print("%-14s %-22s exit %d  wall %7.1f s  peak RSS %6.2f GiB" % (like, name, proc.returncode, wall,
              r["peak_rss_gib"]), flush=True)
        steps.append(r)
        return r
    made = step("random-model", [a.eqat, "data", "random-model", "--like", like, "--dtype", a.dtype, "--out", d,
                                 "--overwrite"])
    if made["exit"] != 0:  # eqat refused (e.g. a directory it did not write): never delete it
        sys.exit("random-model failed: " + " ".join(made["stderr_tail"]))
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    step("inspect", [a.eqat, "inspect", d])
    if like.startswith("llava"):
        step("ask bf16", [a.eqat, "ask", "--model", d, "--image", image, "--dtype", "bfloat16",
                          "--max-new-tokens", "8", "What is in the image?"])
    else:
        step("generate bf16", [a.eqat, "generate", "--model", d, "--dtype", "bfloat16", "--max-new-tokens", "8",
                               "Once upon a time"])
    if a.quantize:
        q = d + "-rtn-w4g128"
        qr = step("quantize rtn w4g128", [a.eqat, "quantize", "--model", d, "--out", q, "--overwrite", "--method", "rtn",
                                     "--bits", "4", "--group-size", "128", "--dtype", "bfloat16", "--samples", "8",
                                     "--val-samples", "1", "--seq-len", "64", "--calib",
                                     os.path.join(ROOT, "tests/data/text/tinyshakespeare.txt"), "--no-progress"])
        if qr["exit"] == 0:  # only an export this run wrote is inspected and removed
            step("inspect export", [a.eqat, "inspect", q])
            if not a.keep:
                shutil.rmtree(q)
    results["models"].append({"like": like, "checkpoint_dtype": a.dtype, "shards": files,
                              "checkpoint_bytes": ckpt_bytes, "steps": steps})
    if not a.keep:
        shutil.rmtree(d)
os.makedirs(os.path.dirname(a.out), exist_ok=True)
with open(a.out + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
os.replace(a.out + ".tmp", a.out)
print("wrote", a.out)
