#!/usr/bin/env python3
"""Real-size checkpoints on this machine (issue 17): random weights in the real shapes, measured as whole processes.

For each --like model (default llava-1.5-7b): `eqat data random-model` (streamed, sharded), `eqat inspect`, and
`eqat ask` with a 336 px image (--dtype bfloat16 on the CPU; --no-ask skips it, e.g. for a 13B in bf16, 26 GB, on a
24 GB machine), then optionally `eqat quantize` (--quantize METHOD:BITS:GROUP[,...]; plain --quantize is
rtn:4:128) with short text calibration (8 samples of 64 tokens, 1 Block-AP epoch, 2 E2E-QP steps of one sample),
each export inspected. --resume-check kills the first quantize with SIGKILL once half of the blocks are done, reruns
it with --resume, and compares every tensor file of the result with the uninterrupted run's, byte for byte. Peak RSS is the kernel's ru_maxrss of each process (what /usr/bin/time -v reports), wall and user
seconds from os.wait4. Results go to bench/results/scale_cpu_<date>.json. Checkpoints are written under --work (default
/tmp/eqat-scale, outside the repository: 14 GB for 7B, 27 GB for 13B) and deleted afterwards unless --keep.
Usage: python3 bench/scale.py [--like llava-1.5-7b,llava-1.5-13b] [--dtype float16] [--quantize SPECS] [--no-ask]
       [--resume-check] [--quantize-flags "..."] [--ask-export] [--keep]
"""
import argparse, datetime, hashlib, json, os, re, shutil, signal, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
p = argparse.ArgumentParser()
p.add_argument("--like", default="llava-1.5-7b")
p.add_argument("--dtype", default="float16", help="checkpoint dtype of the random model")
p.add_argument("--eqat", default=os.path.join(ROOT, "build/bin/eqat"))
p.add_argument("--work", default="/tmp/eqat-scale")
p.add_argument("--quantize", nargs="?", const="rtn:4:128", default="",
               help="METHOD:BITS:GROUP[,...] quantized with bf16 weights (plain --quantize: rtn:4:128)")
p.add_argument("--quantize-flags", default="", help="extra flags for every eqat quantize (e.g. '--init minmax')")
p.add_argument("--no-ask", action="store_true")
p.add_argument("--layers", type=int, default=0, help="decoder layers of the random model (0: the real count)")
p.add_argument("--resume-check", action="store_true", help="kill -9 the first quantize halfway, resume, compare bytes")
p.add_argument("--keep", action="store_true")
p.add_argument("--ask-export", action="store_true", help="eqat ask (336 px image, 8 tokens) on each export")
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
    def step(name, cmd, kill_at_block=None):
        t0 = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "TIME %M %U %S"] + cmd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        if kill_at_block is None:
            out, err = proc.communicate()
        else:  # read stderr until "block K/N" is printed for K = kill_at_block, then SIGKILL the whole group
            err_lines = []
            for line in proc.stderr:
                err_lines.append(line)
                m = re.match(r"block (\d+)/(\d+) ", line)
                if m and int(m.group(1)) >= kill_at_block:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            proc.wait()
            out, err = proc.stdout.read(), "".join(err_lines)
        wall = time.monotonic() - t0
        lines = err.strip().splitlines()
        rss_kib, user, sys_s = next((l.split()[1:] for l in reversed(lines) if l.startswith("TIME ")), (0, 0, 0))
        r = {"step": name, "command": " ".join(cmd), "exit": proc.returncode, "wall_s": round(wall, 1),
             "user_s": float(user), "sys_s": float(sys_s), "peak_rss_gib": round(int(rss_kib) / 2**20, 2),
             "stdout_tail": out.strip().splitlines()[-2:],
             "stderr_tail": [l for l in lines if not l.startswith("TIME ")][-2:]}
        # Seconds per decoder block, from the quantize's "block k/N METHOD: ... (12.3s)" lines.
        blocks = [float(m.group(1)) for m in (re.match(r"block \d+/\d+ .*\(([0-9.]+)s\)$", l) for l in lines) if m]
        if blocks:
            r["block_seconds"] = blocks
        print("%-14s %-22s exit %d  wall %7.1f s  peak RSS %6.2f GiB" % (like, name, proc.returncode, wall,
              r["peak_rss_gib"]), flush=True)
        steps.append(r)
        return r
    made = step("random-model", [a.eqat, "data", "random-model", "--like", like, "--dtype", a.dtype, "--out", d,
                                 "--overwrite"] + (["--layers", str(a.layers)] if a.layers else []))
    if made["exit"] != 0:  # eqat refused (e.g. a directory it did not write): never delete it
        sys.exit("random-model failed: " + " ".join(made["stderr_tail"]))
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    ckpt_bytes = sum(os.path.getsize(os.path.join(d, f)) for f in files)
    step("inspect", [a.eqat, "inspect", d])
    if a.no_ask:
        pass
    elif like.startswith("llava"):
        step("ask bf16", [a.eqat, "ask", "--model", d, "--image", image, "--dtype", "bfloat16",
                          "--max-new-tokens", "8", "What is in the image?"])
    else:
        step("generate bf16", [a.eqat, "generate", "--model", d, "--dtype", "bfloat16", "--max-new-tokens", "8",
                               "Once upon a time"])
    def tensor_digests(qdir):  # every file of the export but the run's own log, plots and summary (times)
        out = {}
        for f in sorted(os.listdir(qdir)):
            if f.startswith("eqat_quantize_"):
                continue
            h = hashlib.sha256()
            with open(os.path.join(qdir, f), "rb") as fh:
                for blk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(blk)
            out[f] = h.hexdigest()
        return out
    resume_result = None
    for i, spec in enumerate(s for s in a.quantize.split(",") if s):
        method, bits, group = spec.split(":")
        tag = "%s w%sg%s" % (method, bits, group)
        q = "%s-%s-w%sg%s" % (d, method, bits, group)
        cmd = [a.eqat, "quantize", "--model", d, "--out", q, "--overwrite", "--method", method, "--bits", bits,
               "--group-size", group, "--dtype", "bfloat16", "--samples", "8", "--val-samples", "1", "--seq-len", "64",
               "--epochs", "1", "--e2e-steps", "2", "--e2e-batch", "1", "--e2e-micro-batch", "1", "--calib",
               os.path.join(ROOT, "tests/data/text/tinyshakespeare.txt"), "--no-progress"] + a.quantize_flags.split()
        qr = step("quantize " + tag, cmd)
        if qr["exit"] != 0:
            continue
        step("inspect export " + tag, [a.eqat, "inspect", q])
        if a.ask_export and like.startswith("llava"):
            step("ask export " + tag, [a.eqat, "ask", "--model", q, "--image", image, "--max-new-tokens", "8",
                                       "What is in the image?"])
        if i == 0 and a.resume_check:
            with open(os.path.join(d, "config.json")) as f:
                cfg = json.load(f)
            n_layers = cfg.get("text_config", cfg)["num_hidden_layers"]
            full = tensor_digests(q)
            q2 = q + "-resumed"
            cmd2 = [q2 if x == q else x for x in cmd]
            killed = step("quantize %s killed at block %d" % (tag, n_layers // 2), cmd2, kill_at_block=n_layers // 2)
            resumed = step("quantize %s --resume" % tag, cmd2 + ["--resume"])
            same = resumed["exit"] == 0 and tensor_digests(q2) == full
            resume_result = {"killed_exit": killed["exit"], "resumed_exit": resumed["exit"],
                             "files_compared": sorted(full), "byte_identical": same}
            print("resume after kill -9: byte-identical" if same else "resume after kill -9: DIFFERENT", flush=True)
            if resumed["exit"] == 0 and not a.keep:  # only an export this run wrote (eqat refuses foreign dirs)
                shutil.rmtree(q2)
        if not a.keep:
            shutil.rmtree(q)
    results["models"].append({"like": like, "layers": a.layers or "all", "checkpoint_dtype": a.dtype, "shards": files,
                              "checkpoint_bytes": ckpt_bytes, "steps": steps, "resume_check": resume_result})
    if not a.keep:
        shutil.rmtree(d)
os.makedirs(os.path.dirname(a.out), exist_ok=True)
with open(a.out + ".tmp", "w") as f:
    json.dump(results, f, indent=2)
os.replace(a.out + ".tmp", a.out)
print("wrote", a.out)
