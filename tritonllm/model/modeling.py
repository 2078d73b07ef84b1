"""One compact decoder for every family of `families.py`, built from an HF checkpoint; what differs
between families (norm style, MLP activation, windows, soft-capping, ...) is read from `Features`.

One definition serves the ONNX export (explicit KV inputs/outputs, the runtime owns the cache) and
the PyTorch runtimes. Rotary frequencies are taken from the HF model itself, so every rope scaling
type HF supports (default, linear, llama3, ...) is reproduced exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .families import Features, features
from .shape import ModelShape, shape_of

NEG = -1e9


class RMSNorm(nn.Module):
    """Llama's RMSNorm (cast to the model's dtype, then scaled by w) or, with `offset` 1, Gemma's
    (scaled by 1 + w in fp32, then cast): the two round differently in bf16."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if hasattr(nn.functional, "rms_norm") and not torch.onnx.is_in_onnx_export():
            xf = nn.functional.rms_norm(xf, (xf.shape[-1],), eps=self.eps)  # one fused kernel
        else:
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).to(x.dtype)
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


def _fused(module: nn.Module, fused_name: str, *names: str) -> nn.Linear:
    """The module's fused projection (Phi-3 ships qkv_proj / gate_up_proj) or its parts, fused."""
    whole = getattr(module, fused_name, None)
    return _linear(whole) if whole is not None else _linear(*(getattr(module, n) for n in names))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on the first cos.shape[-1] dims of each head (all of them, or Phi's partial rotary)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat([rot * cos + rotate_half(rot) * sin, x[..., r:]], dim=-1)


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "gelu_tanh":
        return nn.functional.gelu(x, approximate="tanh")
    return nn.functional.gelu(x) if name == "gelu" else nn.functional.silu(x)


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer, shape: ModelShape, eps: float, feats: Features, index: int):
        super().__init__()
        a, m = hf_layer.self_attn, hf_layer.mlp
        self.qkv_proj, self.o = _fused(a, "qkv_proj", "q_proj", "k_proj", "v_proj"), _linear(a.o_proj)
        self.gate_up, self.down = _fused(m, "gate_up_proj", "gate_proj", "up_proj"), _linear(m.down_proj)

        def norm(source):
            return RMSNorm(source.weight, eps, feats.norm_offset) if source is not None else None

        sandwich = feats.sandwich_norms  # Gemma 2/3: post_attention_layernorm is the attention output's
        self.ln1 = norm(hf_layer.input_layernorm)
        self.ln2 = norm(hf_layer.pre_feedforward_layernorm if sandwich else hf_layer.post_attention_layernorm)
        self.post_attention = norm(hf_layer.post_attention_layernorm) if sandwich else None
        self.post_mlp = norm(hf_layer.post_feedforward_layernorm) if sandwich else None
        self.q_norm, self.k_norm = norm(getattr(a, "q_norm", None)), norm(getattr(a, "k_norm", None))
        self.h, self.hkv, self.d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        self.window = feats.window(index)
        self.scale = feats.attn_scale or self.d**-0.5
        self.softcap, self.activation = feats.attn_softcap, feats.activation

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B,T,E] -> q [B,H,T,D], k/v [B,Hkv,T,D] with rotary applied to q and k."""
        b, t, _ = x.shape
        heads = self.qkv_proj(x).view(b, t, self.h + 2 * self.hkv, self.d)
        qk, v = heads[:, :, : self.h + self.hkv], heads[:, :, self.h + self.hkv :]
        if self.q_norm is not None:  # Qwen3, Gemma 3: RMSNorm over each q and k head, before the rotary
            qk = torch.cat([self.q_norm(qk[:, :, : self.h]), self.k_norm(qk[:, :, self.h :])], dim=2)
        qk = apply_rotary(qk, cos.unsqueeze(2), sin.unsqueeze(2))  # all q and k heads at once
        return (qk[:, :, : self.h].transpose(1, 2), qk[:, :, self.h :].transpose(1, 2), v.transpose(1, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention; q [B,H,T,D], k/v [B,Hkv,S,D], bias [B,1,T,S] additive.
        The G query heads of a KV head are stacked as rows, so K/V are read once, never repeated."""
        b, _, t, d = q.shape
        g = self.h // self.hkv
        qg = q.reshape(b, self.hkv, g * t, d)
        scores = torch.matmul(qg, k.transpose(-1, -2)) * self.scale  # [B,Hkv,G*T,S]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        bias_g = bias.unsqueeze(2).expand(b, 1, g, t, bias.shape[-1]).reshape(b, 1, g * t, bias.shape[-1])
        probs = torch.softmax(scores.float() + bias_g, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)  # [B,Hkv,G*T,D]
        return out.reshape(b, self.h, t, d).transpose(1, 2).reshape(b, t, self.h * d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(activate(self.activation, gate) * up)

    def after_attention(self, y: torch.Tensor) -> torch.Tensor:
        """The attention output as added to the residual stream (normed first in Gemma 2/3)."""
        return self.post_attention(y) if self.post_attention is not None else y

    def after_mlp(self, y: torch.Tensor) -> torch.Tensor:
        return self.post_mlp(y) if self.post_mlp is not None else y


def window_bias(bias: torch.Tensor, position_ids: torch.Tensor, window: int) -> torch.Tensor:
    """`bias` [B,1,T,P+T] with keys `window` or more positions behind the query masked; past column
    j holds position j and the new tokens' positions are `position_ids` [B,T]."""
    b, t = position_ids.shape
    past = torch.arange(bias.shape[-1] - t, device=bias.device).unsqueeze(0).expand(b, -1)
    keys = torch.cat([past, position_ids], dim=1)
    far = (position_ids.unsqueeze(-1) - keys.unsqueeze(1)) >= window  # [B,T,P+T]
    return bias.masked_fill(far.unsqueeze(1), NEG)


def _rotary_tables(rot, feats: Features) -> tuple[list[str], list[torch.Tensor], list[float]]:
    """HF's rotary frequencies and attention scaling, one table per layer type where the model has
    them (Gemma 3: local and global), else one; (layer types, inverse frequencies, scales)."""
    if not feats.rope_per_layer_type:
        return [], [rot.inv_freq], [float(getattr(rot, "attention_scaling", 1.0))]
    kinds = sorted(set(feats.layer_types))
    freqs = [getattr(rot, f"{k}_inv_freq") for k in kinds]
    return kinds, freqs, [float(getattr(rot, f"{k}_attention_scaling")) for k in kinds]


class CausalLM(nn.Module):
    """Weights + rotary tables; `forward` is the export signature with explicit past/new KV."""

    def __init__(self, hf_model):
        super().__init__()
        c = hf_model.config
        self.features = feats = features(c)  # raises for a family or feature the decoder does not reproduce
        self.shape = shape_of(hf_model)
        base = hf_model.model
        eps = c.rms_norm_eps
        self.embed = nn.Parameter(base.embed_tokens.weight.detach().clone(), requires_grad=False)
        self.layers = nn.ModuleList(
            DecoderLayer(layer, self.shape, eps, feats, i) for i, layer in enumerate(base.layers)
        )
        self.norm = RMSNorm(base.norm.weight, eps, feats.norm_offset)
        self.lm_head = nn.Parameter(hf_model.lm_head.weight.detach().clone(), requires_grad=False)
        self.quant_head = None  # the LM head as a QuantLinear where the build quantized it (quant.quantize_head)
        kinds, freqs, self.rope_scales = _rotary_tables(base.rotary_emb, feats)
        self.register_buffer("inv_freq", torch.stack([f.detach().float() for f in freqs]), persistent=False)
        self.layer_rope = [kinds.index(k) if kinds else 0 for k in feats.layer_types]  # each layer's table

    def kernel_gaps(self) -> list[str]:
        """What of this model the fused decode kernels do not compute: a partial rotary (they rotate
        whole heads) or a head size that is not a power of two (their tiles)."""
        d = self.shape.head_dim
        gaps = ["partial rotary"] if self.inv_freq.shape[-1] * 2 != d else []
        return gaps + ([f"head_dim {d} (not a power of two)"] if d & (d - 1) else [])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = nn.functional.embedding(ids, self.embed)
        if self.features.embed_scale is not None:  # Gemma scales by sqrt(hidden) rounded to the model's dtype
            x = x * torch.tensor(self.features.embed_scale, dtype=x.dtype)
        return x

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype, table: int = 0):
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq[table]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.rope_scales[table]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def rotaries(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
        """(cos, sin) of each rotary table; layer i reads `rotaries(...)[self.layer_rope[i]]`."""
        return [self.rotary(position_ids, dtype, i) for i in range(len(self.rope_scales))]

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.features.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight as stored [vocab, hidden] and its per-row scale (None: unquantized)."""
        if self.quant_head is None:
            return self.lm_head, None
        return self.quant_head.qweight, self.quant_head.scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.norm(hidden)
        raw = torch.matmul(h, self.lm_head.t()) if self.quant_head is None else self.quant_head(h)
        return self.cap_logits(raw.float())

    def forward(self, input_ids, position_ids, attn_bias, last_index, past_k, past_v):
        """input_ids/position_ids [B,T]; attn_bias [B,1,T,P+T]; last_index [B]; past_k/v [L,B,Hkv,P,D].
        Returns logits at last_index [B,V] and the new keys/values [L,B,Hkv,T,D]."""
        x = self.embed_tokens(input_ids)
        rot = self.rotaries(position_ids, x.dtype)
        windows = {w: window_bias(attn_bias, position_ids, w) for w in {layer.window for layer in self.layers} if w}
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv(layer.ln1(x), *rot[self.layer_rope[i]])
            new_k.append(k)
            new_v.append(v)
            k_all = torch.cat([past_k[i], k], dim=2)
            v_all = torch.cat([past_v[i], v], dim=2)
            bias = windows[layer.window] if layer.window else attn_bias
            x = x + layer.after_attention(layer.o(layer.attend(q, k_all, v_all, bias)))
            x = x + layer.after_mlp(layer.mlp(layer.ln2(x)))
        idx = last_index.view(-1, 1, 1).expand(-1, 1, x.shape[-1])
        last = torch.gather(x, 1, idx).squeeze(1)
        return self.logits(last), torch.stack(new_k), torch.stack(new_v)


def load_hf(checkpoint: Path, dtype: torch.dtype = torch.float32, attention: str = "eager"):
    """The HF model; by default with its eager attention, the reference math that exports and tests
    are checked against (HF's SDPA path skips Gemma 2's score soft-capping). Benchmarks of HF itself
    pass attention="sdpa", its default."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attention)
    return model.eval()


ENGINE_FILE = "model.pt"


def save_engine_model(
    checkpoint: Path,
    engine_dir: Path,
    dtype: str,
    quantization: str = "none",
    calibration: list | None = None,
    calibration_source: str = "",
    quantize_head: bool = False,
) -> Path:
    """Build step for torch-cuda: our module with its weights in `dtype` ("bfloat16", ...), its
    projections quantized once here when asked (`quant.SCHEMES`), loadable with torch alone (no
    transformers needed where the repository is served). `calibration` (token-id prompts) rounds
    the weights with GPTQ, from an fp32 pass over those prompts; `quantize_head`: the LM head too
    (int8, absmax per vocabulary row: `quant.quantize_head`)."""
    import json

    from . import quant

    engine_dir.mkdir(parents=True, exist_ok=True)
    if quantization == "none":
        model, report = CausalLM(load_hf(checkpoint, dtype=getattr(torch, dtype))), {"scheme": "none"}
    elif calibration:
        model, report = _gptq_model(checkpoint, quantization, calibration)
        report["calibration_data"] = calibration_source
        quant.place(model, torch.device("cpu"), getattr(torch, dtype))
    else:
        model = CausalLM(load_hf(checkpoint, dtype=getattr(torch, dtype)))
        report = quant.quantize_model(model, quantization)
    if quantize_head:
        report.update(quant.quantize_head(model))
    model.shape.save(engine_dir / "model_shape.json")
    (engine_dir / "quantization.json").write_text(json.dumps(report, indent=1))
    torch.save(model, engine_dir / ENGINE_FILE)
    return engine_dir


def _gptq_model(checkpoint: Path, scheme: str, prompts: list[list[int]]) -> tuple[CausalLM, dict]:
    """The fp32 model with GPTQ-rounded projections, and the quantization report."""
    from .gptq import prompt_hessians
    from .quant import quantize_model

    model = CausalLM(load_hf(checkpoint)).eval()
    report = quantize_model(model, scheme, prompt_hessians(model, prompts))
    return model, {**report, "calibration_tokens": sum(len(p) for p in prompts)}


def load_engine_model(engine_dir: Path, dtype: torch.dtype) -> CausalLM:
    if (engine_dir / ENGINE_FILE).exists():
        return torch.load(engine_dir / ENGINE_FILE, weights_only=False, map_location="cpu")
    return CausalLM(load_hf(engine_dir, dtype=dtype))
