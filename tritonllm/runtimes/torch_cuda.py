"""PyTorch on NVIDIA GPUs: weights and a static KV cache resident on the device, bf16, decode
captured in CUDA graphs per (batch bucket, context bucket), sampling on the device.

Decode runs over slots 0..B-1 (the scheduler hands out the lowest free slot), so a decode batch
reads the cache through plain views: no gather, no host copies of the KV cache."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import EngineConfig
from ..modeling import CausalLM, load_engine_model
from . import torch_sampling
from .base import StepInput
from .torch_sampling import PinnedRing, StepDownloads, copy_to, to_device

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NEG = -1e9
PROJECTIONS = ("qkv_proj", "o", "gate_up", "down")  # a decoder layer's linears, by attribute name
PREFILL_GRAPH_TOKENS = 8192  # larger prefills launch eagerly: their GPU time (H100: 37 ms for 64 x 128
                             # tokens) hides the 12 ms of launches, and each graph's pool grows with it


def buckets(limit: int, start: int = 1) -> list[int]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket_for(n: int, sizes: list[int]) -> int:
    return next(b for b in sizes if b >= n)


class StaticKVCache:
    """[layers, slots, kv_heads, max_context, head_dim] keys and values on the device."""

    def __init__(self, shape, slots: int, max_context: int, dtype, device):
        dims = (shape.num_layers, slots, shape.num_kv_heads, max_context, shape.head_dim)
        self.keys = torch.zeros(dims, dtype=dtype, device=device)
        self.values = torch.zeros(dims, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_slot(shape, max_context: int, dtype) -> int:
        return 2 * shape.num_layers * shape.num_kv_heads * max_context * shape.head_dim * torch.empty((), dtype=dtype).element_size()

    def update(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B,Hkv,T,D] of slots `rows` [B] at positions [B,T]."""
        r = rows[:, None].expand_as(positions)
        self.keys[layer].permute(0, 2, 1, 3)[r, positions] = k.transpose(1, 2)
        self.values[layer].permute(0, 2, 1, 3)[r, positions] = v.transpose(1, 2)


def attend_decode(layer, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
    """q [B,H,1,D] against cached keys/values [B,Hkv,C,D] where valid [B,1,1,C]: one fused attention
    kernel. The G query heads of a KV head are its rows, so K/V are read once (no GQA repeat)."""
    b, h, _, d = q.shape
    qg = q.reshape(b, layer.hkv, h // layer.hkv, d)
    return F.scaled_dot_product_attention(qg, keys, values, attn_mask=valid).reshape(b, 1, h * d)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """One kernel (the model's RMSNorm casts to float and back around it: four)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class TorchCudaRuntime:
    def __init__(self, engine_dir: Path | None, cfg: EngineConfig, model: CausalLM | None = None,
                 use_cuda_graphs: bool = True, device: str = "cuda", fused_kernels: bool = True,
                 triton_kernels: bool | None = None, gemv_table: dict | None = None, capture_at_start: bool = True):
        self.device = torch.device(device)
        self.fused_kernels = fused_kernels  # False: the reference ops of modeling.py (profiling)
        self.dtype = DTYPES[cfg.dtype]
        if model is None:
            model = load_engine_model(Path(engine_dir), self.dtype)
        self.model = model.to(self.device, self.dtype).eval()
        self.model.inv_freq = self.model.inv_freq.float()
        self.shape = self.model.shape
        self.max_context = cfg.max_context
        self.max_slots = self._size_slots(cfg)
        self.scratch_slot = self.max_slots  # padding rows of a graph-replayed prefill write their K/V here
        self.cache = StaticKVCache(self.shape, self.max_slots + 1, cfg.max_context, self.dtype, self.device)
        self.batch_buckets = buckets(self.max_slots)
        self.prefill_batch_buckets = sorted({b for b in buckets(self.max_slots) + [3 * x // 2 for x in buckets(self.max_slots)]
                                             if 1 <= b <= self.max_slots})
        self.prefill_len_buckets = buckets(cfg.max_context, start=min(16, cfg.max_context))
        self.ctx_buckets = buckets(cfg.max_context, start=min(128, cfg.max_context))
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.triton_kernels = self._want_triton(triton_kernels)
        self._decode_body = self._decode_triton if self.triton_kernels else self._decode_graph_body
        self.gemv_table, self.gemv_report = self._choose_gemv(gemv_table)
        self.attention_table, self.attention_report = self._choose_attention()
        self.compiled = bool(cfg.torch_compile and self.device.type == "cuda")
        if self.compiled:  # fuses the many small kernels of a step
            self._decode_body = torch.compile(self._decode_graph_body, fullgraph=False, dynamic=False)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._prefill_graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._tokens = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
        self._uploads = self._downloads = None  # staging for positions and prompt ids up, sampled ids down
        if self.device.type == "cuda":
            self._uploads = PinnedRing(max(PREFILL_GRAPH_TOKENS, self.max_slots), depth=16)
            self._downloads = StepDownloads(self.max_slots * cfg.steps_per_launch)
        self.multi_step = True  # launch(..., steps=n) runs n decode steps on one host pass
        self._run_tokens = torch.zeros(cfg.steps_per_launch * self.max_slots, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
        self.prefill_tokens = [0, 0]  # prompt tokens prefilled, tokens computed for them (padding to buckets)
        self._in_order = [tuple(range(n)) for n in range(self.max_slots + 1)]  # slots 0..n-1, to compare with
        if self.use_cuda_graphs:  # every prefill graph writes its logits here (one buffer, not one each)
            self._prefill_logits = torch.empty((self.max_slots, self.shape.vocab_size), device=self.device, dtype=self.dtype)
            if capture_at_start:
                self.capture_all()

    def capture_all(self) -> None:
        """Capture every decode and prefill graph now: captured lazily, a bucket first met under
        load stalls the loop for its capture (measured: Triton TTFT p99 131 ms at 8 streams)."""
        t0 = time.perf_counter()
        for b in self.batch_buckets:
            for c in self.ctx_buckets:
                self._graph(b, c)
        for t in self.prefill_len_buckets:
            for b in self.prefill_batch_buckets:
                if b * t <= PREFILL_GRAPH_TOKENS:
                    self._prefill_graph(b, t)
        torch.cuda.synchronize(self.device)
        log.info("captured %d decode and %d prefill graphs in %.1f s", len(self._graphs), len(self._prefill_graphs),
                 time.perf_counter() - t0)

    def _want_triton(self, asked: bool | None) -> bool:
        """Fused OpenAI-Triton decode kernels on CUDA where `triton` imports and their start-up self
        check passes (H200: decode step 1.63 -> 1.08 ms at batch 1); TRITONLLM_TRITON_KERNELS=0 turns
        them off; `asked` forces the choice."""
        if asked is not None:
            return asked
        if not self.fused_kernels or self.device.type != "cuda" or os.environ.get("TRITONLLM_TRITON_KERNELS") == "0":
            return False
        try:
            from . import fused_kernels
            fused_kernels.self_check(self.device, self.dtype, self.model.shape.head_dim)
            return True
        except Exception as exc:  # no triton, or its kernels do not compile here: the torch ops serve
            log.warning("fused Triton decode kernels unavailable (%s): using the torch ops", str(exc)[:300])
            return False

    def _choose_gemv(self, given: dict | None) -> tuple[dict, list]:
        """{(weight kind, batch rows): tile config} for the fused decode step's small-batch products:
        `given`, or timed against cuBLAS on this GPU (gemv.tune); TRITONLLM_GEMV=0 keeps cuBLAS."""
        if given is not None:
            return dict(given), []
        if not self.triton_kernels or self.device.type != "cuda" or os.environ.get("TRITONLLM_GEMV") == "0":
            return {}, []
        m = self.model
        weights = {kind: [(getattr(layer, kind).weight, getattr(layer, kind).bias) for layer in m.layers]
                   for kind in PROJECTIONS}
        weights["lm_head"] = [(m.lm_head, None)]
        try:
            from . import gemv
            return gemv.tune(weights, self.batch_buckets, self._product_consumers())
        except Exception as exc:  # the tiles do not compile here: cuBLAS serves every product
            log.warning("gemv tuning failed (%s): cuBLAS serves the decode products", str(exc)[:300])
            return {}, []

    def _product_consumers(self) -> dict:
        """{weight kind: the fused kernel that reads its product in `_decode_triton`}, on scratch
        inputs, for timing a product together with its reader (split partial sums are added up
        there). Writes K/V at position 0 of the first slots: nothing is cached yet."""
        from . import fused_kernels as fk

        sh, like = self.shape, self.model.embed
        zeros = lambda *dims: torch.zeros(*dims, device=self.device, dtype=like.dtype)  # noqa: E731
        cos, sin = zeros(self.max_slots, 1, sh.head_dim) + 1, zeros(self.max_slots, 1, sh.head_dim)
        positions = torch.zeros(self.max_slots, dtype=torch.long, device=self.device)
        residual, norm = zeros(self.max_slots, 1, sh.hidden_size), zeros(sh.hidden_size)
        rows = lambda y: y.parts.shape[1] if hasattr(y, "parts") else y.shape[0]  # noqa: E731
        return {"qkv_proj": lambda y: fk.rope_kv_write(y, cos[:rows(y)], sin[:rows(y)], self.cache.keys[0],
                                                        self.cache.values[0], positions[:rows(y)], sh.num_heads, sh.num_kv_heads),
                "o": lambda y: fk.add_rms_norm(y, residual[:rows(y)], norm, 1e-5),
                "down": lambda y: fk.add_rms_norm(y, residual[:rows(y)], norm, 1e-5),
                "gate_up": fk.silu_mul}

    def _choose_attention(self) -> tuple[dict, list]:
        """{batch bucket: decode attention config}, timed on this GPU at up to 256 keys per row."""
        if not self.triton_kernels or self.device.type != "cuda":
            return {}, []
        from . import fused_kernels as fk
        try:
            table, report = fk.tune_attention(self.cache.keys, self.cache.values, self.shape.num_heads,
                                              self.batch_buckets, min(256, self.max_context))
        except Exception as exc:  # a config does not compile here: the default (self-checked) serves
            log.warning("decode attention tuning failed (%s): default blocks", str(exc)[:300])
            return {}, []
        log.info("decode attention configs by batch: %s", table)
        return table, report

    def _project(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        config = self.gemv_table.get((kind, x.shape[0]))
        if config is None:
            return F.linear(x, weight, bias)
        from . import gemv
        return gemv.small_matmul(x, weight, bias, config)

    def _size_slots(self, cfg: EngineConfig) -> int:
        if self.device.type != "cuda":
            return cfg.max_slots
        free, total = torch.cuda.mem_get_info()
        per_slot = StaticKVCache.bytes_per_slot(self.shape, cfg.max_context, self.dtype)
        fit = int(free * cfg.kv_cache_memory_fraction) // per_slot - 1  # one is the prefill scratch slot
        if fit < 1:
            raise RuntimeError(f"no room for one KV slot of {cfg.max_context} tokens ({per_slot / 2**20:.0f} MiB) in "
                               f"{cfg.kv_cache_memory_fraction:.0%} of {free / 2**30:.1f} GiB free: lower max_context")
        slots = min(cfg.max_slots, fit)
        log.info("KV cache: %d slots x %d tokens (%.2f GiB); %d slots would fit", slots, cfg.max_context,
                 slots * per_slot / 2**30, fit)
        return slots

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"runtime": "torch-cuda", "device": name, "dtype": str(self.dtype),
                "slots": self.max_slots, "max_context": self.max_context,
                "kv_cache_bytes": self.cache.keys.nbytes * 2, "cuda_graphs": self.use_cuda_graphs,
                "torch_compile": self.compiled, "fused_kernels": self.fused_kernels,
                "triton_kernels": self.triton_kernels,
                "gemv": {f"{kind} x{rows}": list(cfg) for (kind, rows), cfg in sorted(self.gemv_table.items())},
                "decode_attention": {b: list(cfg) for b, cfg in sorted(self.attention_table.items())}}

    # -- forward passes ------------------------------------------------------------------------
    def _norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(norm, x) if self.fused_kernels else norm(x)

    def _layers(self, x, cos, sin, rows, positions, attend):
        for i, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv(self._norm(layer.ln1, x), cos, sin)
            self.cache.update(i, rows, positions, k, v)
            x = x + layer.o(attend(i, layer, q, k, v))
            x = x + layer.mlp(self._norm(layer.ln2, x))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self._norm(self.model.norm, hidden), self.model.lm_head.t())

    @torch.no_grad()
    def prefill(self, rows: list[StepInput]) -> torch.Tensor:
        """Prompts right-padded to one length, causal attention over the new tokens only. Up to
        PREFILL_GRAPH_TOKENS (batch x length buckets) a CUDA graph per bucket replays the step:
        launched eagerly, one 128-token prompt cost the host 8.7 ms on the H100 (the GPU's share
        was done long before), and the loop launches no decode step meanwhile."""
        b, t = len(rows), max(len(r.tokens) for r in rows)
        bb, tb = bucket_for(b, self.prefill_batch_buckets), bucket_for(t, self.prefill_len_buckets)
        self.prefill_tokens[0] += sum(len(r.tokens) for r in rows)
        if not self.use_cuda_graphs or bb * tb > PREFILL_GRAPH_TOKENS:
            self.prefill_tokens[1] += b * t
            return self._prefill_body(*self._prefill_inputs(rows, b, t))
        self.prefill_tokens[1] += bb * tb
        graph, static, out = self._prefill_graph(bb, tb)
        for buf, values in zip(static, self._prefill_lists(rows, bb, tb)):
            copy_to(buf, values, self._uploads)
        graph.replay()
        return out[:b]

    def _prefill_lists(self, rows: list[StepInput], b: int, t: int) -> tuple[list, list, list]:
        """ids [b,t] (right-padded), slots [b], index of each row's last token [b], as host lists;
        rows past len(rows) are padding: token 0 into the scratch slot."""
        pad = b - len(rows)
        return ([r.tokens + [0] * (t - len(r.tokens)) for r in rows] + [[0] * t] * pad,
                [r.slot for r in rows] + [self.scratch_slot] * pad,
                [len(r.tokens) - 1 for r in rows] + [0] * pad)

    def _prefill_inputs(self, rows: list[StepInput], b: int, t: int) -> tuple[torch.Tensor, ...]:
        """`_prefill_lists` as device tensors (the eager path)."""
        return tuple(to_device(values, self.device) for values in self._prefill_lists(rows, b, t))

    def _prefill_body(self, ids: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        x = torch.nn.functional.embedding(ids, self.model.embed)
        cos, sin = self.model.rotary(positions, x.dtype)
        if self.triton_kernels:
            h = self._prefill_triton(x, cos, sin, slots)
            return torch.matmul(h[torch.arange(b, device=self.device), last], self.model.lm_head.t())
        if self.fused_kernels:  # prompts are right-padded, so causal attention alone never sees a pad
            attend = lambda i, layer, q, k, v: F.scaled_dot_product_attention(  # noqa: E731
                q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
        else:
            causal = torch.full((t, t), NEG, device=self.device).triu(1).expand(b, 1, t, t)
            attend = lambda i, layer, q, k, v: layer.attend(q, k, v, causal)  # noqa: E731
        x = self._layers(x, cos, sin, slots, positions, attend)
        return self._logits(x[torch.arange(b, device=self.device), last])

    def _prefill_graph(self, b: int, t: int):
        if (b, t) not in self._prefill_graphs:
            static = (torch.zeros((b, t), dtype=torch.long, device=self.device),
                      torch.full((b,), self.scratch_slot, dtype=torch.long, device=self.device),
                      torch.zeros((b,), dtype=torch.long, device=self.device))
            graph, out = self._capture(lambda: self._prefill_logits[:b].copy_(self._prefill_body(*static)),
                                       f"prefill batch={b} length={t}")
            self._prefill_graphs[(b, t)] = (graph, static, out)
        return self._prefill_graphs[(b, t)]

    def _fused_layers(self, x: torch.Tensor, rope, attend, proj) -> torch.Tensor:
        """The decoder stack on the fused kernels: per layer 4 matrix products (`proj`) and 4 small
        kernels (rotary + KV write `rope`, attention `attend`, residual add + norm twice, SiLU * up).
        x is the residual stream (updated in place); returns it normalised by the final norm."""
        from . import fused_kernels as fk

        m = self.model
        h = rms_norm(m.layers[0].ln1, x)
        for i, layer in enumerate(m.layers):
            a = attend(i, rope(i, proj("qkv_proj", layer, h)))
            h = fk.add_rms_norm(proj("o", layer, a), x, layer.ln2.weight, layer.ln2.eps)
            nxt = m.layers[i + 1].ln1 if i + 1 < len(m.layers) else m.norm
            h = fk.add_rms_norm(proj("down", layer, fk.silu_mul(proj("gate_up", layer, h))), x, nxt.weight, nxt.eps)
        return h

    def _decode_triton(self, b: int, c: int) -> torch.Tensor:
        """The decode step on the fused kernels, products by the tuned gemv table."""
        from . import fused_kernels as fk
        from .gemv import dense

        m, sh, cache = self.model, self.shape, self.cache
        positions = self._positions[:b]
        x = torch.nn.functional.embedding(self._tokens[:b, None], m.embed)  # the residual stream
        cos, sin = m.rotary(positions[:, None], x.dtype)
        rope = lambda i, qkv: fk.rope_kv_write(qkv, cos, sin, cache.keys[i], cache.values[i],  # noqa: E731
                                               positions, sh.num_heads, sh.num_kv_heads)
        attend = lambda i, q: fk.decode_attention(q, cache.keys[i], cache.values[i], positions, c,  # noqa: E731
                                                  self.attention_table.get(b, fk.ATTENTION_CONFIGS[0]))
        proj = lambda kind, layer, inp: self._project(kind, getattr(layer, kind).weight,  # noqa: E731
                                                      getattr(layer, kind).bias, inp)
        h = self._fused_layers(x, rope, attend, proj)
        return dense(self._project("lm_head", m.lm_head, None, h[:, 0]))

    def _prefill_triton(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The prefill's decoder stack on the fused kernels (H100, 64 x 128 tokens: the rotary,
        cache writes, adds and SiLU of the torch ops took 15 of the step's 36 ms), cuBLAS products,
        causal flash attention over each prompt's new tokens. Returns the final-normed hidden states."""
        from . import fused_kernels as fk

        (b, t, _), sh, cache = x.shape, self.shape, self.cache
        row_slots = slots.repeat_interleave(t)
        row_positions = torch.arange(t, device=self.device).repeat(b)
        kv_from = sh.num_heads + sh.num_kv_heads

        def rope(i, qkv):
            q, k = fk.rope_kv_write(qkv, cos, sin, cache.keys[i], cache.values[i], row_positions, sh.num_heads,
                                    sh.num_kv_heads, slots=row_slots, return_k=True)
            v = qkv.view(b, t, kv_from + sh.num_kv_heads, sh.head_dim)[:, :, kv_from:]
            return q.view(b, t, sh.num_heads, -1), k.view(b, t, sh.num_kv_heads, -1), v

        def attend(i, qkv):
            q, k, v = (y.transpose(1, 2) for y in qkv)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(b, t, -1)

        return self._fused_layers(x, rope, attend, lambda kind, layer, inp: getattr(layer, kind)(inp))

    def _decode_graph_body(self, b: int, c: int) -> torch.Tensor:
        tokens, positions = self._tokens[:b], self._positions[:b]
        rows = torch.arange(b, device=self.device)
        valid = (torch.arange(c, device=self.device)[None, :] <= positions[:, None]).view(b, 1, 1, c)
        bias = torch.where(valid, 0.0, NEG)
        x = torch.nn.functional.embedding(tokens[:, None], self.model.embed)
        cos, sin = self.model.rotary(positions[:, None], x.dtype)

        def attend(i, layer, q, k, v):
            keys, values = self.cache.keys[i, :b, :, :c], self.cache.values[i, :b, :, :c]
            if self.fused_kernels:
                return attend_decode(layer, q, keys, values, valid)
            return layer.attend(q, keys, values, bias)

        x = self._layers(x, cos, sin, rows, positions[:, None], attend)
        return self._logits(x[:, 0])

    def _graph(self, b: int, c: int):
        if (b, c) not in self._graphs:
            self._graphs[(b, c)] = self._capture(lambda: self._decode_body(b, c), f"decode batch={b} context={c}")
        return self._graphs[(b, c)]

    def _capture(self, body, what: str):
        """(graph, output) of `body` captured after two warm-up runs; all graphs share one memory
        pool (they replay one at a time on one stream)."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.no_grad():
            out = body()
        self._pool = graph.pool()
        log.debug("captured %s graph in %.0f ms", what, 1e3 * (time.perf_counter() - t0))
        return graph, out

    @torch.no_grad()
    def decode(self, rows: list[StepInput]) -> torch.Tensor:
        """One token for each row; rows are laid out by slot over a batch bucket."""
        return self._decode_setup(rows, 1)()[self._slot_index(tuple(r.slot for r in rows))]

    def _decode_setup(self, rows: list[StepInput], steps: int):
        """Positions and known tokens uploaded for `steps` decode steps; returns a function that
        runs one step and returns its logits [bucket, vocab]. Padding rows (free slots, slots
        prefilled in the same step, sequences sitting out their last step) write throw-away K/V
        at the last `steps` positions, which no live sequence in such a slot has reached (a new
        one writes each position before it reads it)."""
        slots, tokens, starts = zip(*rows)  # one pass over the rows (named tuples)
        b = bucket_for(max(slots) + 1, self.batch_buckets)
        c = bucket_for(max(starts) + steps, self.ctx_buckets)
        pad = self.max_context - steps
        if slots == self._in_order[len(slots)]:  # the usual step: slots 0..n-1 in order
            pos = [*starts, *[pad] * (b - len(slots))]
        else:
            pos = [pad] * b
            for slot, start in zip(slots, starts):
                pos[slot] = start
        copy_to(self._positions[:b], pos, self._uploads)
        if any(tokens):  # rows whose last token is not on the device already (launch keeps it there)
            known = [(slot, t[0]) for slot, t in zip(slots, tokens) if t]
            self._tokens[to_device([k[0] for k in known], self.device)] = to_device([k[1] for k in known], self.device)
        if not self.use_cuda_graphs:
            return lambda: self._decode_body(b, c)
        graph, out = self._graph(b, c)
        return lambda: graph.replay() or out

    def _slot_index(self, slots: tuple[int, ...]):
        """Indexes rows/slots in this order: a plain slice when they are 0..n-1 (a full batch in
        slot order, the usual decode step), so no index is copied to the device."""
        if slots == self._in_order[len(slots)]:
            return slice(0, len(slots))
        return to_device(list(slots), self.device)

    def step(self, inputs: list[StepInput]) -> torch.Tensor:
        pre = [i for i, x in enumerate(inputs) if x.start == 0]
        if not pre or len(pre) == len(inputs):  # one kind of row: its logits in input order as they are
            return self.prefill(inputs) if pre else self.decode(inputs)
        dec = [i for i, x in enumerate(inputs) if x.start > 0]
        logits = torch.empty((len(inputs), self.shape.vocab_size), dtype=self.dtype, device=self.device)
        logits[to_device(pre, self.device)] = self.prefill([inputs[i] for i in pre])
        logits[to_device(dec, self.device)] = self.decode([inputs[i] for i in dec])
        return logits

    def sample_batch(self, logits: torch.Tensor, seqs) -> list[int]:
        return torch_sampling.sample_batch(logits, seqs)

    def launch(self, inputs: list[StepInput], seqs, steps: int = 1):
        """Enqueue one step and its sampling without waiting for the device (or `steps` decode
        steps, each sampling into the next: multi-step). The chosen ids also land in the device
        token buffer, where the next decode step reads them, so the engine loop can launch step N+1
        before it has read step N's tokens (host work overlaps the GPU)."""
        start = self._downloads.mark_start() if self._downloads else None
        index = self._slot_index(tuple(i.slot for i in inputs))
        if steps == 1:
            chosen = torch_sampling.choose(self.step(inputs), seqs)
            self._tokens[index] = chosen
        else:
            chosen = self._decode_run(inputs, seqs, index, steps)
        flat = chosen.view(-1)
        if self.device.type != "cuda":  # a multi-step run's ids sit in a buffer the next run reuses
            return flat.clone(), steps
        return self._downloads.send(flat, start), steps

    @torch.no_grad()
    def _decode_run(self, rows: list[StepInput], seqs, index, steps: int) -> torch.Tensor:
        """`steps` decode steps on one upload: positions advance on the device, each step's chosen
        ids feed the next. Returns the chosen ids [steps, rows]."""
        run = self._decode_setup(rows, steps)
        sampling = torch_sampling.SamplingPlan(seqs)
        chosen = self._run_tokens[:steps * len(rows)].view(steps, len(rows))  # contiguous: one copy down
        for k in range(steps):
            if k:
                self._positions.add_(1)
            chosen[k] = sampling.choose(run()[index])
            self._tokens[index] = chosen[k]
        return chosen

    def collect(self, handle) -> list:
        """The chosen ids of a launched step (waits for that step only): one id per row, or for a
        multi-step launch a list of ids per row. Adds the device's idle time before the step, where
        the loop launched it with an older step still uncollected."""
        chosen, steps = handle
        if self._downloads:
            chosen = self._downloads.receive(chosen)
        return chosen.tolist() if steps == 1 else chosen.view(steps, -1).t().tolist()

    @property
    def gpu_idle_s(self) -> float:
        """Device idle between a step and the next one launched before it was collected."""
        return self._downloads.idle_s if self._downloads else 0.0
