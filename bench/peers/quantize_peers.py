#!/usr/bin/env python3
"""The peers (Intel AutoRound, GPTQModel) quantize eqat's two models at eqat's settings; eqat scores them.

Run through bench/peers/quantize_peers.sh (makes bench/peers/.venv with setup.sh when missing, runs under nice):
    bench/peers/quantize_peers.sh [--only REGEX] [--peers LIST] [--eqat-methods LIST] [--work DIR] [--out FILE]
                                  [--merge EARLIER.json] [--print RESULT.json]
Writes bench/results/peers_cpu_<date>.json and prints one Markdown table per model (peers and eqat side by side).
Everything outside the repository goes under --work (default /tmp/eqat-peers). --only 'MODEL/WbG/METHOD' regexes pick
rows (e.g. 'stories260K/W2g-1/gptqmodel'); --merge keeps an earlier result's other rows (the JSON lists every run).

What each row is
  model x setting x method. Methods: the peers, run in a child process each (--worker; one peer's global patches
  cannot leak into the next, and the child's wall time is the "total" column), and eqat's own gptq / efficientqat
  (`eqat quantize` with scripts/quant-table.sh's flags; --eqat-methods adds rtn) as the reference rows.
    autoround      auto-round 0.16.0, its default recipe (SignRound): iters 200, lr auto (= 1/iters = 0.005),
                   minmax_lr = lr, batch_size 8, enable_quanted_input, scale_dtype fp16, seed 42; sym=False (asym like
                   eqat). On a CPU AutoRound's own default (amp=True; the device "prefers bf16") casts the model to
                   bfloat16 before tuning: kept, that is what `AutoRound(...)` does here. enable_torch_compile=False
                   (a speed option; inductor C++ builds on the shared 2-core CPU), nothing else changed.
                   Its rule: a Linear whose in or out features is not a multiple of 32 stays 16-bit
                   (compressors/layer_config_resolver.py; only an INFO line "Unquantized layers: [...]"): on
                   stories260K that is every MLP linear (172 wide), 15 of 35 - the row is marked, its KL is not
                   comparable. Its default export format ('auto_round') refuses 4-bit asym here (it packs AWQ-style
                   through gptqmodel's WQLinear_GEMM: "unexpected keyword argument 'weight_dtype'"); the refusal is
                   recorded and that row is exported as 'auto_round:auto_gptq' (the same quantized weights).
    gptqmodel      GPTQModel 7.7.0 GPTQ: desc_act=False, sym=False, damp_percent=0.01 (eqat's damp), true_sequential
                   (default), act_group_aware=True (GPTQModel's default for GPTQ: "GAR", a group-aware activation
                   reordering that keeps g_idx sequential, so no act-order at inference), mse=0 (default),
                   damp_auto_increment 0.01 (default; only used if the Hessian is not positive definite).
                   Refusals seen: GAR with group_size -1 (ValueError before quantizing), and 3-bit packing of a
                   172-wide output (pack_block refuses, the fallback packer raises IndexError in a worker thread and
                   GPTQModel ends the process with os._exit(1); the error lines are taken from its stderr).
    gptqmodel-noGAR the same with act_group_aware=False: the textbook GPTQ that eqat's `--method gptq` implements, as a
                   control (same algorithm, other code: it should land near eqat's gptq row). Run at W2g64 and at
                   per-channel (where the default refuses); --all-controls runs it everywhere.
    Both peers compute in float32 except where stated (AutoRound's bf16 above); eqat's CPU default (dtype auto) is
    float32 for these fp16 / fp32 checkpoints. GPTQModel runs with offload_to_disk=False (a memory option) and
    GPTQMODEL_CPU_WORKERS=2 (on a 2-core machine its default of 1 CPU worker makes GPTQModel.load() refuse
    quantization: "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1").
  Ragged groups (stories260K down_proj, in 172, group 64): eqat and GPTQModel both use groups 64, 64, 44 (g_idx
  i // 64; GPTQModel's in_features_groups (172, 3) in the JSON); AutoRound leaves the layer in FP (rule above).

Calibration (the same samples eqat calibrates on, built here once per model and fed to both peers)
  shapes-llava: what `eqat quantize --samples 1024` (quant-table's shapes rows, no --calib; --samples N and --seed S
    here pick others, e.g. --samples 4096 for eqat quantize's own default) uses: `eqat data shapes --train 1088
    --test 0 --seed 2` (eqat generates n_train + n_val = 1024 + 64 conversations), eqat's seeded Fisher-Yates
    shuffle (std::mt19937_64, seed 2, reimplemented bit-exactly here), the first 1024 records. Each is
    tokenized as eqat's tokenize_conversation does (LLaVA-1.5 vicuna_v1):
      "<s>{system} USER: <image>\\n{question} ASSISTANT:" + " {answer}</s>" (answer tokenized on its own, + EOS),
    system = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
    detailed, and polite answers to the user's questions." (eqat's kVicunaSystem; LLaVA's vicuna_v1 text), the
    <image> marker expanded to 9 image tokens (id 687); sentencepiece on the model's tokenizer.model, chunk by chunk.
    Pixels: transformers' CLIPImageProcessor with the model's preprocessor_config.json. Both are checked against
    eqat here (`eqat ask --print-prompt` ids of sample 0's prompt, `eqat preprocess` pixels of its image) and the
    result is recorded under calibration.checks.
    The peers get the image-text samples through the full LlavaForConditionalGeneration forward (input_ids,
    attention_mask, pixel_values), so the decoder blocks see the CLIP+projector features at the 9 image positions
    exactly as in eqat's calibration (a hook counts the projector calls to prove it: calibration_projector_calls):
      AutoRound: AutoRound(model, processor=AutoProcessor(model dir)) selects its MLLM compressor; its MLLM calibrator
        feeds any non-string `dataset` to model(**batch). Batches of 8 (its batch_size: the MLLM calibrator counts
        samples as batches x batch_size), right-padded with <pad> (688) to the longest sample (45 tokens) with
        attention_mask 0 on the pad: AutoRound caches block inputs by concatenating samples, so one length is
        needed. Its MLLM path keeps no valid-token mask, so the padded positions (~23 % of them) are in its block-
        output MSE; its own LLaVA dataset path pads the same way. Its template/dataset machinery
        (auto_round/compressors/mllm) is not used: its "llava" template needs the original LLaVA repo's code and the
        "default" one a chat template; the processor is only needed because the MLLM calibrator asserts one.
      GPTQModel: its LLaVA definition (LlavaQModel) turns conversations into inputs with the processor's chat
        template, which this model has none of, so LlavaQModel.prepare_dataset is replaced by a pass-through of the
        ready inputs (one unpadded sample per batch, batch_size=1). Everything after (input capture at layer 0,
        Hessians, GPTQ, packing) is GPTQModel's.
  stories260K: `eqat convert llama2c` of tests/data/models/stories260K; calibration text = the first 90 % (bytes) of
    tests/data/text/tinyshakespeare.txt, held-out = the last 10 % (scripts/quant-table.sh's split). The peers get
    exactly the 512 windows of 256 tokens `eqat quantize --calib CALIB.txt --samples 512 --seq-len 256` draws:
    ids = <s> + sentencepiece(text), split = n*9/10, start = rng() % (split - 256 + 1), std::mt19937_64 seed 2
    (eqat's load_text_data). Fed as {input_ids, attention_mask} batches of 8 (AutoRound's LLM calibrator; it sets
    the last position's attention_mask to 0 itself) / single windows (GPTQModel's own prepare_dataset).

Dequantization (what the fake-quant checkpoint holds)
  Each peer writes its own export (WORK/native/MODEL/ROW): AutoRound save_quantized(format="auto_round",
  inplace=True) (packing_format auto_round: zero points stored as they are; the in-place modules are its
  auto_round_extension QuantLinear; 'auto_round:auto_gptq' where the default refuses: v1 zero points),
  GPTQModel save() (checkpoint_format "gptq", i.e. v1: stored zero = zero - 1, mod 2^bits). Their
  qweight/qzeros/scales/g_idx are unpacked here (GPTQ bit-stream layout, 2/3/4/8 bits) and
      W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])
  is computed in float32 (fp16 scale x small integer: exact) and stored in the source's dtype (fp16 for shapes-llava:
  one rounding, the same one the peers' fp16 kernels make; fp32 for stories260K: exact). Checks against the module
  the peer serves (AutoRound: its in-place QuantLinear; GPTQModel: GPTQModel.load(export, backend=TORCH,
  dtype=float16), i.e. its own v1 -> v2 conversion), per layer:
    dequant_identity: the module's forward on the identity matrix (fp32 input) returns its weight as it applies it;
      |that - W_fp32| must be <= 2^-11 |W| (at most one fp16 rounding of the product; a wrong integer or zero point
      is off by a whole step);
    random_input: |module(x) - x W_ckpt^T| for x ~ N(0,1), 8 rows, max abs and relative to max |y|.
  Also recorded: the in-memory module right after quantize() against the export, in quantization steps
  (in_memory_after_quantize_vs_export_max_steps). For GPTQModel 7.7.0 it is 1 (and 2^bits - 1 where a zero point is
  0): the TorchLinear modules quantize() leaves in memory already hold the v1 qzeros it saves, but their forward reads
  them as v2, so inference on the in-memory model right after quantize() is off by one zero step; save() + load()
  is what it serves (and what is scored), right but for the carry below.
  The checkpoint holds what the peer serves: for GPTQModel the loaded module's own packed tensors (v2 in memory),
  which differ from its export file where the v1 -> v2 load carries: a zero point 0 is stored as 2^bits - 1, the load
  adds 1 per field to the packed word and the carry lands in the next output channel's zero point (1 step off). Such
  rows also score the file as written (scores_as_exported, served_vs_export in the JSON).
  A decoder linear the peer left unquantized stays as the source's weight (what the peer would serve) and is listed.
  QDIR = a copy of every file of the source directory with model.safetensors rewritten (same keys, dtype, metadata).
  Controls: an unmodified copy of each source (must score KL 0), and eqat's own GPTQ W2g64 export unpacked the same
  way into an FP checkpoint (must score what eqat scores on the packed export: validates the unpacking and the
  fake-quant scoring path).

Times: "quantize s" = time.monotonic() around the peer's quantize call (AutoRound.quantize(), GPTQModel.quantize());
for eqat the Block-AP/GPTQ (+ E2E-QP) phase seconds it reports. "total s" = the whole child process (imports, load,
calibration forward, quantize, export, reload, checks, checkpoint) for a peer; the whole `eqat quantize` for eqat.
All single-threaded by default (--threads 1): on this shared 2-core CPU a 2-thread OpenMP team with one busy core
stalls (AutoRound on stories260K: 181 s vs 19 s for the same 2-iteration run).

Scores: shapes: `eqat eval --bench shapes --model QDIR --reference models/shapes-llava --batch-size 32` (the standard
1000-question split) -> accuracy, answer_kl_mean, answer_top1_agreement. stories: `eqat eval --bench kl --model QDIR
--reference S --data HELDOUT.txt --seq-len 256 --limit 64` -> kl_mean, top1_agreement, ppl.
A setting a peer cannot do is recorded with its own error message, not a number.
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
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kl_paired  # noqa: E402  (bench/kl_paired.py: two models' answer KL question by question)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LLAVA_DIR = REPO / "models/shapes-llava"
STORIES_DIR = REPO / "tests/data/models/stories260K"
SHAKESPEARE = REPO / "tests/data/text/tinyshakespeare.txt"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
IMAGE_MARKER = "<image>"

SHAPES_SAMPLES, SHAPES_VAL, SHAPES_SEED = 1024, 64, 2
STORIES_SAMPLES, STORIES_SEQ, STORIES_SEED = 512, 256, 2
SETTINGS = {"shapes-llava": [(2, 64), (3, 128), (4, 128)], "stories260K": [(2, 64), (3, 64), (2, -1)]}
PEERS = ["autoround", "gptqmodel", "gptqmodel-noGAR"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
U16 = 2.0 ** -11


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------

class MT19937_64:
    """std::mt19937_64, bit-exact (eqat's calibration sampling: seeded_shuffle and the text windows)."""
    N, M, MASK = 312, 156, (1 << 64) - 1

    def __init__(self, seed: int):
        self.mt = [seed & self.MASK] + [0] * (self.N - 1)
        for i in range(1, self.N):
            self.mt[i] = (6364136223846793005 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 62)) + i) & self.MASK
        self.i = self.N

    def __call__(self) -> int:
        if self.i >= self.N:
            mt = self.mt
            for k in range(self.N):
                x = (mt[k] & 0xFFFFFFFF80000000) | (mt[(k + 1) % self.N] & 0x7FFFFFFF)
                mt[k] = mt[(k + self.M) % self.N] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
            self.i = 0
        x = self.mt[self.i]
        self.i += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000
        x ^= (x << 37) & 0xFFF7EEE000000000
        x ^= x >> 43
        return x & self.MASK


def _mt_selftest() -> None:
    g = MT19937_64(5489)
    for _ in range(9999):
        g()
    assert g() == 9981545732273789042, "mt19937_64 self-test failed"


def sh(cmd: list, log: Path, check: bool = True) -> tuple[str, float]:
    """Runs a command; returns (stdout+stderr, wall seconds); raises with the tail on failure."""
    t = time.monotonic()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    dt = time.monotonic() - t
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n" + p.stdout + p.stderr + f"[rc {p.returncode}, {dt:.1f} s]\n")
    if check and p.returncode != 0:
        raise RuntimeError(f"{Path(str(cmd[0])).name} {cmd[1]} failed (rc {p.returncode}): "
                           f"{(p.stdout + p.stderr)[-800:]}")
    return p.stdout + p.stderr, dt


def short_err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:500]


def emit(row: dict) -> None:
    print("\n@@ROW " + json.dumps(row), flush=True)  # own line: the peers' progress bars end without a newline


def src_key(model: str, module_name: str) -> str:
    """In-memory module name (transformers 5) -> the source checkpoint's weight key."""
    if model == "shapes-llava":  # llava-hf layout on disk, model.language_model.* in memory
        assert module_name.startswith("model.language_model."), module_name
        return "language_model.model." + module_name[len("model.language_model."):] + ".weight"
    return module_name + ".weight"


def decoder_linear_names(model: str, n_layers: int) -> list[str]:
    pre = "model.language_model.layers" if model == "shapes-llava" else "model.layers"
    return [f"{pre}.{i}.{l}" for i in range(n_layers) for l in LINEARS]


# ----------------------------------------------------------------------------------------------------------------
# calibration: eqat's samples, rebuilt in Python and checked against eqat
# ----------------------------------------------------------------------------------------------------------------

def build_shapes_calib(work: Path, eqat: str, log: Path) -> dict:
    import sentencepiece as spm
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor

    world = work / ("shapes-calib" + ("" if SHAPES_SEED == 2 else f"-seed{SHAPES_SEED}")
                    + ("" if SHAPES_SAMPLES == 1024 else f"-n{SHAPES_SAMPLES}"))
    if not (world / "train.json").exists():
        sh([eqat, "data", "shapes", "--out", world, "--train", SHAPES_SAMPLES + SHAPES_VAL, "--test", 0,
            "--seed", SHAPES_SEED, "--overwrite"], log)
    recs = json.loads((world / "train.json").read_text())
    order = list(range(len(recs)))
    rng = MT19937_64(SHAPES_SEED)
    for i in range(len(order), 1, -1):  # eqat's seeded_shuffle
        j = rng() % i
        order[i - 1], order[j] = order[j], order[i - 1]
    chosen = order[:SHAPES_SAMPLES]
    sp = spm.SentencePieceProcessor(model_file=str(LLAVA_DIR / "tokenizer.model"))
    cfg = json.loads((LLAVA_DIR / "config.json").read_text())
    img_id, n_img = cfg["image_token_index"], cfg["image_seq_length"]
    bos, eos, pad = 1, 2, cfg["text_config"]["pad_token_id"]

    def prompt_ids(text: str) -> list[int]:  # eqat's tokenize_prompt
        ids = [bos]
        parts = text.split(IMAGE_MARKER)
        for k, chunk in enumerate(parts):
            if chunk:
                ids += sp.encode(chunk)
            if k + 1 < len(parts):
                ids += [img_id] * n_img
        return ids

    ip = CLIPImageProcessor.from_pretrained(LLAVA_DIR)
    seqs, pix, prompts = [], [], []
    for oi in chosen:
        r = recs[oi]
        conv = r["conversations"]
        ids: list[int] = []
        for t in range(0, len(conv) - 1, 2):
            user, answer = conv[t]["value"], conv[t + 1]["value"]
            if t == 0:
                msg = IMAGE_MARKER + "\n" + user.replace(IMAGE_MARKER, "").strip()
                p = prompt_ids(VICUNA_SYSTEM + " USER: " + msg + " ASSISTANT:")
                prompts.append((p, user.replace(IMAGE_MARKER, "").strip(), r["image"]))
            else:
                p = sp.encode("USER: " + user + " ASSISTANT:")
            ids += p + sp.encode(answer) + [eos]
        seqs.append(ids)
        pix.append(ip(Image.open(world / "images" / r["image"]).convert("RGB"), return_tensors="pt")["pixel_values"])
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    data = dict(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(pix).float(),
                lengths=torch.tensor([len(s) for s in seqs]))
    torch.save(data, work / "calib-shapes.pt")

    # checks against eqat: the prompt ids of sample 0 and its pixels
    checks = {}
    p0, q0, img0 = prompts[0]
    out, _ = sh([eqat, "ask", "--model", LLAVA_DIR, "--image", world / "images" / img0, "--max-new-tokens", 1,
                 "--print-prompt", "--threads", 1, q0], log)
    m = re.search(r"prompt ids \(\d+\): (.*)", out)
    eq_ids = []
    for tok in (m.group(1).split() if m else []):
        a, _, rep = tok.partition("x")
        eq_ids += [int(a)] * (int(rep) if rep else 1)
    checks["prompt_ids_equal_eqat_ask"] = eq_ids == p0
    sh([eqat, "preprocess", "--model", LLAVA_DIR, "--image", world / "images" / img0, "--out",
        work / "px0.safetensors", "--overwrite"], log)
    from safetensors.torch import load_file
    ref = load_file(work / "px0.safetensors")["pixel_values"].float()
    checks["pixels_max_abs_diff_vs_eqat_preprocess"] = float((ref - data["pixel_values"][:1]).abs().max())
    n_tok = int(data["lengths"].sum())
    return dict(
        source=f"eqat data shapes --train {SHAPES_SAMPLES + SHAPES_VAL} --test 0 --seed {SHAPES_SEED}; eqat's "
               f"seeded shuffle (mt19937_64 seed {SHAPES_SEED}), first {SHAPES_SAMPLES} records = eqat quantize "
               f"--samples {SHAPES_SAMPLES}'s training set",
        samples=len(seqs), tokens=n_tok, max_len=L, pad_fraction_when_padded=round(1 - n_tok / (len(seqs) * L), 4),
        template="vicuna_v1 (eqat tokenize_conversation): <s>{system} USER: <image>\\n{q} ASSISTANT: {a}</s>, "
                 f"<image> -> {n_img} x id {img_id}",
        pixels="CLIPImageProcessor(preprocessor_config.json)", checks=checks)


def build_stories_calib(work: Path, eqat: str, log: Path) -> dict:
    import sentencepiece as spm
    import torch

    S = work / "stories260K"
    if not (S / "model.safetensors").exists():
        sh([eqat, "convert", "llama2c", "--checkpoint", STORIES_DIR / "stories260K.bin", "--tokenizer",
            STORIES_DIR / "tok512.bin", "--out", S, "--overwrite"], log)
    raw = SHAKESPEARE.read_bytes()
    n = len(raw)
    (work / "shakespeare-calib.txt").write_bytes(raw[: n * 9 // 10])  # quant-table.sh: head -c n*9/10
    (work / "shakespeare-eval.txt").write_bytes(raw[n * 9 // 10:])
    sp = spm.SentencePieceProcessor(model_file=str(S / "tokenizer.model"))
    text = (work / "shakespeare-calib.txt").read_text()
    ids = [1] + sp.encode(text)
    nt = len(ids)
    split = nt * 9 // 10
    rng = MT19937_64(STORIES_SEED)
    span = max(1, split - STORIES_SEQ + 1)
    starts = [rng() % span for _ in range(STORIES_SAMPLES)]
    win = torch.tensor([ids[s:s + STORIES_SEQ] for s in starts], dtype=torch.long)
    torch.save(dict(input_ids=win), work / "calib-stories.pt")
    # check the tokenizer against eqat on the text's first 400 characters
    out, _ = sh([eqat, "generate", "--model", S, "--max-new-tokens", 1, "--print-prompt", "--threads", 1,
                 text[:400]], log)
    m = re.search(r"prompt ids \(\d+\): (.*)", out)
    eq_ids = [int(t) for t in m.group(1).split()] if m else []
    return dict(source=f"first 90 % of tinyshakespeare.txt ({n * 9 // 10} bytes), {nt} tokens; "
                       f"{STORIES_SAMPLES} windows x {STORIES_SEQ} from the first 90 % of those tokens, starts "
                       f"mt19937_64(seed {STORIES_SEED}) % span = eqat quantize --calib --samples {STORIES_SAMPLES} "
                       f"--seq-len {STORIES_SEQ}'s training windows",
                samples=STORIES_SAMPLES, seq_len=STORIES_SEQ, tokens=STORIES_SAMPLES * STORIES_SEQ,
                first_starts=starts[:4],
                checks=dict(tokenizer_equal_eqat_generate_first_400_chars=eq_ids == [1] + sp.encode(text[:400])),
                heldout=f"last 10 % of tinyshakespeare.txt ({n - n * 9 // 10} bytes)")


# ----------------------------------------------------------------------------------------------------------------
# worker: one peer quantizes one model at one setting, writes the fake-quant FP checkpoint
# ----------------------------------------------------------------------------------------------------------------

def unpack_stream(packed, bits: int, n: int, dim: int):
    """GPTQ packing: values of `bits` bits as one little-endian bit stream through consecutive int32 words along
    `dim` (qweight: dim 0, rows = in_features; qzeros: dim 1, columns = out_features). Returns int64 values with
    the packed dim first trimmed to n."""
    import torch
    a = packed.to(torch.int64) & 0xFFFFFFFF
    b = (a.unsqueeze(-1) >> torch.arange(32)) & 1  # [R, C, 32]
    if dim == 0:
        b = b.permute(1, 0, 2)  # [C, R, 32]
    s = b.reshape(b.shape[0], -1)
    k = s.shape[1] // bits
    v = (s[:, :k * bits].reshape(s.shape[0], k, bits) << torch.arange(bits)).sum(-1)[:, :n]
    return v.T.contiguous() if dim == 0 else v  # qweight -> [in, out]; qzeros -> [groups, out]


def dequant_module(mod, bits: int, group_size: int, in_f: int, out_f: int, zero_offset: int = 0):
    """fp32 W [out, in] = scales[g_idx] * (q - z[g_idx]) from packed qweight/qzeros/scales(/g_idx) attributes,
    z = (stored zero + zero_offset) mod 2^bits (GPTQ v1 files store zero - 1: offset 1; v2 / auto_round: 0)."""
    import torch
    scales = mod.scales.detach().float()  # [groups, out]
    q = unpack_stream(mod.qweight.detach(), bits, in_f, 0)  # [in, out]
    z = (unpack_stream(mod.qzeros.detach(), bits, out_f, 1)[: scales.shape[0]] + zero_offset) % (1 << bits)
    g_idx = getattr(mod, "g_idx", None)
    seq = torch.arange(in_f) // (in_f if group_size == -1 else group_size)
    g = g_idx.long() if g_idx is not None and torch.is_tensor(g_idx) and g_idx.numel() == in_f else seq
    w = scales[g] * (q.float() - z[g].float())  # [in, out]
    return w.T.contiguous(), dict(groups=int(scales.shape[0]), g_idx_sequential=bool(torch.equal(g, seq)))


class Packed:
    """qweight/qzeros/scales(/g_idx) of one layer read from a checkpoint file."""

    def __init__(self, q: dict, stem: str):
        self.qweight, self.qzeros, self.scales = q[stem + ".qweight"], q[stem + ".qzeros"], q[stem + ".scales"]
        if stem + ".g_idx" in q:
            self.g_idx = q[stem + ".g_idx"]


def read_dir_tensors(d: Path) -> dict:
    from safetensors import safe_open
    out = {}
    for p in sorted(Path(d).glob("*.safetensors")):
        with safe_open(p, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def packed_stem(q: dict, key: str) -> str | None:
    """The packed layer's name in an export for the source weight key (either LLaVA layout)."""
    stem = key[: -len(".weight")]
    for c in (stem, stem.replace("language_model.model.", "model.language_model."),
              stem.replace("model.language_model.", "language_model.model.")):
        if c + ".qweight" in q:
            return c
    return None


def worker(spec: dict) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    work, model_name, peer = Path(spec["work"]), spec["model"], spec["peer"]
    bits, gs = spec["bits"], spec["group"]
    llava = model_name == "shapes-llava"
    src = LLAVA_DIR if llava else work / "stories260K"
    cfg = json.loads((src / "config.json").read_text())
    n_layers = (cfg["text_config"] if llava else cfg)["num_hidden_layers"]
    names = decoder_linear_names(model_name, n_layers)
    calib = torch.load(work / ("calib-shapes.pt" if llava else "calib-stories.pt"))
    qdir = Path(spec["qdir"])
    base = dict(model=model_name, bits=bits, group_size=gs, method=peer)
    from importlib.metadata import version
    t_all = time.monotonic()

    def load_hf():
        from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
        cls = LlavaForConditionalGeneration if llava else AutoModelForCausalLM
        return cls.from_pretrained(src, dtype=torch.float32)

    proj_calls = [0]

    def count_projector(model):
        if llava:
            mm = model.model.multi_modal_projector
            mm.register_forward_hook(lambda *a: proj_calls.__setitem__(0, proj_calls[0] + 1))

    settings = {}
    export_refusal = None
    try:
        if peer == "autoround":
            from auto_round import AutoRound
            from transformers import AutoTokenizer
            model = load_hf()
            count_projector(model)
            tok = AutoTokenizer.from_pretrained(src)
            bs = 8
            ids = calib["input_ids"]
            batches = []
            for i in range(0, ids.shape[0], bs):
                b = dict(input_ids=ids[i:i + bs].clone(),
                         attention_mask=(calib["attention_mask"][i:i + bs].clone() if llava
                                         else torch.ones_like(ids[i:i + bs])))
                if llava:
                    b["pixel_values"] = calib["pixel_values"][i:i + bs].clone()
                batches.append(b)
            kw = dict(tokenizer=tok, bits=bits, group_size=gs, sym=False, iters=200, nsamples=ids.shape[0],
                      seqlen=ids.shape[1], batch_size=bs, dataset=batches, device_map="cpu",
                      enable_torch_compile=False)
            settings = {k: v for k, v in kw.items() if k not in ("tokenizer", "dataset")}
            if llava:
                from transformers import AutoProcessor
                kw["processor"] = AutoProcessor.from_pretrained(src)
            ar = AutoRound(model, **kw)
            settings.update(compressor=type(ar).__name__, lr="auto (None -> 1/iters)",
                            amp=getattr(getattr(ar, "model_context", None), "amp", None),
                            amp_dtype=str(getattr(getattr(ar, "model_context", None), "amp_dtype", None)))
            t = time.monotonic()
            ar.quantize()
            quantize_s = time.monotonic() - t
            native = work / "native" / model_name / qdir.name

            def ar_save(fmt: str, inplace: bool) -> None:
                shutil.rmtree(native, ignore_errors=True)
                # save_quantized() keeps the first call's resolved format (its compression plan); pin this one
                ar.formats = ar._resolve_format_string(fmt)
                ar.compress_context.formats = ar.formats
                ar.save_quantized(str(native), format=fmt, inplace=inplace)

            t = time.monotonic()
            fmt_used = "auto_round"
            try:  # the default export on a copy first (inplace=False): a refusal must not leave half-packed layers
                ar_save("auto_round", inplace=False)
            except Exception as e:  # noqa: BLE001
                export_refusal = short_err(e)
                fmt_used = "auto_round:auto_gptq"
            ar_save(fmt_used, inplace=True)
            export_s = time.monotonic() - t
            qmodel = ar.model
            settings["export"] = f"save_quantized(format={fmt_used!r}, inplace=True) -> {native}"
            native_cfg = json.loads((native / "config.json").read_text()).get("quantization_config", {})
            zero_offset = 0 if native_cfg.get("packing_format", "auto_round") == "auto_round" else 1  # gptq: v1
            zero_note = (f"auto_round export (packing_format {native_cfg.get('packing_format')!r}): zeros stored as "
                         f"is" if zero_offset == 0 else "v1: stored zero - 1")
            served = qmodel  # AutoRound's own QuantLinear modules, the ones save_quantized packed and wrote
        else:
            from gptqmodel import GPTQModel, QuantizeConfig
            qc_kw = dict(bits=bits, group_size=gs, sym=False, desc_act=False, damp_percent=0.01, device="cpu",
                         offload_to_disk=False)
            if peer == "gptqmodel-noGAR":
                qc_kw["act_group_aware"] = False
            qc = QuantizeConfig(**qc_kw)
            settings = dict(qc_kw, act_group_aware=qc.act_group_aware, damp_auto_increment=qc.damp_auto_increment,
                            true_sequential=qc.true_sequential, mse=qc.mse, static_groups=qc.static_groups,
                            batch_size=1, dtype="float32")
            if llava:
                from gptqmodel.models.definitions.llava import LlavaQModel
                LlavaQModel.prepare_dataset = lambda self, calibration_dataset, batch_size=1, **k: calibration_dataset
                data = []
                for i in range(calib["input_ids"].shape[0]):
                    n = int(calib["lengths"][i])
                    data.append(dict(input_ids=calib["input_ids"][i:i + 1, :n].clone(),
                                     attention_mask=torch.ones(1, n, dtype=torch.long),
                                     pixel_values=calib["pixel_values"][i:i + 1].clone()))
            else:
                data = [dict(input_ids=calib["input_ids"][i].tolist(), attention_mask=[1] * calib["input_ids"].shape[1])
                        for i in range(calib["input_ids"].shape[0])]
            g = GPTQModel.load(str(src), qc, dtype=torch.float32)
            count_projector(g.model)
            t = time.monotonic()
            g.quantize(data, batch_size=1)
            quantize_s = time.monotonic() - t
            qmodel = g.model
            native = work / "native" / model_name / qdir.name
            shutil.rmtree(native, ignore_errors=True)
            t = time.monotonic()
            g.save(str(native))
            export_s = time.monotonic() - t
            native_cfg = json.loads((native / "config.json").read_text()).get("quantization_config", {})
            fmt_ = native_cfg.get("checkpoint_format", native_cfg.get("format"))
            zero_offset = 1 if fmt_ == "gptq" else 0
            zero_note = f"GPTQModel save(): checkpoint_format {fmt_!r} -> zero = stored + {zero_offset}"
            settings["export"] = f"save() -> {native}, reloaded with GPTQModel.load(backend=TORCH) for the checks"
            from gptqmodel import BACKEND
            served = GPTQModel.load(str(native), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    except BaseException as e:  # noqa: BLE001  (SystemExit too: AutoRound calls exit(-1) on some refusals)
        emit(dict(base, status="refused", message=short_err(e), settings=settings,
                  traceback=traceback.format_exc()[-2000:], total_s=round(time.monotonic() - t_all, 1)))
        return

    # ---- dequantize from the peer's export, verify against the peer's own forward (the module it serves)
    mods = dict(served.named_modules())
    mem_mods = dict(qmodel.named_modules())
    q = read_dir_tensors(native)
    with safe_open(src / "model.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layer_rows, fp_layers = [], []
    worst = dict(id_ulps=0.0, rand_rel=0.0, rand_abs=0.0, mem_steps=0.0, served_steps=0.0)
    as_quantized = dict(tensors)  # the export file decoded as written (differs from `tensors` only if the load did)
    served_changes = []
    for name in names:
        key = src_key(model_name, name)
        assert key in tensors, f"{key} not in {src}"
        w_src = tensors[key]
        out_f, in_f = w_src.shape
        stem = packed_stem(q, key)
        mod = mods.get(name)
        if stem is None:
            fp_layers.append(dict(layer=name, kind=type(mem_mods.get(name)).__name__, in_features=in_f,
                                  out_features=out_f))
            continue
        w_file, info = dequant_module(Packed(q, stem), bits, gs, in_f, out_f, zero_offset)
        if peer.startswith("gptqmodel"):  # served = GPTQModel.load()'s module: its packed tensors, v2 in memory
            w32, _ = dequant_module(mod, bits, gs, in_f, out_f, 0)
        else:  # served = AutoRound's in-place QuantLinear, the tensors it wrote
            w32 = w_file
        sc = Packed(q, stem).scales.float()[info_g(in_f, gs, q, stem)].T  # [out, in] step sizes
        served_steps = float(((w32 - w_file).abs() / sc.clamp_min(1e-30)).max())
        if served_steps > 0:
            ch = ((w32 - w_file).abs() > 0).any(dim=1).nonzero().flatten().tolist()
            served_changes.append(dict(layer=name, output_channels=ch[:8], n_channels=len(ch),
                                       max_steps=round(served_steps, 3)))
        w_ck = w32.to(w_src.dtype)
        as_quantized[key] = w_file.to(w_src.dtype).contiguous()
        with torch.no_grad():
            # the peer's weight as its forward applies it: forward on the identity matrix (fp32 input: the kernels
            # dequantize in the scales' dtype, fp16, then cast, so at most one fp16 rounding of scale*(q-z))
            w_peer = mod(torch.eye(in_f, dtype=torch.float32)).float().T
            d = (w_peer - w32).abs()
            ulps = float((d / (U16 * w32.abs()).clamp_min(1e-30)).masked_fill(d == 0, 0).max())
            x = torch.randn(8, in_f)
            y_peer = mod(x).float()
            rabs = float((y_peer - x @ w_ck.float().T).abs().max())
            rrel = rabs / max(float(y_peer.abs().max()), 1e-30)
            # the in-memory module right after quantize (GPTQModel: before save/load)
            mm = mem_mods.get(name)
            steps = 0.0
            if mm is not None and hasattr(mm, "qweight") and mm is not mod:
                w_mem = mm(torch.eye(in_f, dtype=torch.float32)).float().T
                steps = float(((w_mem - w_file).abs() / sc.clamp_min(1e-30)).max())
        for k_, v_ in (("id_ulps", ulps), ("rand_rel", rrel), ("rand_abs", rabs), ("mem_steps", steps),
                       ("served_steps", served_steps)):
            worst[k_] = max(worst[k_], v_)
        tensors[key] = w_ck.contiguous()
        layer_rows.append(dict(layer=name, in_features=in_f, out_features=out_f, kind=type(mod).__name__,
                               identity_diff_in_fp16_ulps=round(ulps, 4), random_input_max_abs=rabs,
                               in_memory_vs_export_steps=round(steps, 4), **info))
    qdir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(qdir, ignore_errors=True)
    shutil.copytree(src, qdir)
    save_file(tensors, str(qdir / "model.safetensors"), metadata=meta)
    qdir_as_quantized = None
    if served_changes:  # also the quantizer's own result, as its export file says, for a second score
        qdir_as_quantized = Path(str(qdir) + "-as-exported")
        shutil.rmtree(qdir_as_quantized, ignore_errors=True)
        shutil.copytree(src, qdir_as_quantized)
        save_file(as_quantized, str(qdir_as_quantized / "model.safetensors"), metadata=meta)
    ok = worst["id_ulps"] <= 1.0 + 1e-6 and bool(layer_rows)
    msg = None
    if fp_layers:
        msg = (f"{len(fp_layers)} of {len(names)} decoder linears left in FP by the peer: "
               + ", ".join(sorted({".".join(r["layer"].split(".")[-2:]) for r in fp_layers})))
        if peer == "autoround":
            msg += (" (auto-round keeps every int Linear whose in or out features is not a multiple of 32 in 16 bit: "
                    "compressors/layer_config_resolver.py; its log: 'Unquantized layers: [...]')")
    if export_refusal:
        msg = ((msg + "; ") if msg else "") + (
            f"AutoRound's default export format 'auto_round' refused ({export_refusal}; at 4-bit asym it packs "
            f"AWQ-style through gptqmodel's WQLinear_GEMM); exported as 'auto_round:auto_gptq' instead, the weights "
            f"are the same quantization")
    if served_changes:
        n_ch = sum(c["n_channels"] for c in served_changes)
        msg = ((msg + "; ") if msg else "") + (
            f"GPTQModel.load() of its own v1 export changes {n_ch} output channel(s) in {len(served_changes)} "
            f"layer(s) by {worst['served_steps']:.0f} step: v1 stores zero-1, a zero point 0 is stored as "
            f"2^bits-1 and the v1->v2 load adds 1 to the packed word, carrying into the next channel's zero point; "
            f"scored as served, the file as written scored as scores_as_exported")
    emit(dict(base, status="ok" if not fp_layers else "partial", settings=settings, export_refusal=export_refusal,
              qdir_as_exported=str(qdir_as_quantized) if qdir_as_quantized else None,
              served_vs_export=dict(max_steps=round(worst["served_steps"], 3), changes=served_changes),
              versions={p: version(p) for p in ("auto-round", "gptqmodel", "transformers", "torch")},
              quantize_s=round(quantize_s, 2), export_s=round(export_s, 2),
              quantized_layers=len(layer_rows), fp_layers=fp_layers, message=msg,
              dequant_check=dict(pass_=ok, zero_point_convention=zero_note, served_by=type(served).__name__,
                                 identity_max_diff_in_fp16_ulps_of_W=round(worst["id_ulps"], 4),
                                 random_input_max_abs=worst["rand_abs"], random_input_max_rel=worst["rand_rel"],
                                 in_memory_after_quantize_vs_export_max_steps=round(worst["mem_steps"], 4),
                                 layer_kinds=sorted({r["kind"] for r in layer_rows}),
                                 in_features_groups=sorted({(r["in_features"], r["groups"]) for r in layer_rows}),
                                 g_idx_sequential=all(r["g_idx_sequential"] for r in layer_rows)),
              calibration_projector_calls=proj_calls[0] if llava else None,
              total_worker_s=round(time.monotonic() - t_all, 1)))


def info_g(in_f: int, gs: int, q: dict, stem: str):
    import torch
    g = q.get(stem + ".g_idx")
    return g.long() if g is not None and g.numel() == in_f else torch.arange(in_f) // (in_f if gs == -1 else gs)


def run_worker(spec: dict, log: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_COMPILE_DISABLE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    t = time.monotonic()
    # cwd = the work dir: GPTQModel writes a logs/ folder into its working directory, which must not be the repo.
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env, cwd=spec["work"])
    wall = time.monotonic() - t
    with open(log, "a") as f:
        f.write(f"### worker {spec['peer']} {spec['model']} W{spec['bits']}g{spec['group']}\n{p.stdout}\n{p.stderr}\n"
                f"[rc {p.returncode}, {wall:.1f} s]\n")
    rows = [json.loads(l[l.index("@@ROW ") + 6:]) for l in p.stdout.splitlines() if "@@ROW " in l]
    if rows:
        row = rows[-1]
    else:  # the peer ended the process itself (GPTQModel: any exception in a worker thread -> os._exit(1))
        errs = []
        for l in (p.stdout + "\n" + p.stderr).splitlines():
            m = re.match(r"^(\w+(?:Error|Exception)): (.*)", l.strip())
            if m and m.group(0) not in errs:
                errs.append(m.group(0))
        row = dict(status="refused", message=(" / then: ".join(errs[-3:]) if errs else "no output")[:600]
                   + f" (process exited rc {p.returncode} without a result)")
    row["total_s"] = round(wall, 1)
    return row


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------

def read_scores(path: Path, model: str) -> dict:
    s = json.loads(path.read_text())
    if model == "shapes-llava":
        return dict(accuracy=s.get("accuracy"), answer_kl_mean=s.get("answer_kl_mean"),
                    answer_top1_agreement=s.get("answer_top1_agreement"),
                    answer_kl_median=s.get("answer_kl_median"), answer_kl_sem=s.get("answer_kl_sem"))
    return dict(kl_mean=s.get("kl_mean"), top1_agreement=s.get("top1_agreement"), ppl=s.get("ppl"))


def add_paired_kl(rows: list, work: Path) -> None:
    """Each shapes row of a setting against eqat's EfficientQAT row of the same setting, question by question
    (bench/kl_paired.py): the mean answer KL rests on a few questions, so two means alone can mislead. Stored as
    row["paired_vs_eqat_efficientqat"], A = this row, B = eqat's."""
    def eval_dir(r):  # as evaluate() names it: the quantize directory (see main) + "-eval"
        m = r["method"]
        name = f"W{r['bits']}g{r['group_size']}-" + (f"eqat-{m[5:]}" if m.startswith("eqat ") else m)
        return work / "runs" / "shapes-llava" / (name + "-eval")
    eq = {(r["bits"], r["group_size"]): r for r in rows if r["method"] == "eqat efficientqat" and r.get("scores")}
    for r in rows:
        ref = eq.get((r.get("bits"), r.get("group_size")))
        if ref is None or r is ref or not r.get("scores") or r["method"].startswith("control"):
            continue
        a, b = eval_dir(r) / "answer_kl.jsonl", eval_dir(ref) / "answer_kl.jsonl"
        if a.exists() and b.exists():
            try:
                r["paired_vs_eqat_efficientqat"] = kl_paired.paired(kl_paired.load(a.parent),
                                                                    kl_paired.load(b.parent))
            except SystemExit:  # kl_paired reports bad files on stderr and exits; a long run keeps its other rows
                r["paired_vs_eqat_efficientqat"] = {"error": f"{a} or {b} unreadable (see stderr)"}


def evaluate(model: str, qdir: Path, work: Path, eqat: str, threads: int, log: Path) -> dict:
    """eqat scores a checkpoint; packed ones (eqat's rows) with fp32 activations (--exact-activations), as the
    peers' fake-quantized FP checkpoints always run, so every row measures the weights alone."""
    out = Path(str(qdir) + ("-eval" if model == "shapes-llava" else "-kl"))
    if model == "shapes-llava":
        cmd = [eqat, "eval", "--bench", "shapes", "--model", qdir, "--reference", LLAVA_DIR, "--out", out,
               "--overwrite", "--batch-size", 32, "--no-progress", "--threads", threads, "--exact-activations"]
    else:
        cmd = [eqat, "eval", "--bench", "kl", "--model", qdir, "--reference", work / "stories260K", "--data",
               work / "shakespeare-eval.txt", "--seq-len", 256, "--limit", 64, "--out", out, "--overwrite",
               "--no-progress", "--threads", threads, "--exact-activations"]
    _, dt = sh(cmd, log)
    return dict(read_scores(out / "scores.json", model), eval_s=round(dt, 1))


def eqat_quantize(model: str, method: str, bits: int, gs: int, qdir: Path, work: Path, eqat: str, threads: int,
                  log: Path) -> dict:
    cmd = [eqat, "quantize", "--out", qdir, "--overwrite", "--bits", bits, "--group-size", gs, "--method", method,
           "--threads", threads, "--no-progress"]
    if model == "shapes-llava":
        cmd += ["--model", LLAVA_DIR, "--samples", SHAPES_SAMPLES, "--seed", SHAPES_SEED]
    else:
        cmd += ["--model", work / "stories260K", "--calib", work / "shakespeare-calib.txt", "--samples",
                STORIES_SAMPLES, "--seq-len", STORIES_SEQ, "--epochs", 2]
    out, dt = sh(cmd, log)
    summary = {}
    m = re.search(r"wrote \S+: (\{.*\})", out)
    if m:
        try:
            summary = json.loads(m.group(1))
        except json.JSONDecodeError:
            pass
    phases = [summary.get(k, {}).get("seconds") for k in ("block_phase", "e2e_phase")]
    q_s = sum(x for x in phases if x) if any(phases) else dt
    # The export's own summary (phases, E2E-QP's validation losses, whether its check stopped it), for the record;
    # the seconds above stay what they were.
    written = {}
    try:
        written = json.loads((Path(qdir) / "eqat_quantize_summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        pass
    return dict(quantize_s=round(q_s, 1), total_s=round(dt, 1), eqat_summary=summary, eqat_export_summary=written,
                command=" ".join(str(c) for c in cmd).replace(str(work), "$WORK").replace(str(REPO) + "/", ""))


def eqat_export_to_fp(model: str, qdir: Path, fpdir: Path, work: Path) -> dict:
    """Control: eqat's own GPTQ-v2 export unpacked with the same code into an FP checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    src = LLAVA_DIR if model == "shapes-llava" else work / "stories260K"
    qcfg = json.loads((qdir / "config.json").read_text())["quantization_config"]
    assert qcfg.get("checkpoint_format") == "gptq_v2", qcfg
    with safe_open(src / "model.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    q = read_dir_tensors(qdir)
    n = 0
    for key, w in list(tensors.items()):
        stem = packed_stem(q, key) if key.endswith(".weight") else None
        if stem is None:
            continue
        w32, _ = dequant_module(Packed(q, stem), qcfg["bits"], qcfg["group_size"], w.shape[1], w.shape[0], 0)
        tensors[key] = w32.to(w.dtype).contiguous()
        n += 1
    shutil.rmtree(fpdir, ignore_errors=True)
    shutil.copytree(src, fpdir)
    save_file(tensors, str(fpdir / "model.safetensors"), metadata=meta)
    return dict(layers=n)


def fmt_kl(v) -> str:
    return "-" if v is None else ("0" if v == 0 else (f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"))


def fmt(v, p=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{p}f}"
    return str(v)


def note_for(r: dict, model: str) -> str:
    """Short table note; the JSON has the full messages."""
    parts = []
    if r.get("status") == "refused":
        return "refused: " + (r.get("message") or "")
    if r.get("status") not in ("ok", "partial", None):
        return f"{r['status']}: {r.get('message') or ''}"
    if r.get("fp_layers"):
        n = len(r["fp_layers"])
        parts.append(f"{n} of {n + r.get('quantized_layers', 0)} decoder linears left in FP by the peer "
                     f"({', '.join(sorted({'.'.join(x['layer'].split('.')[-2:]) for x in r['fp_layers']}))}: "
                     "in or out features not a multiple of 32)")
    if r.get("export_refusal"):
        parts.append(f"default export 'auto_round' refused ({r['export_refusal']}); exported as auto_round:auto_gptq")
    sv = (r.get("served_vs_export") or {}).get("changes")
    if sv:
        s2 = r.get("scores_as_exported") or {}
        n = sum(c["n_channels"] for c in sv)
        got = (f"acc {fmt(s2.get('accuracy'), 3)}, answer KL {fmt_kl(s2.get('answer_kl_mean'))}"
               if model == "shapes-llava" else f"KL {fmt_kl(s2.get('kl_mean'))}")
        parts.append(f"scored as GPTQModel.load() serves its export: {n} output channel(s) 1 step off the file "
                     f"(v1 zero-point carry); the file as written: {got}")
    if r.get("dequant_check") and not r["dequant_check"].get("pass_"):
        parts.append("DEQUANT CHECK FAILED")
    if r.get("method", "").startswith("control"):
        parts.append("eqat's packed GPTQ export unpacked by this script: must equal the eqat gptq row")
    return "; ".join(parts)


def table(rows: list[dict], model: str) -> str:
    if model == "shapes-llava":
        head = ("| setting | method | accuracy | Δ vs FP (pt) | answer KL vs FP | answer top-1 agreement % | "
                "quantize s | total s | note |")
    else:
        head = "| setting | method | KL vs FP | top-1 agreement % | ppl | quantize s | total s | note |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    fp_acc = next((r["scores"].get("accuracy") for r in rows if r["method"] == "fp (unmodified copy)"
                   and r.get("scores")), None)
    for r in rows:
        s = r.get("scores") or {}
        setting = "fp" if r["bits"] is None else f"W{r['bits']}" + ("g" + str(r["group_size"]) if r["group_size"] != -1
                                                                  else " per-channel")
        note = note_for(r, model).replace("|", "/")
        q = fmt(r.get("quantize_s"), 1)
        tot = fmt(r.get("total_s"), 1)
        if model == "shapes-llava":
            acc = s.get("accuracy")
            d = "-" if acc is None or fp_acc is None else f"{100 * (acc - fp_acc):+.1f}"
            ag = s.get("answer_top1_agreement")
            out.append(f"| {setting} | {r['method']} | {fmt(acc, 3)} | {d} | {fmt_kl(s.get('answer_kl_mean'))} | "
                       f"{fmt(ag, 2)} | {q} | {tot} | {note} |")
        else:
            out.append(f"| {setting} | {r['method']} | {fmt_kl(s.get('kl_mean'))} | "
                       f"{fmt(s.get('top1_agreement'), 2)} | "
                       f"{fmt(s.get('ppl'), 2)} | {q} | {tot} | {note} |")
    return "\n".join(out)


def cpu_facts() -> dict:
    """The CPU's name and the instruction sets by which MKL and oneDNN pick their kernels (AMX and AVX-512 BF16 for
    the peers' bf16 tuning). The same eqat build and command gave other validation losses in two sessions on VMs of
    the same kind, so each result file records the CPU it ran on."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return {}
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "")
    flags = next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), [])
    return dict(model_name=name, flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "avx_vnni", "avx512_vnni",
                                                    "amx_bf16", "amx_int8") if f in flags])


def main() -> int:
    global SHAPES_SEED, SHAPES_SAMPLES
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eqat", default=os.environ.get("EQAT", str(REPO / "build/bin/eqat")))
    ap.add_argument("--work", default="/tmp/eqat-peers", help="work directory (outside the repository)")
    ap.add_argument("--out", default=str(REPO / f"bench/results/peers_cpu_{_dt.date.today().isoformat()}.json"))
    ap.add_argument("--only", help="regex on 'model/WbG/method' row names (e.g. 'stories', 'W2g64/gptqmodel')")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help="comma list of " + ",".join(PEERS) + " (gptqmodel-noGAR, a control, runs only at W2g64 "
                         "and per-channel unless --all-controls)")
    ap.add_argument("--eqat-methods", default="gptq,efficientqat",
                    help="eqat's own reference rows: comma list of rtn,gptq,efficientqat (empty: none)")
    ap.add_argument("--all-controls", action="store_true",
                    help="run the control peers (gptqmodel-noGAR) at every setting, not only W2g64 and per-channel")
    ap.add_argument("--merge", help="an earlier result JSON: its rows are kept except those this run redoes (same "
                                    "model, setting, method); the output lists both runs")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for eqat and torch (1: on the shared 2-core CPU an OpenMP team of 2 stalls on a "
                         "busy core)")
    ap.add_argument("--seed", type=int, default=SHAPES_SEED,
                    help="the default VLM's calibration draw (eqat quantize --seed; the peers get the same samples)")
    ap.add_argument("--samples", type=int, default=SHAPES_SAMPLES,
                    help="the default VLM's calibration samples (eqat quantize --samples; the peers get the same ones; "
                         "eqat quantize's own default is 4096)")
    ap.add_argument("--print", dest="print_json", metavar="FILE", help="only print the tables of a result JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    SHAPES_SEED = a.seed
    if not 1 <= a.samples <= 1 << 20:
        ap.error(f"--samples must be in [1, {1 << 20}], got {a.samples}")
    SHAPES_SAMPLES = a.samples
    if a.print_json:
        for model, rows in json.loads(Path(a.print_json).read_text())["results"].items():
            print(f"\n### {model}\n")
            print(table(rows, model))
        return 0
    if a.worker:
        try:
            worker(json.loads(a.worker))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            return 1
        return 0

    _mt_selftest()
    work = Path(a.work).resolve()  # absolute: the workers run inside it
    work.mkdir(parents=True, exist_ok=True)
    log = work / "quantize_peers.log"
    log.write_text("")
    print(f"work dir: {work} (log: {log})", file=sys.stderr)
    eqat = a.eqat
    t0 = time.monotonic()
    load0 = os.getloadavg()
    peers = [p for p in a.peers.split(",") if p]
    control_peers = {"gptqmodel-noGAR"}
    methods = [m for m in a.eqat_methods.split(",") if m]
    want = lambda name: not a.only or re.search(a.only, name)  # noqa: E731

    calib, results = {}, {}
    for model in SETTINGS:
        if not any(want(f"{model}/{x}") for x in ["fp"] + [f"W{b}g{g}/{m}" for b, g in SETTINGS[model]
                                                            for m in peers + methods + ["control"]]):
            continue
        print(f"calibration: {model}", file=sys.stderr)
        calib[model] = (build_shapes_calib if model == "shapes-llava" else build_stories_calib)(work, eqat, log)
        rows = []
        src = LLAVA_DIR if model == "shapes-llava" else work / "stories260K"
        if want(f"{model}/fp"):
            fp = work / "runs" / model / "fp-copy"
            shutil.rmtree(fp, ignore_errors=True)
            shutil.copytree(src, fp)
            rows.append(dict(model=model, bits=None, group_size=None, method="fp (unmodified copy)", status="ok",
                             scores=evaluate(model, fp, work, eqat, a.threads, log)))
            print(f"  fp copy: {rows[-1]['scores']}", file=sys.stderr)
        for bits, gs in SETTINGS[model]:
            tag = f"W{bits}g{gs}"
            for peer in peers:
                if peer in control_peers and (bits, gs) != (2, 64) and gs != -1 and not a.all_controls:
                    continue
                if not want(f"{model}/{tag}/{peer}"):
                    continue
                qdir = work / "runs" / model / f"{tag}-{peer}"
                print(f"  {tag} {peer} ...", file=sys.stderr, flush=True)
                spec = dict(model=model, peer=peer, bits=bits, group=gs, work=str(work), qdir=str(qdir),
                            threads=a.threads)
                row = dict(model=model, bits=bits, group_size=gs, method=peer)
                row.update(run_worker(spec, log))
                if row.get("status") in ("ok", "partial"):
                    row["scores"] = evaluate(model, qdir, work, eqat, a.threads, log)
                    if row.get("qdir_as_exported"):
                        row["scores_as_exported"] = evaluate(model, Path(row["qdir_as_exported"]), work, eqat,
                                                             a.threads, log)
                print(f"    {row.get('status')}: q {row.get('quantize_s')} s, total {row.get('total_s')} s, "
                      f"{row.get('scores')} {row.get('message') or ''}", file=sys.stderr, flush=True)
                rows.append(row)
            for method in methods:
                if not want(f"{model}/{tag}/{method}"):
                    continue
                qdir = work / "runs" / model / f"{tag}-eqat-{method}"
                print(f"  {tag} eqat {method} ...", file=sys.stderr, flush=True)
                row = dict(model=model, bits=bits, group_size=gs, method=f"eqat {method}")
                try:
                    row.update(eqat_quantize(model, method, bits, gs, qdir, work, eqat, a.threads, log))
                    row["status"] = "ok"
                    row["scores"] = evaluate(model, qdir, work, eqat, a.threads, log)
                except Exception as e:  # noqa: BLE001
                    row.update(status="error", message=short_err(e))
                print(f"    {row.get('status')}: q {row.get('quantize_s')} s, {row.get('scores')}", file=sys.stderr,
                      flush=True)
                rows.append(row)
                if method == "gptq" and (bits, gs) == (2, 64) and row["status"] == "ok" and want(
                        f"{model}/{tag}/control"):
                    fpdir = work / "runs" / model / f"{tag}-eqat-gptq-as-fp"
                    ctl = dict(model=model, bits=bits, group_size=gs, method="control: eqat gptq export -> FP ckpt",
                               status="ok", **eqat_export_to_fp(model, qdir, fpdir, work))
                    ctl["scores"] = evaluate(model, fpdir, work, eqat, a.threads, log)
                    rows.append(ctl)
                    print(f"    control: {ctl['scores']}", file=sys.stderr, flush=True)
        if model == "shapes-llava":
            add_paired_kl(rows, work)
        results[model] = rows

    from importlib.metadata import version
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    this_run = dict(date_utc=now, command="bench/peers/quantize_peers.sh " + " ".join(sys.argv[1:]),
                    seconds=round(time.monotonic() - t0, 1), load_average_start=load0,
                    load_average_end=os.getloadavg(), rows=sum(len(r) for r in results.values()))
    for rows in results.values():
        for r in rows:
            r["run_utc"] = now
    runs = [this_run]
    if a.merge:
        old = json.loads(Path(a.merge).read_text())
        runs = old.get("runs") or [dict(date_utc=old.get("date_utc"), command=old.get("command"),
                                        seconds=old.get("seconds"), load_average_start=old.get("load_average_start"),
                                        load_average_end=old.get("load_average_end"))]
        runs.append(this_run)
        order = ["fp (unmodified copy)"] + PEERS + [f"eqat {m}" for m in ("rtn", "gptq", "efficientqat")]
        for model, old_rows in old.get("results", {}).items():
            new_rows = results.get(model, [])
            done = {(r["bits"], r["group_size"], r["method"]) for r in new_rows}
            kept = [dict(r, run_utc=r.get("run_utc", old.get("date_utc"))) for r in old_rows
                    if (r["bits"], r["group_size"], r["method"]) not in done]
            sidx = {bg: i for i, bg in enumerate(SETTINGS[model])}
            results[model] = sorted(kept + new_rows, key=lambda r: (
                -1 if r["bits"] is None else sidx.get((r["bits"], r["group_size"]), 99),
                order.index(r["method"]) if r["method"] in order else len(order)))
        calib = {**old.get("calibration", {}), **calib}
    result = dict(
        date_utc=now,
        device="cpu", threads=a.threads,
        machine=f"{os.cpu_count()} cores, shared (other jobs ran; wall times are indicative)",
        cpu=cpu_facts(),
        eqat=eqat,
        versions={n: version(n) for n in ("auto-round", "gptqmodel", "transformers", "optimum", "torch",
                                          "sentencepiece")},
        runs=runs,
        method_notes=__doc__,
        calibration=calib,
        settings=dict(shapes=dict(settings=[f"W{b}g{g}" for b, g in SETTINGS["shapes-llava"]],
                                  eval="eqat eval --bench shapes --reference models/shapes-llava --batch-size 32"),
                      stories=dict(settings=[f"W{b}g{g}" for b, g in SETTINGS["stories260K"]],
                                   eval="eqat eval --bench kl --reference S --data HELDOUT --seq-len 256 --limit 64")),
        results=results,
        seconds=round(sum(r.get("seconds") or 0 for r in runs), 1),
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    for model, rows in results.items():
        print(f"\n### {model}\n")
        print(table(rows, model))
    print(f"\nwrote {a.out} (this run {this_run['seconds']} s, all runs {result['seconds']} s); work dir {work}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
