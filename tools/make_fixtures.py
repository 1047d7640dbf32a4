#!/usr/bin/env python3
"""Builds the golden test fixtures in tests/data/fixtures/ (README.md there describes every file and tensor).

Tiny random Hugging Face models (a LLaVA and two Llamas) are created with fixed seeds, saved with
save_pretrained(safe_serialization=True) in float32, and run in float32 on the CPU with transformers; their
reference outputs (ids, pixel values, image features, logits, greedy continuations) go to golden.safetensors.
The SentencePiece tokenizer is trained here on a slice of tiny-shakespeare with Llama-2's trainer settings.

Python is only the reference generator; eqat itself is C++. Run from the repository root:
    .venv/bin/python tools/make_fixtures.py [--only llava,llama,mistral,rope_dynamic,llava_next]
The output is deterministic for a given torch / transformers / sentencepiece version (single thread, fixed
seeds); the versions used are recorded in each golden.json.
"""

import hashlib
import io
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import (CLIPVisionConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          MistralConfig, MistralForCausalLM)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "fixtures"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare" / "input.txt"

SP_VOCAB = 512          # 3 specials + 256 byte pieces + 62 characters + 191 merges
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
EMBED_STD_TIED = 0.1
LLAVA_VOCAB = 576       # 514 tokenizer entries padded to a multiple of 64, as llava-hf does (LLAVA.md §1.3)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


# ------------------------------------------------------------------------------------------------ tokenizer

def train_tokenizer() -> bytes:
    """A tiny Llama-2-style SentencePiece BPE model (ids 0/1/2 = <unk>/<s>/</s>, bytes at 3..258)."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    lines = [line for line in text.split("\n") if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2)
    return model.getvalue()


def write_tokenizer(dir_: Path, sp_model: bytes, added: list) -> None:
    """HF tokenizer files in the llava-hf layout (LLAVA.md §1.3). `added` = [(id, content)] of added special
    tokens (special=true, normalized=false)."""
    (dir_ / "tokenizer.model").write_bytes(sp_model)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    decoder = {}
    for i, content in list(specials.items()) + added:
        decoder[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
    cfg = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 256,
        "pad_token": PAD_TOKEN if any(c == PAD_TOKEN for _, c in added) else None,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_map = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    if cfg["pad_token"] is not None:
        special_map["pad_token"] = {"content": PAD_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False}
    else:
        del cfg["pad_token"]
    dump_json(dir_ / "tokenizer_config.json", cfg)
    dump_json(dir_ / "special_tokens_map.json", special_map)
    if added:
        dump_json(dir_ / "added_tokens.json", {c: i for i, c in added})


def encode(sp: spm.SentencePieceProcessor, text: str, specials: dict) -> list:
    """Legacy HF Llama tokenization: split on the special-token strings, SentencePiece-encode every remaining
    chunk on its own (each gets the dummy-prefix "▁"), BOS first, no EOS (LLAVA.md §4.2)."""
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids = [1]
    for chunk in (re.split(pattern, text) if specials else [text]):
        if chunk in specials:
            ids.append(specials[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids


def check_with_transformers(dir_: Path, text: str, ids: list) -> None:
    """Cross-check our ids against transformers' tokenizer loaded from the directory we wrote."""
    tok = transformers.AutoTokenizer.from_pretrained(str(dir_))
    got = tok(text, add_special_tokens=False).input_ids
    assert got == ids[1:], f"transformers tokenizer disagrees for {text!r}:\n{got}\n{ids[1:]}"


# ------------------------------------------------------------------------------------------------ image

def make_image() -> Image.Image:
    """A deterministic 40x24 (W x H) RGB test picture: colour ramps, a disc and a checkerboard patch. Non-square,
    so LLaVA's pad-to-square path matters."""
    w, h = 40, 24
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 128.0 + 100.0 * np.sin(x / 3.0) * np.cos(y / 4.0)
    disc = (x - 26) ** 2 + (y - 11) ** 2 <= 36
    r[disc], g[disc], b[disc] = 250, 240, 20
    checker = (x < 10) & (y >= 12) & (((x.astype(int) // 2) + (y.astype(int) // 2)) % 2 == 0)
    r[checker], g[checker], b[checker] = 0, 0, 0
    arr = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def expand2square(img: Image.Image, color) -> Image.Image:
    """LLaVA's pad path (LLAVA.md §3.2): centre on a square canvas of the mean colour, floor offsets."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(img: Image.Image, size: int) -> tuple:
    """CLIPImageProcessor slow path (LLAVA.md §3.3): shortest edge -> size (PIL bicubic), centre crop, rescale,
    normalise. Returns (uint8 HWC after resize+crop, float32 [1,3,size,size])."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    out_w, out_h = (size, new_long) if w <= h else (new_long, size)
    if (out_w, out_h) != (w, h):
        img = img.resize((out_w, out_h), resample=Image.BICUBIC, reducing_gap=None)
    top, left = (out_h - size) // 2, (out_w - size) // 2
    u8 = np.asarray(img.convert("RGB"))[top:top + size, left:left + size]
    x = (u8.astype(np.float64) * 0.00392156862745098).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return u8.copy(), torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def check_with_hf_processor(img: Image.Image, size: int, pad: bool, expected: torch.Tensor) -> None:
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    proc = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                  do_pad=pad, resample=3)
    got = torch.as_tensor(np.asarray(proc(img, return_tensors="np")["pixel_values"]))
    assert got.shape == expected.shape and torch.equal(got, expected), \
        f"HF processor (do_pad={pad}) differs: max |d| = {(got - expected).abs().max()}"


# ------------------------------------------------------------------------------------------------ models

def reinit_(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    """Random weights with enough scale that logits are far from flat: linear weights N(0, 1/fan_in) (lm_head
    N(0, 4/fan_in)), token embeddings N(0, embed_std^2), norm weights 1 + N(0, 0.1^2), biases N(0, 0.05^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shape = p.shape
            if "norm" in name or "layrnorm" in name:
                val = (1.0 + 0.1 * torch.randn(shape, generator=gen)) if name.endswith("weight") \
                    else 0.05 * torch.randn(shape, generator=gen)
            elif name.endswith("bias"):
                val = 0.05 * torch.randn(shape, generator=gen)
            elif "embed" in name:  # embed_tokens, class/position/patch embeddings
                if name.endswith("patch_embedding.weight"):
                    val = torch.randn(shape, generator=gen) / float(np.sqrt(np.prod(shape[1:])))
                else:
                    val = torch.randn(shape, generator=gen) * (embed_std if "embed_tokens" in name else 0.5)
            else:  # Linear [out, in]
                scale = 2.0 if "lm_head" in name else 1.0
                val = torch.randn(shape, generator=gen) * scale / float(np.sqrt(shape[-1]))
            p.copy_(val)


def pad_vocab_rows_(weight: torch.Tensor, used: int, seed: int) -> None:
    """Rows >= used are vocabulary padding: set them to the mean of the used rows plus tiny noise, like the
    llava-hf converter (so they never win an argmax)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mu = weight[:used].mean(0)
        n = weight.shape[0] - used
        weight[used:] = mu + 1e-3 * torch.randn(n, weight.shape[1], generator=gen)


def classic_rope_config(path: Path) -> None:
    """transformers 5 writes `rope_parameters`; published checkpoints (Llama-2/3, Vicuna, llava-hf) use
    top-level `rope_theta` + `rope_scaling`. Rewrite to the classic keys (transformers 5 still reads them; the
    reload check in main() proves the rewritten config gives the same logits)."""
    cfg = json.loads(path.read_text())

    def fix(c):
        rp = c.pop("rope_parameters", None)
        if rp is None:
            return
        c["rope_theta"] = rp.get("rope_theta", 10000.0)
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default":
            sc = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type", "type")}
            c["rope_scaling"] = {"rope_type": rtype, "type": rtype, **sc}
        else:
            c["rope_scaling"] = None
        if "dtype" in c:
            c["torch_dtype"] = c["dtype"]

    fix(cfg)
    if "text_config" in cfg:
        fix(cfg["text_config"])
        cfg["torch_dtype"] = cfg.get("dtype", "float32")
    dump_json(path, cfg)


def greedy(model, gen_kwargs: dict, n: int) -> tuple:
    """model.generate greedy, exactly n new tokens (no EOS stop). Returns (new ids [n] int64, raw logits of
    every step [n, V] float32). Asserts ids == argmax of the raw logits."""
    gcfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                            pad_token_id=0, bos_token_id=1, use_cache=True,
                            return_dict_in_generate=True, output_logits=True)
    out = model.generate(**gen_kwargs, generation_config=gcfg)
    prompt_len = gen_kwargs["input_ids"].shape[1]
    ids = out.sequences[0, prompt_len:].clone()
    logits = torch.stack([l[0] for l in out.logits]).float()
    assert ids.numel() == n and logits.shape[0] == n
    assert torch.equal(logits.argmax(-1), ids), "greedy ids differ from the argmax of the step logits"
    return ids.to(torch.int64), logits.contiguous()


def layer_outputs(model, decoder_layers, inputs: dict) -> tuple:
    """Runs one forward pass and records the decoder input (embeddings, image rows merged in) and the output of
    every decoder layer (before the final norm). Returns (logits [T,V], inputs_embeds [T,H], outputs [L,T,H])."""
    rec = {}

    def hook(i):
        def fn(_m, args, kwargs, out):
            if i == 0:
                x = args[0] if args else kwargs["hidden_states"]
                rec["in"] = x[0].detach().clone()
            rec[i] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(decoder_layers)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    outs = torch.stack([rec[i] for i in range(len(decoder_layers))])
    return logits, rec["in"].contiguous(), outs.contiguous()


def top2_margin(logits: torch.Tensor) -> float:
    """Smallest gap between the best and second-best logit over rows: the greedy ids are robust to numerical
    noise below this."""
    t = logits.reshape(-1, logits.shape[-1]).topk(2, dim=-1).values
    return float((t[:, 0] - t[:, 1]).min())


# ------------------------------------------------------------------------------------------------ helpers

def dump_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def versions() -> dict:
    import PIL
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "sentencepiece": spm.__version__, "pillow": PIL.__version__, "numpy": np.__version__}


def save_golden(dir_: Path, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dir_ / "golden.safetensors"),
              metadata={"format": "pt"})  # one key: safetensors orders metadata randomly


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_model(model, dir_: Path) -> None:
    model.save_pretrained(str(dir_), safe_serialization=True)
    classic_rope_config(dir_ / "config.json")
    gc = dir_ / "generation_config.json"
    if gc.exists():
        cfg = json.loads(gc.read_text())
        cfg.pop("transformers_version", None)
        dump_json(gc, cfg)


def reload_check(cls, dir_: Path, ref_logits: torch.Tensor, **inputs) -> None:
    """The saved directory (with the rewritten config) reproduces the in-memory model's logits exactly."""
    m = cls.from_pretrained(str(dir_), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = m(**inputs).logits[0]
    assert torch.equal(got, ref_logits), f"reloaded {dir_.name} differs: {(got - ref_logits).abs().max()}"


# ------------------------------------------------------------------------------------------------ fixtures

def make_llava(sp_model: bytes, sp: spm.SentencePieceProcessor) -> None:
    d = fresh_dir(OUT / "tiny_llava")
    image_id, pad_id = SP_VOCAB, SP_VOCAB + 1
    write_tokenizer(d, sp_model, [(image_id, IMAGE_TOKEN), (pad_id, PAD_TOKEN)])
    dump_json(d / "preprocessor_config.json", {
        "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "processor_class": "LlavaProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32}})

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=32)
    tcfg = LlamaConfig(vocab_size=LLAVA_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id, image_seq_length=16,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", pad_token_id=pad_id, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(1234)
    model = LlavaForConditionalGeneration(cfg).eval()
    reinit_(model, seed=1234)
    lm = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    pad_vocab_rows_(emb, SP_VOCAB + 2, seed=1)
    pad_vocab_rows_(lm, SP_VOCAB + 2, seed=2)
    save_model(model, d)

    # --- image: pad (LLaVA default, eqat's default) and crop (llava-hf default) paths
    img = make_image()
    img.save(d / "image.png", optimize=False)
    img = Image.open(d / "image.png").convert("RGB")
    padded = expand2square(img, PAD_COLOR)
    u8_pad, pixel_values = clip_preprocess(padded, 32)
    u8_crop, pixel_values_crop = clip_preprocess(img, 32)
    check_with_hf_processor(img, 32, True, pixel_values)
    check_with_hf_processor(img, 32, False, pixel_values_crop)

    specials = {IMAGE_TOKEN: image_id, "</s>": 2}
    prompts = {
        # LLaVA-1.5 vicuna_v1 evaluation template, single turn (LLAVA.md §4.1)
        "p0": f"{SYSTEM} USER: {IMAGE_TOKEN}\nWhat is in the picture? ASSISTANT:",
        # multi-turn: a closed assistant turn ends in the literal "</s>" (must become id 2)
        "p1": f"{SYSTEM} USER: {IMAGE_TOKEN}\nWhat is in the picture? ASSISTANT: A yellow sun.</s>"
              f"USER: And what colour is the sky? ASSISTANT:",
        # llava-hf chat-template style: no system prompt, image near the start
        "p2": f"USER: {IMAGE_TOKEN}\nWhat is shown in this image? ASSISTANT:",
    }
    golden = {"pixel_values": pixel_values, "pixel_values_crop": pixel_values_crop,
              "image_u8": torch.from_numpy(u8_pad), "image_u8_crop": torch.from_numpy(u8_crop)}
    meta = {"prompts": {}, "image": {"file": "image.png", "width": img.size[0], "height": img.size[1],
                                      "pad_color": list(PAD_COLOR)}}

    with torch.no_grad():
        vis = model.model.vision_tower(pixel_values, output_hidden_states=True)
        feats = model.model.multi_modal_projector(vis.hidden_states[-2][:, 1:])[0]
        hf_feats = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output[0]
        assert torch.equal(feats, hf_feats)
        golden["image_features"] = feats.contiguous()
        # all 4 CLIP hidden states [n_layer+1, 17, 32] incl. CLS (entry 0 = pre_layrnorm output), debug aid
        golden["vision_hidden_states"] = torch.stack([h[0] for h in vis.hidden_states]).contiguous()

    n_new = {"p0": 12, "p1": 12, "p2": 12}
    for key, text in prompts.items():
        text_ids = encode(sp, text, specials)
        check_with_transformers(d, text, text_ids)
        assert text_ids.count(image_id) == 1
        pos = text_ids.index(image_id)
        ids = text_ids[:pos] + [image_id] * 16 + text_ids[pos + 1:]   # processor expansion (LLAVA.md §4.4)
        input_ids = torch.tensor([ids], dtype=torch.int64)
        inputs = dict(input_ids=input_ids, pixel_values=pixel_values, attention_mask=torch.ones_like(input_ids))
        logits, embeds, louts = layer_outputs(model, model.model.language_model.layers, inputs)
        gids, glogits = greedy(model, inputs, n_new[key])
        assert torch.equal(embeds[pos:pos + 16], golden["image_features"])
        if key == "p0":
            golden["p0.inputs_embeds"] = embeds
            golden["p0.layer_outputs"] = louts
        golden[f"{key}.input_ids"] = input_ids[0]
        golden[f"{key}.logits"] = logits.contiguous() if key == "p0" else logits[-1].contiguous()
        golden[f"{key}.greedy_ids"] = gids
        golden[f"{key}.greedy_logits"] = glogits
        if key == "p0":
            reload_check(LlavaForConditionalGeneration, d, logits, **inputs)
        tok_strings = [sp.id_to_piece(i) if i < SP_VOCAB else {image_id: IMAGE_TOKEN, pad_id: PAD_TOKEN}.get(i, "?")
                       for i in gids.tolist()]
        meta["prompts"][key] = {
            "text": text, "text_ids_unexpanded": text_ids, "image_position": pos, "num_positions": len(ids),
            "greedy_ids": gids.tolist(), "greedy_pieces": tok_strings,
            "greedy_text": sp.decode([i for i in gids.tolist() if i < SP_VOCAB]),
            "min_top2_margin_prompt_last": top2_margin(logits[-1]), "min_top2_margin_greedy": top2_margin(glogits)}
    meta["versions"] = versions()
    meta["vocab"] = {"tokenizer_entries": SP_VOCAB + 2, "model_vocab": LLAVA_VOCAB, "image_token_id": image_id,
                     "pad_token_id": pad_id}
    save_golden(d, golden)
    dump_json(d / "golden.json", meta)


def llama_config(max_position_embeddings: int = 256, **extra) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=SP_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=True,
                      max_position_embeddings=max_position_embeddings, bos_token_id=1, eos_token_id=2, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def make_llama(sp_model: bytes, sp: spm.SentencePieceProcessor) -> None:
    d = fresh_dir(OUT / "tiny_llama")
    write_tokenizer(d, sp_model, [])
    torch.manual_seed(4321)
    model = LlamaForCausalLM(llama_config()).eval()
    # Tied embeddings: a small embedding scale keeps the last token's own row from dominating its logits
    # (otherwise greedy just repeats the prompt's last token).
    reinit_(model, seed=4321, embed_std=EMBED_STD_TIED)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    save_model(model, d)

    golden, meta = {}, {"prompt": {}, "batch": []}
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = encode(sp, prompt, {})
    check_with_transformers(d, prompt, ids)
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    logits, embeds, louts = layer_outputs(model, model.model.layers, inputs)
    golden["prompt.layer_outputs"] = louts
    reload_check(LlamaForCausalLM, d, logits, **inputs)
    gids, glogits = greedy(model, inputs, 16)
    golden.update({"prompt.input_ids": input_ids[0], "prompt.logits": logits, "prompt.greedy_ids": gids,
                   "prompt.greedy_logits": glogits})
    meta["prompt"] = {"text": prompt, "ids": ids, "greedy_ids": gids.tolist(),
                      "greedy_text": sp.decode(gids.tolist()), "min_top2_margin_greedy": top2_margin(glogits)}

    batch = ["To be, or not to be", "O Romeo, Romeo! wherefore art thou Romeo?", "Hi"]
    for i, text in enumerate(batch):
        ids = encode(sp, text, {})
        check_with_transformers(d, text, ids)
        input_ids = torch.tensor([ids])
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        with torch.no_grad():
            last = model(**inputs).logits[0, -1].float()
        gids, glogits = greedy(model, inputs, 8)
        golden.update({f"batch{i}.input_ids": input_ids[0], f"batch{i}.last_logits": last.contiguous(),
                       f"batch{i}.greedy_ids": gids, f"batch{i}.greedy_logits": glogits})
        meta["batch"].append({"text": text, "ids": ids, "greedy_ids": gids.tolist(),
                              "min_top2_margin_greedy": top2_margin(glogits)})

    # HF's own batched run with left padding, for reference: must agree with the one-by-one runs.
    seqs = [golden[f"batch{i}.input_ids"].tolist() for i in range(3)]
    L = max(map(len, seqs))
    pad = torch.tensor([[0] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    with torch.no_grad():
        blast = model(input_ids=pad, attention_mask=mask).logits[:, -1].float()
    for i in range(3):
        diff = float((blast[i] - golden[f"batch{i}.last_logits"]).abs().max())
        assert diff < 1e-4, f"HF batched vs one-by-one differ by {diff}"
        meta["batch"][i]["hf_left_padded_max_abs_diff"] = diff
    meta["versions"] = versions()
    save_golden(d, golden)
    dump_json(d / "golden.json", meta)

    # --- RoPE-scaled variants: same weights, only config.json + golden (the test copies ../tiny_llama/*).
    long_prompt = ("MENENIUS:\nEither you must confess yourselves wondrous malicious, or be accused of folly. "
                   "I shall tell you a pretty tale.")
    ids = encode(sp, long_prompt, {})
    input_ids = torch.tensor([ids])
    variants = {
        "tiny_llama_rope_scaled": {"rope_type": "linear", "factor": 2.0},
        # original_max 256 with head_dim 8 / theta 5e5 puts one frequency in each llama3 regime:
        # wavelengths 6.3 (kept), 167 (smoothed: between 256/4 and 256), 4443 and 1.2e5 (divided by factor).
        "tiny_llama_rope_llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    }
    for name, rope in variants.items():
        vd = fresh_dir(OUT / name)
        rp = {"rope_theta": 500000.0, **rope}
        mpe = 1024 if rope["rope_type"] == "llama3" else 256  # transformers wants original_max < max
        scaled = LlamaForCausalLM(llama_config(max_position_embeddings=mpe, rope_parameters=rp)).eval()
        scaled.load_state_dict(model.state_dict())
        scaled.config.save_pretrained(str(vd))
        classic_rope_config(vd / "config.json")
        with torch.no_grad():
            logits = scaled(input_ids=input_ids).logits[0].float()
            base = model(input_ids=input_ids).logits[0].float()
        delta = float((logits - base).abs().max())
        assert delta > 1e-2, f"{name}: rope scaling has no visible effect ({delta})"
        # reload with the rewritten config + tiny_llama's weights
        shutil.copy(d / "model.safetensors", vd / "model.safetensors")
        reload_check(LlamaForCausalLM, vd, logits, input_ids=input_ids)
        (vd / "model.safetensors").unlink()
        save_golden(vd, {"prompt.input_ids": input_ids[0], "prompt.logits": logits})
        dump_json(vd / "golden.json", {"text": long_prompt, "ids": ids, "weights": "../tiny_llama/model.safetensors",
                                       "rope": rp, "max_abs_diff_vs_unscaled": delta, "versions": versions()})


def make_mistral(sp_model: bytes, sp: spm.SentencePieceProcessor) -> None:
    """tiny_mistral: MistralForCausalLM with a sliding window of 8 under prompts of 30+ tokens, so every layer's
    attention is cut by the window in the prompt and in every generated step."""
    d = fresh_dir(OUT / "tiny_mistral")
    write_tokenizer(d, sp_model, [])
    cfg = MistralConfig(vocab_size=SP_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=10000.0,
                        sliding_window=8, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1,
                        eos_token_id=2)
    cfg._attn_implementation = "eager"
    torch.manual_seed(2468)
    model = MistralForCausalLM(cfg).eval()
    reinit_(model, seed=2468)
    save_model(model, d)
    prompt = ("MENENIUS:\nEither you must confess yourselves wondrous malicious, or be accused of folly. "
              "I shall tell you a pretty tale.")
    ids = encode(sp, prompt, {})
    assert len(ids) > 3 * cfg.sliding_window
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        # The window must matter: the same weights without it give other logits.
        nowin = MistralForCausalLM(MistralConfig(**{**cfg.to_dict(), "sliding_window": None})).eval()
        nowin.config._attn_implementation = "eager"
        nowin.load_state_dict(model.state_dict())
        delta = float((nowin(**inputs).logits[0].float() - logits).abs().max())
    assert delta > 1e-2, f"the sliding window has no visible effect ({delta})"
    reload_check(MistralForCausalLM, d, logits, **inputs)
    gids, glogits = greedy(model, inputs, 16)
    save_golden(d, {"prompt.input_ids": input_ids[0], "prompt.logits": logits, "prompt.greedy_ids": gids,
                    "prompt.greedy_logits": glogits})
    dump_json(d / "golden.json", {"text": prompt, "ids": ids, "sliding_window": cfg.sliding_window,
                                  "greedy_ids": gids.tolist(), "min_top2_margin_greedy": top2_margin(glogits),
                                  "max_abs_diff_vs_no_window": delta, "versions": versions()})


def make_rope_dynamic(sp_model: bytes, sp: spm.SentencePieceProcessor) -> None:
    """tiny_llama_rope_dynamic: tiny_llama's weights with max_position_embeddings 32 and dynamic-NTK RoPE (factor
    2). A 40-token prompt and its 16 greedy tokens run past the 32 positions, where transformers keeps going with a
    growing base; eqat allows factor x max_position_embeddings = 64 positions for such a model."""
    base = LlamaForCausalLM.from_pretrained(str(OUT / "tiny_llama"), dtype=torch.float32,
                                            attn_implementation="eager").eval()
    vd = fresh_dir(OUT / "tiny_llama_rope_dynamic")
    rp = {"rope_theta": 500000.0, "rope_type": "dynamic", "factor": 2.0}
    model = LlamaForCausalLM(llama_config(max_position_embeddings=32, rope_parameters=rp)).eval()
    model.load_state_dict(base.state_dict())
    model.config.save_pretrained(str(vd))
    classic_rope_config(vd / "config.json")
    long_prompt = ("MENENIUS:\nEither you must confess yourselves wondrous malicious, or be accused of folly. "
                   "I shall tell you a pretty tale.")
    ids = encode(sp, long_prompt, {})[:40]
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
        plain = base(**inputs).logits[0].float()
    delta = float((logits - plain).abs().max())
    assert delta > 1e-2, f"dynamic RoPE has no visible effect ({delta})"
    gids, glogits = greedy(model, inputs, 16)
    save_golden(vd, {"prompt.input_ids": input_ids[0], "prompt.logits": logits, "prompt.greedy_ids": gids,
                     "prompt.greedy_logits": glogits})
    dump_json(vd / "golden.json", {"ids": ids, "weights": "../tiny_llama/model.safetensors", "rope": rp,
                                   "max_position_embeddings": 32, "greedy_ids": gids.tolist(),
                                   "min_top2_margin_greedy": top2_margin(glogits),
                                   "max_abs_diff_vs_unscaled": delta, "versions": versions()})


# LLaVA-NeXT at a reduced scale: 32-px tiles of 8-px patches (4x4 features per tile, as 336/14 = 24x24 at full
# size) and LLaVA-NeXT's pinpoints divided by 10.5 (336 -> 32). The algorithm has no size-dependent branch.
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# (width, height): 10:1 and 1:10 (rows / columns unpadded), 9:4 (an odd column padding), a 4:3 JPEG.
NEXT_IMAGES = {"wide": (200, 20, "png"), "tall": (20, 200, "png"), "mid": (90, 40, "png"), "photo": (64, 48, "jpg")}
MISTRAL_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                         "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                         "{% endif %}{% endfor %}")
VICUNA_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + "
                        "message['content'] + ' ' }}{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}"
                        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def next_image(name: str, w: int, h: int) -> np.ndarray:
    """A deterministic picture with structure at every scale (ramps, stripes, a disc), distinct per name."""
    seed = sum(map(ord, name))
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255.0 * x / max(w - 1, 1)
    g = 127.5 + 120.0 * np.sin((x + seed) / 5.0) * np.cos(y / 7.0)
    b = 255.0 * y / max(h - 1, 1)
    disc = (x - w / 3) ** 2 + (y - h / 2) ** 2 <= (min(w, h) / 3) ** 2
    r[disc], g[disc], b[disc] = 240, 230, 30
    return np.stack([r, g, b], -1).round().clip(0, 255).astype(np.uint8)


def make_llava_next(sp_model: bytes, sp: spm.SentencePieceProcessor, variant: str) -> None:
    """tiny_llava_next_{mistral,vicuna,llama3}: LlavaNextForConditionalGeneration with a Mistral decoder (sliding
    window 48 under ~100-position prompts), a Llama decoder (Vicuna's layout and chat format) and a Llama decoder
    with a Llama-3 byte-level BPE tokenizer. Goldens from HF's LlavaNextProcessor (PIL image processor, prompt
    expansion) and the model: per image, pixel values, image size, input ids, the last position's logits, greedy
    tokens; for "mid" every position's logits and the packed image features."""
    from transformers import AutoTokenizer, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    d = fresh_dir(OUT / f"tiny_llava_next_{variant}")
    seed = {"mistral": 4321, "vicuna": 4322, "llama3": 4330}[variant]
    if variant == "llama3":
        tj = json.loads((OUT / "bpe_llama3" / "tokenizer.json").read_text())
        image_id = len(tj["model"]["vocab"]) + len(tj["added_tokens"])
        tj["added_tokens"].append({"id": image_id, "content": IMAGE_TOKEN, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
        dump_json(d / "tokenizer.json", tj)
        tc = json.loads((OUT / "bpe_llama3" / "tokenizer_config.json").read_text())
        dump_json(d / "tokenizer_config.json", tc)
        vocab, bos, eos = (image_id + 64) // 64 * 64, tj["added_tokens"][0]["id"], 3009  # <|eot_id|>
        pad_id = None
    else:
        image_id, pad_id = SP_VOCAB, SP_VOCAB + 1
        write_tokenizer(d, sp_model, [(image_id, IMAGE_TOKEN), (pad_id, PAD_TOKEN)])
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = MISTRAL_CHAT_TEMPLATE if variant == "mistral" else VICUNA_CHAT_TEMPLATE
        dump_json(d / "tokenizer_config.json", tc)
        vocab, bos, eos = LLAVA_VOCAB, 1, 2
    dump_json(d / "preprocessor_config.json", {
        "aspect_ratio_setting": "anyres", "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_grid_pinpoints": NEXT_PINPOINTS, "image_mean": list(CLIP_MEAN), "image_processor_type":
        "LlavaNextImageProcessor", "image_std": list(CLIP_STD), "processor_class": "LlavaNextProcessor",
        "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32}})

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, hidden_act="quick_gelu", projection_dim=32)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
                  bos_token_id=bos, eos_token_id=eos)
    if variant == "mistral":
        tcfg = MistralConfig(head_dim=16, rope_theta=1000000.0, sliding_window=48, **common)
    else:
        tcfg = LlamaConfig(rope_theta=500000.0 if variant == "llama3" else 10000.0, **common)
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id, image_seq_length=16,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", image_grid_pinpoints=NEXT_PINPOINTS,
                          pad_token_id=pad_id, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    reinit_(model, seed=seed)
    with torch.no_grad():  # reinit_ leaves image_newline alone: scale it like a projected feature
        model.model.image_newline.copy_(torch.randn(64, generator=torch.Generator().manual_seed(seed)))
    used = image_id + 1 if pad_id is None else pad_id + 1
    pad_vocab_rows_(model.get_input_embeddings().weight, used, seed=1)
    pad_vocab_rows_(model.get_output_embeddings().weight, used, seed=2)
    save_model(model, d)

    tok = AutoTokenizer.from_pretrained(str(d))
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=NEXT_PINPOINTS, resample=3, do_pad=True,
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    question = "What is shown in this image?"
    template = {"mistral": "mistral", "vicuna": "llava-1.5", "llama3": "llama3"}[variant]
    text = {"mistral": f"[INST] {IMAGE_TOKEN}\n{question} [/INST]",
            "vicuna": f"{SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:",
            "llama3": f"<|start_header_id|>user<|end_header_id|>\n\n{IMAGE_TOKEN}\n{question}<|eot_id|>"
                      f"<|start_header_id|>assistant<|end_header_id|>\n\n"}[variant]
    golden, meta = {}, {"template": template, "question": question, "text": text, "image_token_id": image_id,
                        "pinpoints": NEXT_PINPOINTS, "images": {}}
    for name, (w, h, ext) in NEXT_IMAGES.items():
        path = d / f"{name}.{ext}"
        Image.fromarray(next_image(name, w, h), "RGB").save(path, **({"quality": 90} if ext == "jpg" else {}))
        img = Image.open(path)
        inputs = proc(images=img, text=text, return_tensors="pt")
        pv, sizes, ids = inputs["pixel_values"][0].float(), inputs["image_sizes"][0], inputs["input_ids"]
        golden[f"{name}.pixel_values"] = pv
        golden[f"{name}.image_sizes"] = sizes.to(torch.int64)
        n_img = int((ids[0] == image_id).sum())
        if ext == "jpg":  # pixels only: the JPEG decoders may differ by a level
            meta["images"][name] = {"file": path.name, "width": w, "height": h, "tiles": int(pv.shape[0]),
                                    "image_tokens": n_img}
            continue
        fwd = dict(input_ids=ids, pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                   attention_mask=inputs["attention_mask"])
        with torch.no_grad():
            out = model(**fwd)
            logits = out.logits[0].float()
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"]).pooler_output[0]
        assert feats.shape[0] == n_img, (feats.shape, n_img)
        gids, glogits = greedy(model, fwd, 10)
        golden[f"{name}.input_ids"] = ids[0]
        golden[f"{name}.logits_last"] = logits[-1].clone()
        golden[f"{name}.greedy_ids"] = gids
        if name == "mid":  # every position's logits and the step logits once (the Llama-3 vocabulary is large)
            golden["mid.greedy_logits"] = glogits
            golden["mid.logits"] = logits.contiguous()
            golden["mid.image_features"] = feats.contiguous()
            reload_check(LlavaNextForConditionalGeneration, d, logits, **fwd)
        meta["images"][name] = {"file": path.name, "width": w, "height": h, "tiles": int(pv.shape[0]),
                                "image_tokens": n_img, "num_positions": int(ids.shape[1]),
                                "greedy_ids": gids.tolist(), "min_top2_margin_prompt_last": top2_margin(logits[-1]),
                                "min_top2_margin_greedy": top2_margin(glogits)}
    if variant == "mistral":  # the window must matter under these prompts
        assert meta["images"]["mid"]["num_positions"] > 48
    meta["versions"] = versions()
    save_golden(d, golden)
    dump_json(d / "golden.json", meta)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    sp_model = train_tokenizer()
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    assert sp.vocab_size() == SP_VOCAB and sp.id_to_piece(3) == "<0x00>" and sp.piece_to_id("<0x0A>") == 13
    only = (sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv
            else ["llava", "llama", "mistral", "rope_dynamic", "llava_next"])
    if "llava" in only:
        make_llava(sp_model, sp)
    if "llama" in only:
        make_llama(sp_model, sp)
    if "mistral" in only:
        make_mistral(sp_model, sp)
    if "rope_dynamic" in only:
        make_rope_dynamic(sp_model, sp)
    if "llava_next" in only:
        for variant in ("mistral", "vicuna", "llama3"):
            make_llava_next(sp_model, sp, variant)
    total = 0
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
    print(f"fixtures written to {OUT} ({total / 1e6:.2f} MB); tokenizer.model sha256 "
          f"{hashlib.sha256(sp_model).hexdigest()}")


if __name__ == "__main__":
    main()
