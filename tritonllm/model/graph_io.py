"""The exported graph's interface, shared by the ONNX export and the runtimes that run the graph
(ONNX Runtime, TensorRT). numpy only.

Inputs: input_ids, position_ids [B,T] int64; attn_bias [B,1,T,P+T] float32; last_index [B]
int64; past_keys/past_values [L,B,Hkv,P,D]. Outputs: logits [B,V] float32 at last_index, and
new_keys/new_values [L,B,Hkv,T,D]. The same graph does prefill (P=0) and decode (T=1); the runtime
owns the preallocated cache and writes the new keys/values into it."""

from __future__ import annotations

import numpy as np

INPUTS = ["input_ids", "position_ids", "attn_bias", "last_index", "past_keys", "past_values"]
OUTPUTS = ["logits", "new_keys", "new_values"]
NEG = -1e9


def causal_bias(past_lens: np.ndarray, new_lens: np.ndarray, p: int, t: int) -> np.ndarray:
    """Additive attention bias [B,1,T,P+T]: row b sees its first past_lens[b] cached positions and
    the new tokens causally, up to new_lens[b] real (non-padding) tokens."""
    b = len(past_lens)
    bias = np.full((b, 1, t, p + t), NEG, dtype=np.float32)
    cols = np.arange(p)
    tri = np.tril(np.ones((t, t), dtype=bool))
    for i in range(b):
        bias[i, 0, :, :p][:, cols < past_lens[i]] = 0.0
        new = tri.copy()
        new[:, new_lens[i] :] = False
        bias[i, 0, :, p:][new] = 0.0
    return bias


def prefill_feed(ids: list[int], num_layers: int, kv_heads: int, head_dim: int, kv_dtype=np.float32) -> dict:
    """The graph's inputs (in INPUTS order) for one prompt's prefill from an empty cache."""
    t = len(ids)
    empty = np.zeros((num_layers, 1, kv_heads, 0, head_dim), dtype=kv_dtype)
    return {
        "input_ids": np.array([ids], dtype=np.int64),
        "position_ids": np.arange(t, dtype=np.int64)[None],
        "attn_bias": causal_bias(np.array([0]), np.array([t]), 0, t),
        "last_index": np.array([t - 1], dtype=np.int64),
        "past_keys": empty,
        "past_values": empty,
    }
