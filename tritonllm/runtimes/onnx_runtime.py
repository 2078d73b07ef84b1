"""ONNX Runtime (CPU, the embedded default) over the exported graph with the host KV cache."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import EngineConfig
from ..model.graph_io import OUTPUTS, causal_bias
from ..model.shape import ModelShape
from .base import Runtime, RuntimeCapabilities, RuntimeStats, StepInput
from .host_kv import staged, step_by_kind
from .paged_kv import BLOCK_SIZE, PagedAdmission, PagedKVCache

log = logging.getLogger(__name__)
PAST_ROUND = 16  # a decode batch's staged past grows in steps of this many positions


class DecodeStaging:
    """A decode batch's past keys/values kept between steps in the layout the graph reads ([L, B,
    Hkv, P, D], P rounded up to PAST_ROUND): while the batch's slots stay the same, a step writes
    each row's new position into it instead of copying the whole past out of the slot cache again
    (at long pasts that copy is a large share of a decode step: docs/decisions.md). Positions
    past a row's length are masked by the attention bias. Any other run (a prefill) drops it: it
    may have written a staged slot."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.key: tuple | None = None  # (slots, positions) the staged arrays hold
        self._flat = (np.empty(0, cache.keys.dtype), np.empty(0, cache.keys.dtype))
        self.past: tuple = ()

    def invalidate(self) -> None:
        self.key = None

    def past_for(self, slots: list[int], need: int) -> tuple[np.ndarray, np.ndarray]:
        """[L, B, Hkv, P, D] keys and values of `slots`, P >= need (copied from the cache only when
        the slots changed or P must grow)."""
        if self.key is None or self.key[0] != tuple(slots) or self.key[1] < need:
            c = self.cache
            p = min(-(-need // PAST_ROUND) * PAST_ROUND, c.max_context)
            self._flat, out = staged(self._flat, (c.layers, len(slots), c.kv_heads, p, c.head_dim))
            self.past = self.cache.gather(slots, p, out=out)
            self.key = (tuple(slots), p)
        return self.past

    def record(self, starts: list[int], new_keys: np.ndarray, new_values: np.ndarray) -> None:
        """Each row's new keys/values [L, B, Hkv, 1, D] at its position."""
        for b, start in enumerate(starts):
            self.past[0][:, b, :, start] = new_keys[:, b, :, 0]
            self.past[1][:, b, :, start] = new_values[:, b, :, 0]


class OnnxRuntime(PagedAdmission, Runtime):
    capabilities = RuntimeCapabilities(prompt_pieces=True, prompts_in_turn=True)  # the graph reads the cached past

    def __init__(self, engine_dir: Path, cfg: EngineConfig, providers: list[str] | None = None):
        import onnxruntime as ort

        from ..build.quantize_onnx import check_scheme

        scheme = check_scheme(engine_dir, cfg.quantization)
        self.shape = ModelShape.load(Path(engine_dir) / "model_shape.json")
        self.max_slots, self.max_context, self.quantization = cfg.max_slots, cfg.max_context, scheme
        opts = ort.SessionOptions()
        if cfg.threads:
            opts.intra_op_num_threads = cfg.threads
        if not cfg.ort_spin_wait:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if not cfg.ort_spins_after_run:
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(Path(engine_dir) / "model.onnx"), opts, providers=providers or ["CPUExecutionProvider"]
        )
        self.cache = PagedKVCache(
            self.shape, cfg.max_slots, cfg.max_context, cfg.prefix_cache, tokens=cfg.kv_cache_tokens
        )
        self.blocks = self.cache.blocks
        self.staging = DecodeStaging(self.cache)

    def describe(self) -> dict:
        return {
            "runtime": "onnxruntime",
            "providers": self.session.get_providers(),
            "slots": self.max_slots,
            "max_context": self.max_context,
            "kv_cache_bytes": self.cache.nbytes,
            "quantization": self.quantization,
            "kv_block_size": BLOCK_SIZE,
            "kv_cache_tokens": self.blocks.pool.size * BLOCK_SIZE,
            "prefix_cache": self.cache.prefix_cache,
        }

    def stats(self) -> RuntimeStats:
        return RuntimeStats(**self.blocks.counts())

    def step(self, inputs: list[StepInput]) -> np.ndarray:
        """Decode rows (one token each) run as one batch; each prefill runs on its own."""
        return step_by_kind(inputs, self._run, np.empty((len(inputs), self.shape.vocab_size), dtype=np.float32))

    def _run(self, rows: list[StepInput]) -> np.ndarray:
        if not (len(rows[0].tokens) == 1 and rows[0].start > 0):  # a prefill: its cached prefix is not computed
            rows = [self._after_cached_prefix(r) for r in rows]
        b, t = len(rows), max(len(r.tokens) for r in rows)
        slots, starts = [r.slot for r in rows], [r.start for r in rows]
        ids = np.zeros((b, t), dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r.tokens)] = r.tokens
            pos[i] = np.arange(r.start, r.start + t)
        counts = [len(r.tokens) for r in rows]
        decode = t == 1 and min(starts) > 0
        if decode:
            past_k, past_v = self.staging.past_for(slots, max(starts) + 1)
        else:
            self.staging.invalidate()
            past_k, past_v = self.cache.gather(slots, max(starts))
        feed = {
            "input_ids": ids,
            "position_ids": pos,
            "attn_bias": causal_bias(np.array(starts), np.array(counts), past_k.shape[3], t),
            "last_index": np.array(counts, dtype=np.int64) - 1,
            "past_keys": past_k,
            "past_values": past_v,
        }
        logits, new_k, new_v = self.session.run(OUTPUTS, feed)
        self.cache.update(slots, starts, [r.tokens for r in rows], new_k, new_v)
        if decode:
            self.staging.record(starts, new_k, new_v)
        return logits

    def _after_cached_prefix(self, row: StepInput) -> StepInput:
        reused = self.cache.begin(row.slot, row.start, row.tokens)
        return StepInput(row.slot, row.tokens[reused:], row.start + reused) if reused else row
