#!/usr/bin/env python3
"""Interop check: eqat's GPTQ exports loaded by the Python peers, logits compared with eqat's own.

Run with bench/peers/.venv/bin/python (bench/peers/setup.sh makes it), or through bench/peers/interop.sh.

For each case (model x bits/group x format x LLaVA layout) it
  1. makes the export with `eqat quantize --method rtn` (the packed integers are what is under test),
  2. takes eqat's logits with `eqat generate|ask --dump-logits` (greedy, fp32, and fp16 for the fp16 rows): the dump
     holds prompt_ids, generated_ids and logits [rows, vocab] (row 0: the prompt's last position, row r: after r
     generated tokens),
  3. loads the same directory in transformers (LlamaForCausalLM / LlavaForConditionalGeneration with the checkpoint's
     quantization_config -> optimum -> a GPTQModel kernel) and in GPTQModel (GPTQModel.load), feeds prompt_ids +
     generated_ids in one teacher-forced forward (LLaVA: + the pixel tensor of `eqat preprocess`, i.e. the very
     pixels eqat used) and compares the rows eqat dumped.
Each peer load runs in a child process (--worker) so one peer's global patches cannot leak into the next.

Tolerances
  * fp32 compute with exact dequantization: max|dlogit| <= 1e-4.
  * fp16 rounding on the peer side: first-order bound tol = n_r * u * M, u = 2^-11 (unit roundoff of fp16),
      M = max over compared rows and vocab j of sum_i |h_i * W_lm[j, i]|, the accumulated magnitude of the logit dot
          product (h: input of lm_head, taken from the same peer's fp32-exact forward),
      n_r = number of fp16 roundings on the path from the input to a logit.
    Derivation: each rounding perturbs the value it produces by a relative <= u of its accumulated magnitude; taking
    the gain of every later op on a relative error as <= 1 (first order), the final hidden state carries
    |dh_i| <= n_r*u*|h_i|, hence |dz_j| = |sum_i dh_i W_lm[j,i]| <= n_r*u*sum_i |h_i W_lm[j,i]| <= n_r*u*M.
      - transformers with dtype=float32: TorchLinear dequantizes scales(fp16)*(q-z) in fp16 (one rounding per
        weight), then matmuls in fp32: n_r = 4 per decoder layer (qkv, o, gate|up, down on the residual path).
      - GPTQModel in fp16 end to end: 16 roundings per decoder layer (2 norms, qkv, rope, scores, softmax, PV, o,
        residual, gate|up, act, mul, down, residual, 2 weight casts), 14 per CLIP layer, 4 for the projector and 4
        fixed (embedding cast, final norm, lm_head, logits).
      - against eqat's own fp16 run both sides round: 2 * n_r.
    A wrong integer moves a weight by a whole quantization step (relative ~2^-4..2^-1 at 4/2 bits, i.e. 2^7..2^10 u),
    so the bound still separates "same integers, other rounding" from "other integers"; the negative control row
    (a v2 export relabelled v1, so every zero point is off by one) shows it.
  * The strict check of the integers is always the fp32-exact row of each loader: transformers with the fp16 scales
    upcast to fp32 in place (same values, exact dequantization), GPTQModel loaded in fp16 (it refuses fp32) then
    upcast with .float() and its non-quantized tensors re-read from the checkpoint (the fp16 load rounded fp32 ones).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
U16 = 2.0 ** -11
TOL_FP32 = 1e-4

STORIES_DIR = REPO / "tests/data/models/stories260K"
CALIB_TXT = REPO / "tests/data/text/tinyshakespeare.txt"
LLAVA_DIR = REPO / "models/shapes-llava"
LLAVA_IMAGE = LLAVA_DIR / "demo/shapes_0.png"
STORIES_PROMPT = "Once upon a time"
LLAVA_QUESTION = "What color is the circle?"
MAX_NEW = 4


# ----------------------------------------------------------------------------------------------------------------
# driver side: eqat exports and dumps
# ----------------------------------------------------------------------------------------------------------------

def sh(cmd: list[str], log: Path) -> str:
    """Runs eqat; returns stderr+stdout; raises with the tail on failure."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n" + p.stdout + p.stderr + f"[rc {p.returncode}]\n")
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed (rc {p.returncode}): {(p.stdout + p.stderr)[-800:]}")
    return p.stderr + p.stdout


def make_cases(args) -> list[dict]:
    cases = []
    for bits, g in ((4, 128), (2, 64)):
        for fmt in ("gptq-v2", "gptq-v1"):
            cases.append(dict(model="stories260K", bits=bits, group=g, format=fmt, layout="-"))
    for bits, g in ((4, 128), (2, 64)):
        for layout in ("llava-hf", "transformers"):
            cases.append(dict(model="shapes-llava", bits=bits, group=g, format="gptq-v2", layout=layout))
    cases.append(dict(model="shapes-llava", bits=4, group=128, format="gptq-v1", layout="transformers"))
    for c in cases:
        c["name"] = f"{'s' if c['model'] == 'stories260K' else 'l'}-w{c['bits']}g{c['group']}-{c['format']}" + (
            "" if c["layout"] == "-" else f"-{c['layout']}")
    if args.only:
        cases = [c for c in cases if re.search(args.only, c["name"])]
    return cases


def export_and_dump(c: dict, work: Path, eqat: str, log: Path, threads: int) -> None:
    out = work / c["name"]
    common = ["--threads", str(threads)]
    if not out.exists():
        cmd = [eqat, "quantize", "--out", out, "--method", "rtn", "--bits", c["bits"], "--group-size", c["group"],
               "--format", c["format"], "--dtype", "float32", "--no-progress"] + common
        if c["model"] == "stories260K":
            cmd += ["--model", work / "stories-fp", "--calib", CALIB_TXT, "--samples", 16, "--seq-len", 64]
        else:
            cmd += ["--model", LLAVA_DIR, "--layout", c["layout"], "--samples", 8, "--val-samples", 4]
        sh(cmd, log)
    for dt in ("float32", "float16"):
        dump = work / f"{c['name']}.{dt}.logits.safetensors"
        if dump.exists():
            continue
        if c["model"] == "stories260K":
            text = sh([eqat, "generate", "--model", out, "--max-new-tokens", MAX_NEW, "--dtype", dt, "--print-prompt",
                       "--dump-logits", dump] + common + [STORIES_PROMPT], log)
        else:
            text = sh([eqat, "ask", "--model", out, "--image", LLAVA_IMAGE, "--max-new-tokens", MAX_NEW, "--dtype", dt,
                       "--print-prompt", "--dump-logits", dump] + common + [LLAVA_QUESTION], log)
        if dt == "float32":
            m = re.search(r"prompt: (.*?)\nprompt ids", text, re.S)
            (work / f"{c['name']}.prompt.txt").write_text(m.group(1) if m else "")


def emulate_variants(work: Path) -> list[dict]:
    """Copies of eqat exports, edited in Python, that show what eqat would have to write differently (or, for the
    control, that the tolerance catches wrong zero points). eqat itself is not changed."""
    extra = []

    def copy(src: str, dst: str) -> Path | None:
        s, d = work / src, work / dst
        if not s.exists():
            return None
        if not d.exists():
            shutil.copytree(s, d)
        for dt in ("float32", "float16"):
            for suffix in (f".{dt}.logits.safetensors",):
                if (work / f"{src}{suffix}").exists():
                    shutil.copy(work / f"{src}{suffix}", work / f"{dst}{suffix}")
        if (work / f"{src}.prompt.txt").exists():
            shutil.copy(work / f"{src}.prompt.txt", work / f"{dst}.prompt.txt")
        return d

    def edit_qcfg(d: Path, fn) -> None:
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg, indent=2))

    # 1. v1/asym with a meta.quantizer entry that satisfies GPTQModel's provenance rule
    d = copy("s-w4g128-gptq-v1", "s-w4g128-gptq-v1-metaq")
    if d is not None:
        def set_q(q):
            q.setdefault("meta", {})["quantizer"] = ["eqat:dev", "gptqmodel:0.9.0"]
        edit_qcfg(d, set_q)
        extra.append(dict(model="stories260K", bits=4, group=128, format="gptq-v1",
                          layout="meta.quantizer += gptqmodel:0.9.0 (emulated)", name=d.name, only=["gptqmodel"]))
    # 2. negative control: a v2 file labelled v1 -> the loader adds 1 to every zero point
    d = copy("s-w4g128-gptq-v2", "s-w4g128-control-v2-as-v1")
    if d is not None:
        edit_qcfg(d, lambda q: q.update(checkpoint_format="gptq"))
        extra.append(dict(model="stories260K", bits=4, group=128, format="gptq-v2 labelled v1",
                          layout="NEGATIVE CONTROL", name=d.name, only=["transformers"], expect="fail"))
    return extra


def run_worker(spec: dict, py: str, log: Path) -> list[dict]:
    env = dict(os.environ)
    env.setdefault("TORCH_COMPILE_DISABLE", "1")  # eager TorchLinear: same arithmetic, no inductor C++ builds
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = subprocess.run([py, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    with open(log, "a") as f:
        f.write(f"### worker {spec['loader']} {spec['name']}\n{p.stdout}\n{p.stderr}\n[rc {p.returncode}]\n")
    rows = [json.loads(l[len("@@ROW "):]) for l in p.stdout.splitlines() if l.startswith("@@ROW ")]
    if p.returncode != 0 or not rows:
        rows.append(dict(loader=spec["loader"], dtype="-", variant="worker", status="error",
                         message=(p.stderr.strip().splitlines() or ["no output"])[-1][:400]))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# worker side: one peer, one export
# ----------------------------------------------------------------------------------------------------------------

def emit(row: dict) -> None:
    print("@@ROW " + json.dumps(row), flush=True)


def short_err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:400]


def worker(spec: dict) -> None:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(spec.get("threads", 1))
    work = Path(spec["work"])
    d = work / spec["name"]
    llava = spec["model"] == "shapes-llava"
    dump32 = load_file(work / f"{spec['name']}.float32.logits.safetensors")
    dump16 = load_file(work / f"{spec['name']}.float16.logits.safetensors")
    prompt = dump32["prompt_ids"].long()
    gen = dump32["generated_ids"].long()
    ids = torch.cat([prompt, gen])[None]
    rows_ref = dump32["logits"].float()
    n_rows = rows_ref.shape[0]
    pos = torch.arange(prompt.numel() - 1, prompt.numel() - 1 + n_rows)
    pix = load_file(work / "pixels.safetensors")["pixel_values"] if llava else None
    cfg = json.loads((d / "config.json").read_text())
    tcfg = cfg.get("text_config", cfg)
    L_text = tcfg["num_hidden_layers"]
    L_vis = cfg["vision_config"]["num_hidden_layers"] if llava else 0
    qc = cfg["quantization_config"]
    base = dict(case=spec["name"], model=spec["model"], bits=spec["bits"], group_size=spec["group"],
                format=spec["format"], layout=spec["layout"], expect=spec.get("expect", "pass"),
                rows_compared=int(n_rows), eqat_prompt_ids=prompt.tolist(), eqat_generated_ids=gen.tolist())

    # tokenization agreement: the model's own tokenizer files vs eqat's ids
    ids_note = None
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(d)
        text = (work / f"{spec['name']}.prompt.txt").read_text() if llava else STORIES_PROMPT
        hf = tok(text).input_ids
        if llava:
            img = cfg["image_token_index"]
            hf = [t for i in hf for t in ([i] * cfg.get("image_seq_length", 1) if i == img else [i])]
        ids_note = dict(hf_ids_agree=(hf == prompt.tolist()), hf_ids=hf)
    except Exception as e:  # noqa: BLE001
        ids_note = dict(hf_ids_agree=None, hf_ids_error=short_err(e))

    def forward(model, dtype):
        captured = {}
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, i, o: captured.__setitem__("h", i[0].detach()))
        try:
            with torch.no_grad():
                kw = dict(input_ids=ids)
                if llava:
                    kw["pixel_values"] = pix.to(dtype)
                out = model(**kw).logits[0, pos].float()
        finally:
            hook.remove()
        h = captured["h"][0, pos].double()
        acc = (h.abs() @ head.weight.detach().double().abs().T).max().item()  # M = max_j sum_i |h_i W_lm[j,i]|
        return out, acc

    def compare(out, ref, tol, tol_kind, **kw):
        diff = (out - ref).abs().max().item()
        ok = bool(math.isfinite(diff) and diff <= tol)
        row = dict(base, status="ok", max_abs_diff=diff, tolerance=tol, tolerance_kind=tol_kind,
                   argmax_agree=bool((out.argmax(-1) == ref.argmax(-1)).all()), **kw)
        row["pass"] = ok if row["expect"] == "pass" else (not ok)
        row.update(ids_note)
        emit(row)

    def refused(e, **kw):
        row = dict(base, status="refused", message=short_err(e), max_abs_diff=None, tolerance=None,
                   **kw)
        row["pass"] = None  # nothing to compare; the message is the finding
        row.update(ids_note)
        emit(row)

    if spec["loader"] == "transformers":
        from transformers import AutoModelForCausalLM, GPTQConfig, LlavaForConditionalGeneration
        cls = LlavaForConditionalGeneration if llava else AutoModelForCausalLM
        loader = f"transformers {cls.__name__ if llava else 'AutoModelForCausalLM'}"
        if spec.get("try_auto", False):
            # default kernel choice: optimum asks GPTQModel for a kernel without in_features or dtype
            try:
                m = cls.from_pretrained(d, dtype=torch.float32, device_map="cpu")
                kern = type(next(x for x in m.modules() if hasattr(x, "qweight"))).__name__
                out, acc = forward(m, torch.float32)
                # TorchLinear and TorchCpuAvx512Linear (fp32 input) both hand matmul a weight rounded to fp16 once
                n_r = 4 * L_text
                compare(out, rows_ref, n_r * U16 * acc, f"fp16 dequant: {n_r}*2^-11*M, M={acc:.3g}",
                        loader=f"{loader} (backend=auto -> {kern})", kernel=kern, dtype="float32 (fp16 dequant)",
                        reference="eqat float32")
                del m
            except Exception as e:  # noqa: BLE001
                refused(e, loader=loader + " (backend=auto)", dtype="float32", reference="eqat float32")
        try:
            m = cls.from_pretrained(d, dtype=torch.float32, device_map="cpu",
                                    quantization_config=GPTQConfig(bits=qc["bits"], backend="torch"))
        except Exception as e:  # noqa: BLE001
            refused(e, loader=loader + " (backend=torch)", dtype="float32", reference="eqat float32")
            return
        qlin = [x for x in m.modules() if hasattr(x, "qweight")]
        kernel = type(qlin[0]).__name__
        # (a) stock: fp32 activations, weights dequantized in the scales' dtype (fp16)
        out, _ = forward(m, torch.float32)
        # (b) exact: scales upcast in place -> scales*(q-z) exact in fp32
        for x in qlin:
            x.scales.data = x.scales.data.float()
            for fn in ("_stream_reset_cache", "clear_weight_cache"):
                if hasattr(x, fn):
                    getattr(x, fn)()
        out_x, acc = forward(m, torch.float32)
        n_r = 4 * L_text
        compare(out, rows_ref, n_r * U16 * acc, f"fp16 dequant: {n_r}*2^-11*M, M={acc:.3g}",
                loader=f"{loader} (backend=torch -> {kernel})", kernel=kernel, dtype="float32 (fp16 dequant)",
                reference="eqat float32")
        compare(out_x, rows_ref, TOL_FP32, "fp32", loader=f"{loader} (backend=torch -> {kernel})", kernel=kernel,
                dtype="float32 (scales upcast: exact dequant)", reference="eqat float32")
        return

    # GPTQModel
    from gptqmodel import BACKEND, GPTQModel
    loader = "GPTQModel.load (backend=torch -> TorchLinear)"
    if spec.get("try_fp32", False):
        try:
            GPTQModel.load(str(d), device="cpu", backend=BACKEND.TORCH, dtype=torch.float32)
            emit(dict(base, loader=loader, dtype="float32", status="ok", message="loaded in fp32 (not compared)",
                      **{"pass": None}))
        except Exception as e:  # noqa: BLE001
            refused(e, loader=loader, dtype="float32", reference="eqat float32")
    try:
        g = GPTQModel.load(str(d), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    except Exception as e:  # noqa: BLE001
        refused(e, loader=loader, dtype="float16", reference="eqat float32")
        return
    m = g.model
    qlin = [x for x in m.modules() if hasattr(x, "qweight")]
    kernel = type(qlin[0]).__name__
    out16, _ = forward(m, torch.float16)
    # upcast, then restore the non-quantized tensors exactly as stored (the fp16 load rounded the fp32 ones)
    m.float()
    sd = load_file(d / "model.safetensors")
    msd = m.state_dict()
    loaded_ptrs = {msd[k].data_ptr() for k in sd if k in msd}
    missing = [k for k in msd if k not in sd and msd[k].data_ptr() not in loaded_ptrs]  # tied weights are not missing
    for k, v in sd.items():
        if k in msd and not k.endswith((".qweight", ".qzeros", ".g_idx")):
            if k.endswith(".scales"):
                assert torch.equal(msd[k].half(), v), k  # the scales GPTQModel read are eqat's
            msd[k].copy_(v.to(msd[k].dtype))
    for x in qlin:
        for fn in ("_stream_reset_cache", "clear_weight_cache"):
            if hasattr(x, fn):
                getattr(x, fn)()
    out32, acc = forward(m, torch.float32)
    n_r = 16 * L_text + (14 * L_vis + 4 if llava else 0) + 4
    note = {}
    if missing:  # accelerate.load_checkpoint_in_model left these at their init values (torch.empty: garbage/NaN)
        note = dict(unloaded_model_keys=len(missing), unloaded_example=missing[:3],
                    message=f"loaded, but {len(missing)} model tensors are not in the checkpoint and stay "
                            f"uninitialised (e.g. {missing[0]}); checkpoint has e.g. "
                            + next((k for k in sd if k not in msd), "-"))
    compare(out16, rows_ref, n_r * U16 * acc, f"fp16: {n_r}*2^-11*M, M={acc:.3g}", loader=loader, kernel=kernel,
            dtype="float16", reference="eqat float32", **note)
    ref16 = dump16["logits"].float()
    if ref16.shape == rows_ref.shape and torch.equal(dump16["generated_ids"], dump32["generated_ids"]):
        compare(out16, ref16, 2 * n_r * U16 * acc, f"fp16 both sides: 2*{n_r}*2^-11*M", loader=loader,
                kernel=kernel, dtype="float16", reference="eqat float16", **note)
    compare(out32, rows_ref, TOL_FP32, "fp32", loader=loader, kernel=kernel,
            dtype="float32 (fp16 load, upcast, non-quantized tensors re-read)", reference="eqat float32", **note)


# ----------------------------------------------------------------------------------------------------------------

def fmt(v, p=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{p}g}"
    return str(v)


def table(rows: list[dict]) -> str:
    head = "| model | W/g | format | layout | loader | compute dtype | reference | status | max abs diff | tolerance | pass |"
    out = [head, "|" + "---|" * 11]
    for r in rows:
        status = r["status"] if not r.get("message") else f"{r['status']}: {r['message'][:200]}"
        p = r.get("pass")
        ps = "n/a" if p is None else ("PASS" if p else "FAIL")
        if r.get("expect") == "fail" and p is not None:
            ps += " (expected to differ)" if p else " (control NOT detected)"
        out.append(f"| {r.get('model')} | W{r.get('bits')}g{r.get('group_size')} | {r.get('format')} | "
                   f"{r.get('layout')} | {r.get('loader')} | {r.get('dtype')} | {r.get('reference', '-')} | "
                   f"{status.replace('|', '/')} | {fmt(r.get('max_abs_diff'))} | {fmt(r.get('tolerance'))} | {ps} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eqat", default=os.environ.get("EQAT", str(REPO / "build/bin/eqat")))
    ap.add_argument("--work", help="work directory (default: a new temp dir); reused exports are not rebuilt")
    ap.add_argument("--out", default=str(REPO / f"bench/results/interop_cpu_{_dt.date.today().isoformat()}.json"))
    ap.add_argument("--only", help="regex on case names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp work directory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        try:
            worker(json.loads(a.worker))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            return 1
        return 0

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="eqat-interop-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "interop.log"
    print(f"work dir: {work} (log: {log})", file=sys.stderr)
    eqat = a.eqat
    t0 = time.time()
    if not (work / "stories-fp").exists():
        sh([eqat, "convert", "llama2c", "--checkpoint", STORIES_DIR / "stories260K.bin", "--tokenizer",
            STORIES_DIR / "tok512.bin", "--out", work / "stories-fp"], log)
    if not (work / "pixels.safetensors").exists():
        sh([eqat, "preprocess", "--model", LLAVA_DIR, "--image", LLAVA_IMAGE, "--out", work / "pixels.safetensors"],
           log)
    cases = make_cases(a)
    for c in cases:
        print(f"eqat: {c['name']}", file=sys.stderr)
        export_and_dump(c, work, eqat, log, a.threads)
    extra = emulate_variants(work) if not a.only else []

    rows: list[dict] = []
    seen_auto = set()
    for c in cases + extra:
        for loader in c.get("only", ["transformers", "gptqmodel"]):
            spec = dict(c, loader=loader, work=str(work), threads=a.threads)
            spec.pop("only", None)
            if loader == "transformers" and c["format"] == "gptq-v2" and c["layout"] != "NEGATIVE CONTROL":
                key = (c["model"], c["bits"], c["layout"])
                spec["try_auto"] = key not in seen_auto
                seen_auto.add(key)
            if loader == "gptqmodel":
                spec["try_fp32"] = c["name"] == "s-w4g128-gptq-v2"
            print(f"peer: {loader:12s} {c['name']}", file=sys.stderr)
            got = run_worker(spec, sys.executable, log)
            for r in got:
                r.setdefault("case", c["name"])
                for k in ("model", "bits", "group_size", "format", "layout"):
                    r.setdefault(k, c.get(k if k != "group_size" else "group"))
            rows.extend(got)

    from importlib.metadata import version
    result = dict(
        date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        device="cpu",
        eqat=eqat,
        peers={n: version(n) for n in ("gptqmodel", "transformers", "optimum", "torch", "auto-round")},
        env=dict(TORCH_COMPILE_DISABLE=os.environ.get("TORCH_COMPILE_DISABLE", "1")),
        settings=dict(method="rtn", eqat_dtype="float32 (+ float16 dump for the fp16 reference rows)",
                      stories_prompt=STORIES_PROMPT, llava_image=str(LLAVA_IMAGE.relative_to(REPO)),
                      llava_question=LLAVA_QUESTION, max_new_tokens=MAX_NEW,
                      compared="every logits row eqat dumped (prompt's last position + each greedy step), "
                               "teacher-forced with eqat's prompt_ids + generated_ids",
                      tol_fp32=TOL_FP32, tol_fp16="n_r * 2^-11 * M (see interop.py docstring)"),
        cases=rows,
        seconds=round(time.time() - t0, 1),
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"\nwrote {a.out}; work dir {work}", file=sys.stderr)
    if not a.work and not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r for r in rows if r.get("pass") is False and r.get("status") == "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
