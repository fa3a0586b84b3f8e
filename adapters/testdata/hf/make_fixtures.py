#!/usr/bin/env python3
"""Writes Hugging Face-layout fixtures with real PyTorch (Debian's
python3-torch) for sbora-serve's import tests:

  base.json, base.bin      a tiny LLaMA (GQA, 2 layers) already converted the
                           way llama.cpp's convert_hf_to_gguf.py does it
                           (q_proj/k_proj rows permuted), GGUF tensor names
  fa/, fb/                 reference SBoRA checkpoints: adapter_model.bin
                           (torch.save of a state dict with the reference
                           key names) + adapter_config.json (peft_type SBORA)
  qsbora/adapter_model/SB_FA_sampleMul/
                           the QSBoRA layout: peft_type LORA, nested folder
  lora/                    a PEFT LoRA: adapter_model.safetensors + config
  reference.json           float64 logits of a token sequence computed here,
                           in Hugging Face conventions (rotate_half RoPE on
                           unpermuted weights), for the base and each adapter

usage: make_fixtures.py OUTDIR
"""
import json, os, struct, sys

import torch

torch.manual_seed(1234)
out = sys.argv[1]
os.makedirs(out, exist_ok=True)

H, NH, NKV, L, FF, V = 64, 4, 2, 2, 128, 300
HD = H // NH
THETA, EPS = 10000.0, 1e-5
R, ALPHA = 4, 8.0
f64 = torch.float64

def rnd(*shape, scale):
    return (torch.rand(*shape, dtype=f64) * 2 - 1) * scale

W = {"model.embed_tokens.weight": rnd(V, H, scale=1.0), "model.norm.weight": 1 + rnd(H, scale=0.1),
     "lm_head.weight": rnd(V, H, scale=H ** -0.5)}
for i in range(L):
    p = f"model.layers.{i}."
    W[p + "input_layernorm.weight"] = 1 + rnd(H, scale=0.1)
    W[p + "post_attention_layernorm.weight"] = 1 + rnd(H, scale=0.1)
    W[p + "self_attn.q_proj.weight"] = rnd(NH * HD, H, scale=H ** -0.5)
    W[p + "self_attn.k_proj.weight"] = rnd(NKV * HD, H, scale=H ** -0.5)
    W[p + "self_attn.v_proj.weight"] = rnd(NKV * HD, H, scale=H ** -0.5)
    W[p + "self_attn.o_proj.weight"] = rnd(H, NH * HD, scale=H ** -0.5)
    W[p + "mlp.gate_proj.weight"] = rnd(FF, H, scale=H ** -0.5)
    W[p + "mlp.up_proj.weight"] = rnd(FF, H, scale=H ** -0.5)
    W[p + "mlp.down_proj.weight"] = rnd(H, FF, scale=FF ** -0.5)
W = {k: v.to(torch.float32).to(f64) for k, v in W.items()}  # exactly representable in float32

# llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
def permute(weights, n_head, n_head_kv):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))

gg = {"token_embd.weight": W["model.embed_tokens.weight"], "output_norm.weight": W["model.norm.weight"],
      "output.weight": W["lm_head.weight"]}
names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
for i in range(L):
    p = f"model.layers.{i}."
    gg[f"blk.{i}.attn_norm.weight"] = W[p + "input_layernorm.weight"]
    gg[f"blk.{i}.ffn_norm.weight"] = W[p + "post_attention_layernorm.weight"]
    for hf, g in names.items():
        w = W[p + hf + ".weight"]
        if hf == "self_attn.q_proj":
            w = permute(w, NH, NH)
        elif hf == "self_attn.k_proj":
            w = permute(w, NH, NKV)
        gg[f"blk.{i}.{g}.weight"] = w
index, blob = {}, bytearray()
for name, t in gg.items():
    data = t.to(torch.float32).contiguous().numpy().tobytes()
    index[name] = {"shape": list(t.shape), "offset": len(blob)}
    blob += data
json.dump({"hparams": {"hidden": H, "heads": NH, "kv_heads": NKV, "layers": L, "ff": FF, "vocab": V,
                       "rope_theta": THETA, "eps": EPS}, "tensors": index}, open(os.path.join(out, "base.json"), "w"))
open(os.path.join(out, "base.bin"), "wb").write(bytes(blob))

# Adapters in Hugging Face layout (float32 values, deltas in float64).
MODS = ["q", "k", "v", "o", "gate", "up", "down"]
def hf_module(i, m):
    return f"model.layers.{i}." + ("self_attn." if m in "qkvo" else "mlp.") + m + "_proj"
def shape_of(i, m):
    w = W[hf_module(i, m) + ".weight"]
    return w.shape[0], w.shape[1]  # out, in

def make(kind):
    sd, delta = {}, {}
    for i in range(L):
        for m in MODS:
            o, n = shape_of(i, m)
            key = "base_model.model." + hf_module(i, m)
            s = ALPHA / R
            if kind == "fa":
                idx = torch.randperm(n)[:R]
                B = rnd(o, R, scale=0.2).to(torch.float32)
                sd[key + ".lora_A"] = idx.to(torch.int64)
                sd[key + ".lora_B.weight"] = B
                d = torch.zeros(o, n, dtype=f64)
                d[:, idx] += B.to(f64) * s
            elif kind == "fb":
                idx = torch.randperm(o)[:R]
                A = rnd(R, n, scale=0.2).to(torch.float32)
                sd[key + ".lora_A.weight"] = A
                sd[key + ".lora_B"] = idx.to(torch.int64)
                d = torch.zeros(o, n, dtype=f64)
                d[idx, :] += A.to(f64) * s
            else:
                A = rnd(R, n, scale=0.2).to(torch.float32)
                B = rnd(o, R, scale=0.2).to(torch.float32)
                sd[key + ".lora_A.weight"] = A
                sd[key + ".lora_B.weight"] = B
                d = B.to(f64) @ A.to(f64) * s
            delta[hf_module(i, m) + ".weight"] = d
    return sd, delta

def config(peft_type, name):
    c = {"peft_type": peft_type, "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
    if name:
        c["adapter_name"] = name
    return c

def save_dir(d, sd, cfg, safetensors=False):
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "adapter_config.json"), "w"))
    if not safetensors:
        torch.save(sd, os.path.join(d, "adapter_model.bin"))
        return
    header, body = {}, bytearray()
    for k, v in sd.items():
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    h = json.dumps(header).encode()
    with open(os.path.join(d, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes(body))

adapters = {}
sd, adapters["fa"] = make("fa"); save_dir(os.path.join(out, "fa"), sd, config("SBORA", "sbora_fa"))
sd, adapters["fb"] = make("fb"); save_dir(os.path.join(out, "fb"), sd, config("SBORA", "sbora_fb"))
sd, adapters["qsbora"] = make("fa"); save_dir(os.path.join(out, "qsbora", "adapter_model", "SB_FA_sampleMul"), sd, config("LORA", None))
sd, adapters["lora"] = make("lora"); save_dir(os.path.join(out, "lora"), sd, config("LORA", None), safetensors=True)

# Hugging Face LLaMA forward in float64.
def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w

def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)

def forward(tokens, delta):
    w = lambda k: W[k] + delta.get(k, 0)
    T = len(tokens)
    h = W["model.embed_tokens.weight"][tokens]
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2, dtype=f64) / HD)
    freqs = torch.arange(T, dtype=f64)[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    mask = torch.full((T, T), float("-inf"), dtype=f64).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = (x @ w(p + "self_attn.q_proj.weight").T).view(T, NH, HD)
        k = (x @ w(p + "self_attn.k_proj.weight").T).view(T, NKV, HD)
        v = (x @ w(p + "self_attn.v_proj.weight").T).view(T, NKV, HD)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = k.repeat_interleave(NH // NKV, dim=1), v.repeat_interleave(NH // NKV, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / HD ** 0.5 + mask
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(T, NH * HD)
        h = h + o @ w(p + "self_attn.o_proj.weight").T
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        g, u = x @ w(p + "mlp.gate_proj.weight").T, x @ w(p + "mlp.up_proj.weight").T
        h = h + (torch.nn.functional.silu(g) * u) @ w(p + "mlp.down_proj.weight").T
    return rms(h, W["model.norm.weight"]) @ W["lm_head.weight"].T

tokens = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5, 33, 201]
ref = {"tokens": tokens, "logits": {"base": forward(tokens, {}).tolist()}}
for name, d in adapters.items():
    ref["logits"][name] = forward(tokens, d).tolist()
json.dump(ref, open(os.path.join(out, "reference.json"), "w"))
print("fixtures written to", out)
