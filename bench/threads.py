#!/usr/bin/env python3
"""CPU threads on a busy machine (issue 21): does eqat keep its speed when another process holds a core?

Measures, as whole processes (wall and user CPU from os.wait4, median of --runs):
  quantize: `eqat quantize --method rtn --bits 4 --group-size 128` on the default model (64 samples);
  decode:   `eqat bench decode --json` (LLaVA-1.5-7B-shaped layers, random weights) W4g128 tokens/s;
each with the machine idle and with one core held by a busy loop, for
  --threads 1, --threads 2, automatic threads (quantize), and OpenMP's spinning wait (OMP_WAIT_POLICY=ACTIVE,
  libgomp's own default) against eqat's default passive wait.
Usage: python3 bench/threads.py [--runs 3] [--eqat build/bin/eqat] [--out bench/results/threads_cpu_DATE.json]
Only the standard library; eqat from build/bin.
"""
import argparse, datetime, json, os, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--runs", type=int, default=3)
p.add_argument("--eqat", default=os.path.join(ROOT, "build/bin/eqat"))
p.add_argument("--out", default=os.path.join(ROOT, "bench/results",
                                            "threads_cpu_%s.json" % datetime.date.today().isoformat()))
a = p.parse_args()


def run(cmd, env_extra):
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    env.update(env_extra)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    if status != 0:
        sys.exit("failed (%d): %s" % (status, " ".join(cmd)))
    return wall, ru.ru_utime, out


def busy_loop():  # one core held by a spinning process, as a parallel build or another user would
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def measure(name, cmd, env, parse=None):
    walls, users, values = [], [], []
    for _ in range(a.runs):
        w, u, out = run(cmd, env)
        walls.append(w)
        users.append(u)
        if parse:
            values.append(parse(out))
    r = {"case": name, "wall_s": statistics.median(walls), "user_s": statistics.median(users),
         "wall_s_all": walls}
    if parse:
        r["decode_tok_s"] = statistics.median(values)
    print("%-46s wall %7.2f s  user %7.2f s%s" % (name, r["wall_s"], r["user_s"],
          "  %.2f tok/s" % r["decode_tok_s"] if parse else ""), flush=True)
    return r


def tok_s(out):
    j = json.loads(out)
    return next(x["decode_tok_s"] for x in j["results"] if x["format"] == "W4g128")


tmp = tempfile.mkdtemp(prefix="eqat-threads-")
quant = [a.eqat, "quantize", "--model", os.path.join(ROOT, "models/shapes-llava"), "--out", os.path.join(tmp, "q"),
         "--overwrite", "--method", "rtn", "--bits", "4", "--group-size", "128", "--samples", "64",
         "--val-samples", "8", "--no-progress"]
decode = [a.eqat, "bench", "decode", "--json", "--layers", "2", "--prompt", "64", "--new-tokens", "32",
          "--formats", "W4g128"]
cases = [
    ("quantize --threads 1", quant + ["--threads", "1"], {}, None),
    ("quantize --threads 2", quant + ["--threads", "2"], {}, None),
    ("quantize --threads 2, spinning wait", quant + ["--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}, None),
    ("quantize auto threads", quant, {}, None),
    ("decode 1 thread", decode, {"OMP_NUM_THREADS": "1"}, tok_s),
    ("decode 2 threads", decode, {"OMP_NUM_THREADS": "2"}, tok_s),
    ("decode 2 threads, spinning wait", decode, {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "ACTIVE"}, tok_s),
]
results = {"benchmark": "threads", "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"),
           "cores": len(os.sched_getaffinity(0)), "runs": a.runs, "idle": [], "one_core_busy": []}
for load in ("idle", "one_core_busy"):
    print("-- %s" % load, flush=True)
    hog = busy_loop() if load == "one_core_busy" else None
    try:
        for name, cmd, env, parse in cases:
            results[load].append(measure(name, cmd, env, parse))
    finally:
        if hog:
            hog.kill()
            hog.wait()
os.makedirs(os.path.dirname(a.out), exist_ok=True)
with open(a.out + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
os.replace(a.out + ".tmp", a.out)
print("wrote", a.out)
