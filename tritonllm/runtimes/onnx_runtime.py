"""ONNX Runtime (CPU, the embedded default) over the exported graph with the host KV cache."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import EngineConfig
from ..modeling import ModelShape
from ..onnx_export import OUTPUTS, causal_bias
from .base import KVCache, StepInput, step_by_kind

log = logging.getLogger(__name__)


class OnnxRuntime:
    chunked_prefill = True  # step() takes a prompt piece at any start (the graph reads the cached past)

    def __init__(self, engine_dir: Path, cfg: EngineConfig, providers: list[str] | None = None):
        import onnxruntime as ort

        self.shape = ModelShape.load(Path(engine_dir) / "model_shape.json")
        self.max_slots, self.max_context = cfg.max_slots, cfg.max_context
        opts = ort.SessionOptions()
        if cfg.threads:
            opts.intra_op_num_threads = cfg.threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(Path(engine_dir) / "model.onnx"), opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.cache = KVCache(self.shape, cfg.max_slots, cfg.max_context)

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "providers": self.session.get_providers(), "slots": self.max_slots,
                "max_context": self.max_context, "kv_cache_bytes": self.cache.nbytes}

    def step(self, inputs: list[StepInput]) -> np.ndarray:
        """Decode rows (one token each) run as one batch; each prefill runs on its own."""
        return step_by_kind(inputs, self._run, np.empty((len(inputs), self.shape.vocab_size), dtype=np.float32))

    def _run(self, rows: list[StepInput]) -> np.ndarray:
        b, t = len(rows), max(len(r.tokens) for r in rows)
        p = max(r.start for r in rows)
        ids = np.zeros((b, t), dtype=np.int64)
        pos = np.zeros((b, t), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, :len(r.tokens)] = r.tokens
            pos[i] = np.arange(r.start, r.start + t)
        counts = [len(r.tokens) for r in rows]
        past_k, past_v = self.cache.gather([r.slot for r in rows], p)
        feed = {"input_ids": ids, "position_ids": pos,
                "attn_bias": causal_bias(np.array([r.start for r in rows]), np.array(counts), p, t),
                "last_index": np.array(counts, dtype=np.int64) - 1, "past_keys": past_k, "past_values": past_v}
        logits, new_k, new_v = self.session.run(OUTPUTS, feed)
        self.cache.update([r.slot for r in rows], [r.start for r in rows], counts, new_k, new_v)
        return logits
