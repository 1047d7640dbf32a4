"""Writes a random-weight Llama directory of a chosen size, for load/RSS and speed measurements (not for tests).

usage: .venv/bin/python tools/make_random_llama.py OUT_DIR [--hidden 2048 --layers 8 --ffn 5632 --vocab 8192
                                                          --heads 16 --kv-heads 16 --dtype bf16]
The tokenizer files are copied from tests/data/fixtures/tiny_llama (its 512 pieces fit any vocab >= 512).
"""
import argparse, json, os, shutil
import torch
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--layers", type=int, default=8)
p.add_argument("--ffn", type=int, default=5632)
p.add_argument("--vocab", type=int, default=8192)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--kv-heads", type=int, default=16)
p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
a = p.parse_args()
dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
torch.manual_seed(0)
hd = a.hidden // a.heads
C, F = a.hidden, a.ffn
t = {}
def lin(o, i): return (torch.randn(o, i) / i ** 0.5).to(dt)
t["model.embed_tokens.weight"] = torch.randn(a.vocab, C).to(dt)
for l in range(a.layers):
    pre = f"model.layers.{l}."
    t[pre + "self_attn.q_proj.weight"] = lin(a.heads * hd, C)
    t[pre + "self_attn.k_proj.weight"] = lin(a.kv_heads * hd, C)
    t[pre + "self_attn.v_proj.weight"] = lin(a.kv_heads * hd, C)
    t[pre + "self_attn.o_proj.weight"] = lin(C, a.heads * hd)
    t[pre + "mlp.gate_proj.weight"] = lin(F, C)
    t[pre + "mlp.up_proj.weight"] = lin(F, C)
    t[pre + "mlp.down_proj.weight"] = lin(C, F)
    t[pre + "input_layernorm.weight"] = torch.ones(C).to(dt)
    t[pre + "post_attention_layernorm.weight"] = torch.ones(C).to(dt)
t["model.norm.weight"] = torch.ones(C).to(dt)
t["lm_head.weight"] = lin(a.vocab, C)
os.makedirs(a.out, exist_ok=True)
save_file(t, os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": C, "intermediate_size": F,
       "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
       "vocab_size": a.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "tie_word_embeddings": False, "torch_dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[a.dtype]}
json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
src = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "fixtures", "tiny_llama")
for f in ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]:
    shutil.copy(os.path.join(src, f), a.out)
n = sum(v.numel() for v in t.values())
print(f"wrote {a.out}: {n} parameters, {os.path.getsize(os.path.join(a.out, 'model.safetensors'))} bytes")
