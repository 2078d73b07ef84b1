"""A compact Llama-family decoder (the families of `families.py`) built from an HF checkpoint.

One definition serves the ONNX export (explicit KV inputs/outputs, the runtime owns the cache) and
the PyTorch runtimes. Rotary frequencies are taken from the HF model itself, so every rope scaling
type HF supports (default, linear, llama3, ...) is reproduced exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .families import features
from .shape import ModelShape, shape_of


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if hasattr(nn.functional, "rms_norm") and not torch.onnx.is_in_onnx_export():
            xf = nn.functional.rms_norm(xf, (xf.shape[-1],), eps=self.eps)  # one fused kernel
        else:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _linear(*layers: nn.Linear) -> nn.Linear:
    """One linear computing the given ones side by side (fused q/k/v, fused gate/up): one matrix
    product per step instead of several."""
    has_bias = any(lin.bias is not None for lin in layers)
    out = nn.Linear(layers[0].in_features, sum(lin.out_features for lin in layers), bias=has_bias)
    out.weight = nn.Parameter(torch.cat([lin.weight.detach() for lin in layers]).clone(), requires_grad=False)
    if has_bias:
        bias = [
            lin.bias.detach() if lin.bias is not None else torch.zeros(lin.out_features, dtype=lin.weight.dtype)
            for lin in layers
        ]
        out.bias = nn.Parameter(torch.cat(bias).clone(), requires_grad=False)
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, shape: ModelShape, eps: float):
        super().__init__()
        a, m = hf_layer.self_attn, hf_layer.mlp
        self.qkv_proj, self.o = _linear(a.q_proj, a.k_proj, a.v_proj), _linear(a.o_proj)
        self.gate_up, self.down = _linear(m.gate_proj, m.up_proj), _linear(m.down_proj)
        self.ln1 = RMSNorm(hf_layer.input_layernorm.weight, eps)
        self.ln2 = RMSNorm(hf_layer.post_attention_layernorm.weight, eps)
        self.h, self.hkv, self.d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        q_norm = getattr(a, "q_norm", None)  # Qwen3: RMSNorm over each q and k head, before the rotary
        self.q_norm = RMSNorm(q_norm.weight, eps) if q_norm is not None else None
        self.k_norm = RMSNorm(a.k_norm.weight, eps) if q_norm is not None else None

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,T,E] -> q [B,H,T,D], k/v [B,Hkv,T,D] with rotary applied to q and k."""
        b, t, _ = x.shape
        heads = self.qkv_proj(x).view(b, t, self.h + 2 * self.hkv, self.d)
        qk, v = heads[:, :, : self.h + self.hkv], heads[:, :, self.h + self.hkv :]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, : self.h]), self.k_norm(qk[:, :, self.h :])], dim=2)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        qk = qk * cos + rotate_half(qk) * sin  # rotary on all q and k heads at once
        return (qk[:, :, : self.h].transpose(1, 2), qk[:, :, self.h :].transpose(1, 2), v.transpose(1, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention; q [B,H,T,D], k/v [B,Hkv,S,D], bias [B,1,T,S] additive.
        The G query heads of a KV head are stacked as rows, so K/V are read once, never repeated."""
        b, _, t, d = q.shape
        g = self.h // self.hkv
        qg = q.reshape(b, self.hkv, g * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * (d**-0.5)  # [B,Hkv,G*T,S]
        bias_g = bias.unsqueeze(2).expand(b, 1, g, t, bias.shape[-1]).reshape(b, 1, g * t, bias.shape[-1])
        probs = torch.softmax(scores.float() + bias_g, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [B,Hkv,G*T,D]
        return out.reshape(b, self.h, t, d).transpose(1, 2).reshape(b, t, self.h * d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class CausalLM(nn.Module):
    """Weights + rotary table; `forward` is the export signature with explicit past/new KV."""

    def __init__(self, hf_model):
        super().__init__()
        c = hf_model.config
        self.features = features(c)  # raises for a family or feature the decoder does not reproduce
        self.shape = shape_of(hf_model)
        base = hf_model.model
        eps = c.rms_norm_eps
        self.embed = nn.Parameter(base.embed_tokens.weight.detach().clone(), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(layer, self.shape, eps) for layer in base.layers)
        self.norm = RMSNorm(base.norm.weight, eps)
        self.lm_head = nn.Parameter(hf_model.lm_head.weight.detach().clone(), requires_grad=False)
        rot = base.rotary_emb
        self.register_buffer("inv_freq", rot.inv_freq.detach().float().clone(), persistent=False)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.norm(hidden), self.lm_head.t()).float()

    def forward(self, input_ids, position_ids, attn_bias, last_index, past_k, past_v):
        """input_ids/position_ids [B,T]; attn_bias [B,1,T,P+T]; last_index [B]; past_k/v [L,B,Hkv,P,D].
        Returns logits at last_index [B,V] and the new keys/values [L,B,Hkv,T,D]."""
        x = nn.functional.embedding(input_ids, self.embed)
        cos, sin = self.rotary(position_ids, x.dtype)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.ln1(x), cos, sin)
            new_k.append(k)
            new_v.append(v)
            k_all = torch.cat([past_k[i], k], dim=2)
            v_all = torch.cat([past_v[i], v], dim=2)
            x = x + layer.o(layer.attend(q, k_all, v_all, attn_bias))
            x = x + layer.mlp(layer.ln2(x))
        idx = last_index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        last = torch.gather(x, 1, idx).squeeze(1)
        return self.logits(last), torch.stack(new_k), torch.stack(new_v)


def load_hf(checkpoint: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    return model.eval()


ENGINE_FILE = "model.pt"


def save_engine_model(checkpoint: Path, engine_dir: Path, dtype: str) -> Path:
    """Build step for torch-cuda: our module with its weights in `dtype` ("bfloat16", ...), loadable
    with torch alone (no transformers needed where the repository is served)."""
    engine_dir.mkdir(parents=True, exist_ok=True)
    model = CausalLM(load_hf(checkpoint, dtype=getattr(torch, dtype)))
    model.shape.save(engine_dir / "model_shape.json")
    torch.save(model, engine_dir / ENGINE_FILE)
    return engine_dir


def load_engine_model(engine_dir: Path, dtype: torch.dtype) -> CausalLM:
    if (engine_dir / ENGINE_FILE).exists():
        return torch.load(engine_dir / ENGINE_FILE, weights_only=False, map_location="cpu")
    return CausalLM(load_hf(engine_dir, dtype=dtype))
