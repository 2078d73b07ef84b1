"""PyTorch on NVIDIA GPUs: weights and a paged KV cache resident on the device, decode and
prefill replayed from CUDA graphs per shape bucket, sampling on the device, and steps launched
without waiting (the engine loop overlaps its host work with the device's).

The parts, one job each: `cache` (the paged KV pool and its tables), `tuning` (start-up kernel choices),
`forward` (the forward passes), `graphs` (buckets and capture), `transfers` (pinned host copies),
`sampling` (device sampler). This class wires them and speaks the `Runtime` contract."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ...config import EngineConfig, require_scheme
from ...model.modeling import CausalLM, load_engine_model
from ...model.quant import check_device_support, place, scheme_of
from ..base import Runtime, RuntimeCapabilities, RuntimeStats, StepInput
from ..kernels.compile_watch import WATCH
from ..paged_kv import BLOCK_SIZE, PagedAdmission
from . import sampling, tuning_cache
from .cache import FP8, PagedDeviceCache, kv_scales_for, size_blocks
from .forward import ForwardPasses
from .graphs import PREFILL_GRAPH_TOKENS, Buckets, GraphCache, bucket_for
from .pieces import PieceBuckets, PieceGraphs, PieceLayout, piece_warm_ups
from .transfers import PinnedRing, StepDownloads, copy_to, to_device
from .tuning import choose_kernels, want_triton

log = logging.getLogger(__name__)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TorchCudaRuntime(PagedAdmission, Runtime):
    capabilities = RuntimeCapabilities(overlap=True, multi_step=True, device_sampling=True, prompt_pieces=True)

    def __init__(
        self,
        engine_dir: Path | None,
        cfg: EngineConfig,
        model: CausalLM | None = None,
        use_cuda_graphs: bool = True,
        device: str = "cuda",
        fused_kernels: bool = True,
        triton_kernels: bool | None = None,
        gemv_table: dict | None = None,
        capture_at_start: bool = True,
        quant_table: dict | None = None,
    ):
        """`model`: an already built module (benchmarks, tests) instead of `engine_dir`'s;
        `fused_kernels=False`: the module's reference ops; `triton_kernels` / `gemv_table` /
        `quant_table` (8-bit products beyond gemv's rows) force the start-up kernel choices;
        `capture_at_start=False`: graphs captured on first use. With graphs captured at start-up, a
        kernel compiled later is logged (`compile_watch`)."""
        with WATCH.starting():  # this runtime's own compiles are expected
            self._start(
                engine_dir,
                cfg,
                model,
                use_cuda_graphs,
                device,
                fused_kernels,
                triton_kernels,
                gemv_table,
                capture_at_start,
                quant_table,
            )
        if capture_at_start and self.use_cuda_graphs:
            WATCH.arm()

    def _start(self, engine_dir, cfg, model, use_cuda_graphs, device, fused_kernels, triton_kernels, gemv_table,
               capture_at_start, quant_table):  # fmt: skip
        self.device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        if model is None:
            model = load_engine_model(Path(engine_dir), self.dtype)
        self.quantization = require_scheme(scheme_of(model), cfg.quantization, "the engine model")
        if (model.quant_head is not None) != cfg.quantize_lm_head:
            raise ValueError(
                f"the engine model's LM head is {'' if model.quant_head is not None else 'not '}quantized but the "
                f"config says quantize_lm_head={cfg.quantize_lm_head}: rebuild the repository "
                f"{'with' if model.quant_head is not None else 'without'} --quantize-lm-head"
            )
        check_device_support(self.quantization, self.device, "torch-cuda")
        self.model = place(model, self.device, self.dtype).eval()
        self.model.inv_freq = self.model.inv_freq.float()
        self.shape, self.max_context = self.model.shape, cfg.max_context
        self.max_slots = cfg.max_slots  # rows of a step; the KV pool bounds how many run by their tokens
        self.scratch_slot = self.max_slots  # padding rows write their K/V here (its table: the scratch block)
        scales = kv_scales_for(cfg, self.model, self.device)
        blocks = size_blocks(self.shape, cfg, FP8 if scales is not None else self.dtype, self.device)
        self.cache = PagedDeviceCache(
            self.shape, blocks, self.max_slots + 1, cfg.max_context, self.dtype, self.device, cfg.prefix_cache, scales
        )
        self.blocks = self.cache.blocks
        self.buckets = Buckets.for_engine(self.max_slots, cfg.max_context)
        gaps = self.model.kernel_gaps()
        if gaps and triton_kernels:
            raise ValueError(
                f"triton_kernels=True, but the fused kernels do not compute {', '.join(gaps)}: leave it unset"
            )
        if gaps and fused_kernels:
            log.info("fused decode kernels off for this model (they do not compute %s): torch ops", ", ".join(gaps))
        qk_norm = self.model.features.qk_norm
        triton = not gaps and want_triton(
            triton_kernels,
            fused_kernels,
            self.device,
            self.dtype,
            self.shape.head_dim,
            qk_norm,
            self.cache.fp8,
            self.quantization == "fp8",
        )
        self.kernels = choose_kernels(
            self.model,
            self.cache,
            self.buckets.batch,
            cfg.max_context,
            triton,
            gemv_table,
            quant_table,
            cfg.max_prefill_tokens,
            tuning_cache.cache_dir(cfg.tuning_cache),
            cfg.deterministic,
        )
        sampling.warm_up_logprobs(self.shape.vocab_size, self.device)
        self.compiled = bool(cfg.torch_compile and self.device.type == "cuda")
        self.forward = ForwardPasses(self.model, self.cache, self.kernels, self.max_slots, fused_kernels, self.compiled)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self.graphs = GraphCache()
        self._piece_tokens = cfg.max_prefill_tokens  # the most prompt tokens a step of pieces holds
        self._prefill_logits = None  # every prefill graph and graph of pieces writes its logits here
        if self.use_cuda_graphs or self.kernels.triton:  # (one buffer, not one each)
            self._prefill_logits = torch.empty(
                (self.max_slots, self.shape.vocab_size), device=self.device, dtype=self.dtype
            )
        self.pieces = self._piece_graphs() if self.kernels.triton else None
        self.graph_pieces = self.use_cuda_graphs  # False: steps of pieces launch eagerly (an A/B in bench)
        self._uploads = self._downloads = None  # staging for positions and prompt ids up, sampled ids down
        if self.device.type == "cuda":
            most = max(PREFILL_GRAPH_TOKENS, self.max_slots, self.pieces.numel if self.pieces else 0)
            self._uploads = PinnedRing(most, depth=16)
            self._downloads = StepDownloads(self.max_slots * cfg.steps_per_launch)
        self._run_tokens = torch.zeros(cfg.steps_per_launch * self.max_slots, dtype=torch.long, device=self.device)
        self._prefill_counts = [0, 0]  # prompt tokens prefilled, tokens computed for them (padding to buckets)
        self._in_order = [tuple(range(n)) for n in range(self.max_slots + 1)]  # slots 0..n-1, to compare with
        self._writes: tuple = ()  # the decode rows' write slots last uploaded
        if self.use_cuda_graphs and capture_at_start:
            self.capture_all()

    def _piece_graphs(self) -> PieceGraphs:
        from ..kernels.attention import PieceTiles

        sh, rows = self.shape, self.kernels.piece_config[0]
        group = sh.num_heads // sh.num_kv_heads
        return PieceGraphs(
            PieceBuckets.for_engine(self._piece_tokens, self.max_slots),
            lambda ids, slots, positions, last, tiles: self.forward.pieces_triton(
                ids, slots, positions, last, self.max_context, tiles
            ),
            lambda tokens: PieceTiles.rows_for(group, tokens, sh.num_kv_heads, rows),
            self._prefill_logits,
            self.scratch_slot,
            self.graphs,
        )

    def capture_all(self) -> None:
        """Capture every decode and prefill graph now, and compile the piece path's kernels
        (`warm_pieces`): done lazily, a bucket or kernel first met under load would stall the loop."""
        t0, bk = time.perf_counter(), self.buckets
        for b in bk.batch:
            for c in bk.context:
                self.decode_graph(b, c)
        for t in bk.prefill_length:
            for b in bk.prefill_batch:
                if bk.prefill_graphed(b, t):
                    self.prefill_graph(b, t)
        if self.pieces is not None:
            self.warm_pieces()
            for bucket in self.pieces.buckets.all():
                self.pieces.capture(bucket, self._uploads)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured %d decode, %d prefill and %d piece graphs, warmed the eager piece path, in %.1f s",
            *(self.graphs.count(kind) for kind in ("decode", "prefill", "pieces")),
            time.perf_counter() - t0,
        )

    def warm_pieces(self) -> None:
        """Run the prompt-piece path (eager) once for each kernel variant it can meet
        (`piece_warm_ups`), so none compiles under load. Scratch-slot rows: their K/V land in the
        scratch block; the prefill counters are left as they were."""
        sh, counts = self.shape, list(self._prefill_counts)
        group, rows = sh.num_heads // sh.num_kv_heads, self.kernels.piece_config[0]
        for lengths, start in piece_warm_ups(group, sh.num_kv_heads, self._piece_tokens, self.max_context, rows):
            self.prefill_pieces([StepInput(self.scratch_slot, [0] * n, start) for n in lengths], graphed=False)
        self._prefill_counts = counts

    def describe(self) -> dict:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {
            "runtime": "torch-cuda",
            "device": name,
            "dtype": str(self.dtype),
            "quantization": self.quantization,
            "slots": self.max_slots,
            "max_context": self.max_context,
            "kv_cache_bytes": self.cache.nbytes,
            "kv_cache_dtype": str(self.cache.keys.dtype),
            "kv_blocks": self.cache.num_blocks,
            "kv_block_size": BLOCK_SIZE,
            "kv_cache_tokens": self.cache.num_blocks * BLOCK_SIZE,
            "prefix_cache": self.blocks.prefix_cache,
            "cuda_graphs": self.use_cuda_graphs,
            "torch_compile": self.compiled,
            "fused_kernels": self.forward.fused_ops,
            **self.kernels.describe(),
        }

    def stats(self) -> RuntimeStats:
        idle = self._downloads.idle_s if self._downloads else 0.0
        return RuntimeStats(idle, *self._prefill_counts, **self.blocks.counts(), kernel_compiles=WATCH.count)

    # -- graphs ----------------------------------------------------------------------------------
    def decode_graph(self, b: int, c: int) -> tuple:
        """(graph, logits) of the decode step of slots 0..b-1 over context bucket c."""
        return self.graphs.get(
            ("decode", b, c),
            lambda: self.graphs.capture(lambda: self.forward.decode(b, c), f"decode batch={b} context={c}"),
        )

    def prefill_graph(self, b: int, t: int) -> tuple:
        """(graph, static inputs (ids, slots, last), logits) of a prefill of b prompts of length t."""

        def make():
            static = (
                torch.zeros((b, t), dtype=torch.long, device=self.device),
                torch.full((b,), self.scratch_slot, dtype=torch.long, device=self.device),
                torch.zeros((b,), dtype=torch.long, device=self.device),
            )
            graph, out = self.graphs.capture(
                lambda: self._prefill_logits[:b].copy_(self.forward.prefill(*static)), f"prefill batch={b} length={t}"
            )
            return graph, static, out

        return self.graphs.get(("prefill", b, t), make)

    # -- steps -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, rows: list[StepInput]) -> torch.Tensor:
        """Whole prompts: replayed from the graph of their (batch, length) bucket, padded to it, where
        `Buckets.prefill_bucket` names one (launched eagerly, a prefill below PREFILL_GRAPH_TOKENS
        costs the host more than the device, and the loop launches no decode step meanwhile); else
        launched eagerly, padded to the longest prompt only."""
        b, t = len(rows), max(len(r.tokens) for r in rows)
        bucket = self.buckets.prefill_bucket(b, t) if self.use_cuda_graphs else None
        self._prefill_counts[0] += sum(len(r.tokens) for r in rows)
        if bucket is None:
            self._prefill_counts[1] += b * t
            return self.forward.prefill(*self.prefill_inputs(rows, b, t))
        bb, tb = bucket
        self._prefill_counts[1] += bb * tb
        graph, static, out = self.prefill_graph(bb, tb)
        for buf, values in zip(static, self._prefill_lists(rows, bb, tb)):
            copy_to(buf, values, self._uploads)
        graph.replay()
        return out[:b]

    def _prefill_lists(self, rows: list[StepInput], b: int, t: int) -> tuple[list, list, list]:
        """ids [b,t] (right-padded), slots [b], index of each row's last token [b], as host lists;
        rows past len(rows) are padding: token 0 into the scratch slot."""
        pad = b - len(rows)
        return (
            [r.tokens + [0] * (t - len(r.tokens)) for r in rows] + [[0] * t] * pad,
            [r.slot for r in rows] + [self.scratch_slot] * pad,
            [len(r.tokens) - 1 for r in rows] + [0] * pad,
        )

    def prefill_inputs(self, rows: list[StepInput], b: int, t: int) -> tuple[torch.Tensor, ...]:
        """The forward pass's prefill inputs for `rows` padded to b x t, as device tensors."""
        return tuple(to_device(values, self.device) for values in self._prefill_lists(rows, b, t))

    def decode(self, rows: list[StepInput]) -> torch.Tensor:
        """One token for each row; rows are laid out by slot over a batch bucket."""
        return self._decode_columns(*zip(*rows))

    @torch.no_grad()
    def _decode_columns(self, slots: tuple, tokens: tuple, starts: tuple) -> torch.Tensor:
        """`decode` of rows given as their columns (`zip(*rows)`): logits in row order."""
        return self._decode_setup(slots, tokens, starts, 1)()[self._slot_index(slots)]

    def _ensure_decode_blocks(self, slots: tuple, starts: tuple, steps: int) -> None:
        """`_take_blocks` for decode rows only (the usual step): the rows whose `steps` positions
        run past their slot's blocks are found in arrays, not in a pass over a thousand rows."""
        blocks = self.blocks
        held = np.fromiter(map(len, blocks.tables), np.int64, len(blocks.tables)) * blocks.block_size
        short = np.flatnonzero(np.asarray(starts) + steps > held[np.asarray(slots)])
        for i in short.tolist():
            blocks.ensure(slots[i], starts[i] + steps)
        self.cache.sync(self._uploads)

    def _take_blocks(self, rows: list[StepInput], steps: int) -> list[StepInput]:
        """Blocks for every position the rows write, mirrored on the device before the step. A
        prompt piece first looks up its prefix in the cache: what was found is not computed again
        (the row becomes a piece after it). Every lookup comes before this step's prompts register
        their blocks, so a row never reuses blocks the same step is still computing."""
        blocks, out, prompts = self.blocks, [], []
        for r in rows:
            if len(r.tokens) > 1 or r.start == 0:
                reused = blocks.begin(r.slot, r.start, r.tokens)
                if reused:
                    r = StepInput(r.slot, r.tokens[reused:], r.start + reused)
                prompts.append(r)
            out.append(r)
        for r in prompts:
            blocks.ensure(r.slot, r.start + len(r.tokens))
            blocks.record(r.slot, r.start, r.tokens)
        tables, size = blocks.tables, blocks.block_size
        for slot, _, start in out:  # decode rows (and one-token pieces): `steps` positions each
            if start + steps > len(tables[slot]) * size:
                blocks.ensure(slot, start + steps)
        self.cache.sync(self._uploads)
        return out

    def _decode_setup(self, slots: tuple, tokens: tuple, starts: tuple, steps: int):
        """Positions, the slots rows write and known tokens uploaded for `steps` decode steps (the
        rows' columns, `zip(*rows)`); returns a function that runs one step and returns its logits
        [bucket, vocab]. Padding rows (free slots, slots prefilled in the same step, sequences
        sitting out their last step) write their throw-away K/V into the scratch slot, whose table
        points at the scratch block."""
        b = bucket_for(max(slots) + 1, self.buckets.batch)
        c = bucket_for(max(starts) + steps, self.buckets.context)
        pad, scratch = self.max_context - steps, self.scratch_slot
        if slots == self._in_order[len(slots)]:  # the usual step: slots 0..n-1 in order
            pos = [*starts, *[pad] * (b - len(slots))]
            writes = (*slots, *[scratch] * (b - len(slots)))
        else:
            pos, writes = [pad] * b, [scratch] * b
            for slot, start in zip(slots, starts):
                pos[slot], writes[slot] = start, slot
            writes = tuple(writes)
        copy_to(self.forward.positions[:b], pos, self._uploads)
        if writes != self._writes:  # the same rows as the last step's: already on the device
            copy_to(self.forward.writes[:b], writes, self._uploads)
            self._writes = writes
        if any(tokens):  # rows whose last token is not on the device already (launch keeps it there)
            known = [(slot, t[0]) for slot, t in zip(slots, tokens) if t]
            self.forward.tokens[to_device([k[0] for k in known], self.device)] = to_device(
                [k[1] for k in known], self.device
            )
        if not self.use_cuda_graphs:
            return lambda: self.forward.decode(b, c)
        graph, out = self.decode_graph(b, c)
        return lambda: graph.replay() or out

    def _slot_index(self, slots: tuple[int, ...]):
        """Indexes rows/slots in this order: a plain slice when they are 0..n-1 (a full batch in
        slot order, the usual decode step), so no index is copied to the device."""
        if slots == self._in_order[len(slots)]:
            return slice(0, len(slots))
        return to_device(list(slots), self.device)

    def step(self, inputs: list[StepInput]) -> torch.Tensor:
        """Whole prompts (start 0), prompt pieces after a cached part (chunked prefill) and decode
        rows, each kind run its own way; logits in input order."""
        return self._step(inputs, tuple(zip(*inputs)))

    @staticmethod
    def _decode_only(tokens: tuple, starts: tuple) -> bool:
        """Every row a decode row (no prompt, no piece of more than one token): read in C, per column."""
        return min(starts) > 0 and max(map(len, tokens)) <= 1

    def _step(self, inputs: list[StepInput], columns: tuple) -> torch.Tensor:
        slots, tokens, starts = columns
        if self._decode_only(tokens, starts):  # the usual step: its rows as columns, no per-row pass
            self._ensure_decode_blocks(slots, starts, 1)
            return self._decode_columns(slots, tokens, starts)
        inputs = self._take_blocks(inputs, 1)
        kinds = [0 if x.start == 0 else 1 if len(x.tokens) > 1 else 2 for x in inputs]
        runs = (self.prefill, self.prefill_pieces, self.decode)
        if len(set(kinds)) == 1:  # one kind of row: its logits in input order as they are
            return runs[kinds[0]](inputs)
        logits = torch.empty((len(inputs), self.shape.vocab_size), dtype=self.dtype, device=self.device)
        for kind, run in enumerate(runs):
            rows = [i for i, k in enumerate(kinds) if k == kind]
            if rows:
                logits[to_device(rows, self.device)] = run([inputs[i] for i in rows])
        return logits

    @torch.no_grad()
    def prefill_pieces(self, rows: list[StepInput], graphed: bool = True) -> torch.Tensor:
        """Prompt pieces that start after the part of their prompt already cached (chunked prefill, a
        prefix-cache hit), in one batch: each attends to its slot's cached past and its own tokens.
        On the fused kernels every token is a row, replayed from the graph of its bucket where
        `graphed` and there is one."""
        tokens = sum(len(r.tokens) for r in rows)
        self._prefill_counts[0] += tokens
        self._prefill_counts[1] += tokens
        span = max(r.start + len(r.tokens) for r in rows)
        if self.pieces is None:
            t = max(len(r.tokens) for r in rows)
            ids = [r.tokens + [0] * (t - len(r.tokens)) for r in rows]
            slots, starts, lens = ([r.slot for r in rows], [r.start for r in rows], [len(r.tokens) for r in rows])
            return self.forward.prefill_pieces(*(to_device(v, self.device) for v in (ids, slots, starts, lens)), span)
        bucket = self.pieces.buckets.of(tokens, len(rows)) if graphed and self.graph_pieces else None
        if bucket is None:
            return self._pieces_eager(rows, tokens, span)
        self._prefill_counts[1] += bucket[0] - tokens  # the padding is computed too
        return self.pieces.replay(rows, bucket, self._uploads)

    def _pieces_eager(self, rows: list[StepInput], tokens: int, span: int) -> torch.Tensor:
        """Every token a row (no padding); the attention kernel takes a piece's tokens a tile at a time."""
        from ..kernels.attention import PieceTiles

        per = self.pieces.per(tokens)
        lay = PieceLayout.of(rows, per)
        flat = (to_device(v, self.device) for v in (lay.ids, lay.slots, lay.positions, lay.last))
        tiles = PieceTiles(*(to_device(v, self.device) for v in (lay.first, lay.count)), per)  # int64, as graphs
        return self.forward.pieces_triton(*flat, span, tiles)

    def sample(self, logits: torch.Tensor, seqs) -> list:
        return sampling.sample_batch(logits, seqs)

    def launch(self, inputs: list[StepInput], seqs, steps: int = 1):
        """Enqueue one step and its sampling without waiting for the device (or `steps` decode
        steps, each sampling into the next: multi-step). The chosen ids also land in the device
        token buffer, where the next decode step reads them, so the engine loop can launch step N+1
        before it has read step N's tokens."""
        start = self._downloads.mark_start() if self._downloads else None
        columns = tuple(zip(*inputs))  # slots, tokens, starts: one pass over the rows
        index = self._slot_index(columns[0])
        plan, logprobs = sampling.SamplingPlan(seqs), None
        if steps == 1:
            chosen = plan.choose(self._step(inputs, columns))
            self.forward.tokens[index] = chosen
            if plan.logprob_rows:  # copied down before the ids: the ids' fence covers them
                logprobs = tuple(_host_copy(t) for t in plan.logprobs(chosen))
        else:
            chosen = self._decode_run(inputs, columns, plan, index, steps)
        flat = chosen.view(-1)
        if self.device.type != "cuda":  # a multi-step run's ids sit in a buffer the next run reuses
            return flat.clone(), steps, plan, logprobs
        return self._downloads.send(flat, start), steps, plan, logprobs

    @torch.no_grad()
    def _decode_run(
        self, rows: list[StepInput], columns: tuple, plan: sampling.SamplingPlan, index, steps: int
    ) -> torch.Tensor:
        """`steps` decode steps on one upload: positions advance on the device, each step's chosen
        ids feed the next. Returns the chosen ids [steps, rows]."""
        slots, tokens, starts = columns
        if self._decode_only(tokens, starts):
            self._ensure_decode_blocks(slots, starts, steps)
        else:  # rows a multi-step plan does not make (it has no prompts): the general path
            slots, tokens, starts = zip(*self._take_blocks(rows, steps))
        run = self._decode_setup(slots, tokens, starts, steps)
        chosen = self._run_tokens[: steps * len(rows)].view(steps, len(rows))  # contiguous: one copy down
        for k in range(steps):
            if k:
                self.forward.positions.add_(1)
            chosen[k] = plan.choose(run()[index])
            self.forward.tokens[index] = chosen[k]
        return chosen

    def collect(self, handle) -> list:
        """The chosen ids of a launched step (waits for that step only): one id per row, or for a
        multi-step launch a list of ids per row. Adds the device's idle time before the step, where
        the loop launched it with an older step still uncollected."""
        chosen, steps, plan, logprobs = handle
        if self._downloads:
            chosen = self._downloads.receive(chosen)
        if steps > 1:
            return chosen.view(steps, -1).t().tolist()
        return plan.results(chosen.tolist(), logprobs)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in pinned host memory, queued on the stream (read after the step's fence)."""
    if t.device.type != "cuda":
        return t.clone()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host
