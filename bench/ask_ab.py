#!/usr/bin/env python3
"""Two eqat builds, A and B, answering the same question about the same image, alternating A, B, A, B, ...

Each run is `/usr/bin/time eqat ask --model M --image IMG --max-new-tokens T --threads N QUESTION`; recorded: the
answer, prefill ms and decode tok/s (eqat's own report line), wall seconds and peak RSS (the kernel's ru_maxrss,
what /usr/bin/time -v reports). Alternating the builds spreads a noisy machine's drift over both.
Usage: python3 bench/ask_ab.py --a OLD_EQAT --b NEW_EQAT --model DIR[,DIR...] [--runs 2] [--threads 2]
       [--max-new-tokens 8] [--flags '--dtype bfloat16'] --out bench/results/NAME.json [--note TEXT]
"""
import argparse, datetime, json, os, re, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--a", required=True, help="eqat binary A (the baseline)")
p.add_argument("--b", required=True, help="eqat binary B")
p.add_argument("--model", required=True, help="model directories, comma-separated")
p.add_argument("--image", default=os.path.join(ROOT, "models/shapes-llava/demo/shapes_0.png"))
p.add_argument("--question", default="What is in the image?")
p.add_argument("--runs", type=int, default=2, help="runs of each build per model")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--max-new-tokens", type=int, default=8)
p.add_argument("--flags", default="", help="extra flags for every ask")
p.add_argument("--out", required=True)
p.add_argument("--note", default="")
a = p.parse_args()


def ask(binary, model):
    cmd = ["/usr/bin/time", "-f", "TIME %M %e", binary, "ask", "--model", model, "--image", a.image,
           "--max-new-tokens", str(a.max_new_tokens), "--threads", str(a.threads)] + a.flags.split() + [a.question]
    r = subprocess.run(cmd, capture_output=True, text=True)
    run = {"exit": r.returncode}
    m = re.search(r"TIME (\d+) ([0-9.]+)", r.stderr)
    if m:
        run["peak_rss_kib"], run["wall_s"] = int(m.group(1)), float(m.group(2))
        run["peak_rss_gib"] = round(run["peak_rss_kib"] / 2**20, 2)
    m = re.search(r"prefill (\d+) ms; (\d+) new tokens, ([0-9.]+) tok/s", r.stdout + r.stderr)
    if m:
        run["prefill_ms"], run["new_tokens"], run["decode_tok_s"] = int(m.group(1)), int(m.group(2)), float(m.group(3))
    run["answer"] = r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""
    if r.returncode != 0:
        run["stderr_tail"] = r.stderr[-500:]
    return run


res = {"benchmark": "ask_ab", "date": datetime.datetime.utcnow().strftime("%Y-%m-%dT%H:%M:%SZ"), "note": a.note,
       "a": a.a, "b": a.b, "threads": a.threads, "flags": a.flags, "max_new_tokens": a.max_new_tokens,
       "image": os.path.relpath(a.image, ROOT), "question": a.question, "models": {}}
for model in a.model.split(","):
    runs = []
    for i in range(a.runs):
        for build, binary in (("a", a.a), ("b", a.b)):
            r = ask(binary, model)
            r["build"] = build
            runs.append(r)
            print(model, build, {k: r.get(k) for k in ("exit", "peak_rss_gib", "prefill_ms", "decode_tok_s", "wall_s")},
                  flush=True)
    res["models"][model] = runs
os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
with open(a.out + ".tmp", "w") as f:
    json.dump(res, f, indent=1)
os.replace(a.out + ".tmp", a.out)
print("wrote", a.out)
