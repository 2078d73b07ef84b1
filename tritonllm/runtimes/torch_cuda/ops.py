"""Torch-op pieces of the forward passes (forward.py): norms, attention over a decode row's or a
prompt's keys, masks, the rotary table the fused kernels gather from, and the rows of a product's
input in any of its forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.modeling import CausalLM
from ..kernels.rows import Normed, QuantRows

NEG = -1e9


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """One kernel (the module's RMSNorm casts to float and back around it: four); Gemma's (1 + w)
    norm scales before its cast, which this kernel cannot, so it keeps the module's ops."""
    return norm(x) if norm.offset else F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def attend_decode(layer, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
    """q [B,H,1,D] against cached keys/values [B,Hkv,C,D] where valid [B,1,1,C]: one fused attention
    kernel. The G query heads of a KV head are its rows, so K/V are read once (no GQA repeat).
    Soft-capped scores (Gemma 2) take the module's reference ops."""
    b, h, _, d = q.shape
    if layer.softcap is not None:
        return layer.attend(q, keys, values, torch.where(valid, 0.0, NEG))
    qg = q.reshape(b, layer.hkv, h // layer.hkv, d)
    return F.scaled_dot_product_attention(qg, keys, values, attn_mask=valid, scale=layer.scale).reshape(b, 1, h * d)


def causal_mask(t: int, window: int | None, device) -> torch.Tensor:
    """[t, t] True where query i may see key j: j <= i, and i - j < window where one is set."""
    i, j = torch.arange(t, device=device)[:, None], torch.arange(t, device=device)[None, :]
    return (j <= i) & ((i - j) < window) if window else j <= i


def attend_prompt(layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over right-padded prompts' new tokens [B,*,T,D] -> [B,T,H*D] (a padding
    key is never before a real query, so causality alone masks it)."""
    b, _, t, _ = q.shape
    if layer.softcap is not None:
        return layer.attend(q, k, v, torch.where(causal_mask(t, layer.window, q.device), 0.0, NEG).expand(b, 1, t, t))
    mask = causal_mask(t, layer.window, q.device) if layer.window and layer.window < t else None
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scale, enable_gqa=True
    )
    return out.transpose(1, 2).reshape(b, t, -1)


def rows_of(x) -> int:
    """The rows of a product's input: a tensor [..., E], rows rounded per row, or a `Normed` one."""
    if isinstance(x, Normed):
        return x.residual.numel() // x.residual.shape[-1]
    return x.rows if isinstance(x, QuantRows) else x.numel() // x.shape[-1]


class RotaryTable:
    """(cos, sin) of every position the cache holds, per rotary table, made once by the model's own
    ops: a decode step or a step of prompt pieces gathers its rows' in one kernel, where computing
    them took nine (cast, product, concatenation, cos, sin, and a scale and a cast of each)."""

    def __init__(self, model: CausalLM, positions: int, dtype: torch.dtype, device):
        at = torch.arange(positions, device=device)[:, None]
        self.tables = [torch.cat(model.rotary(at, dtype, i), -1)[:, 0] for i in range(len(model.rope_scales))]

    def __call__(self, positions: torch.Tensor) -> list[tuple]:
        """positions [b] -> [(cos, sin) [b, 1, D] of each table]: views of one gathered [b, 1, 2D]."""
        out = []
        for table in self.tables:
            rows, d = table[positions][:, None], table.shape[-1] // 2
            out.append((rows[..., :d], rows[..., d:]))
        return out
