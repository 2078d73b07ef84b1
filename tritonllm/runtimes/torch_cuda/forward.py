"""The decoder's forward passes on the device, with the KV cache written as they go.

Prefill takes right-padded prompts [b, t] and attends causally over their new tokens. The decode
step runs over slots 0..b-1, reading each slot's next token, position and the slot it writes
(its own; the scratch slot for a padding row) from static device buffers (`tokens`, `positions`,
`writes`), so a CUDA graph captured once per bucket replays it; the kernels find each position's
block in the paged cache's device table (no gather, no host copy of the cache). Three variants:
the fused OpenAI-Triton kernels (`KernelChoice.triton`), the torch ops with fused attention and
norms, and the module's own reference ops (`fused_ops=False`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.modeling import CausalLM, RMSNorm
from ...model.quant import operands
from ..kernels.rows import Normed
from .cache import PagedDeviceCache
from .ops import NEG, RotaryTable, attend_decode, attend_prompt, causal_mask, rms_norm, rows_of
from .residual import ResidualStream
from .tuning import ROUNDED_BY_PRODUCER, KernelChoice


class ForwardPasses:
    def __init__(
        self,
        model: CausalLM,
        cache: PagedDeviceCache,
        kernels: KernelChoice,
        max_slots: int,
        fused_ops: bool = True,
        compiled: bool = False,
    ):
        self.model, self.cache, self.kernels, self.fused_ops = model, cache, kernels, fused_ops
        self.shape, self.device = model.shape, cache.keys.device
        self.windows = {layer.window for layer in model.layers}  # None (full attention) and any sliding window
        # what the fused kernels scale each norm by: its weight, or Gemma's 1 + w in fp32 (made once:
        # a CUDA graph replays the tensors it captured)
        self._scales = {
            id(n): (n.offset + n.weight.float()) if n.offset else n.weight
            for n in model.modules()
            if isinstance(n, RMSNorm)
        }
        self.tokens = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # each slot's next token
        self.positions = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # ... and its position
        self.writes = torch.zeros(max_slots, dtype=torch.long, device=self.device)  # the slot each row writes
        span = cache.width * cache.block_size  # every position a slot's blocks hold
        self.rotary = RotaryTable(model, span, model.embed.dtype, self.device) if kernels.triton else None
        self.fuse_row_quantization = True  # False: each FP8 GEMM rounds its own input (the A/B in tests, bench)
        self.decode = self._decode_triton if kernels.triton else self._decode_torch
        if compiled:  # fuses the many small kernels of the torch ops' step
            self.decode = torch.compile(self._decode_torch, fullgraph=False, dynamic=False)

    # -- prefill ---------------------------------------------------------------------------------
    def prefill(self, ids: torch.Tensor, slots: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """ids [b,t] right-padded, slots [b], each row's last real token [b] -> logits [b, vocab]."""
        b, t = ids.shape
        positions = torch.arange(t, device=self.device).expand(b, t)
        x = self.model.embed_tokens(ids)
        rot = self.model.rotaries(positions, x.dtype)
        rows = torch.arange(b, device=self.device)
        if self.kernels.triton:
            h = self._prefill_triton(x, rot, slots)
            return self.model.cap_logits(self._head(h[rows, last]))
        if self.fused_ops:
            attend = lambda i, layer, q, k, v: attend_prompt(layer, q, k, v)
        else:
            masks = {w: torch.where(causal_mask(t, w, self.device), 0.0, NEG).expand(b, 1, t, t) for w in self.windows}
            attend = lambda i, layer, q, k, v: layer.attend(q, k, v, masks[layer.window])
        x = self._layers(x, rot, slots, positions, attend)
        return self._logits(x[rows, last])

    def pieces_triton(self, ids, slots, positions, last, span: int, tiles) -> torch.Tensor:
        """Prompt pieces on the fused kernels, every token a row: ids/slots/positions [R] of the
        pieces' tokens in order, last [b] the row of each piece's last token, `span` the largest
        position + 1, `tiles` (PieceTiles) the pieces' rows in tiles of one slot. The rotary kernel
        writes each token's K/V through the block tables first; then each token attends to its
        slot's positions up to its own (the decode attention kernel with a slot per row, a tile of a
        piece's tokens to a program: causal by position, no gather of the cache). Logits [b, V]."""
        m = self.model
        x = m.embed_tokens(ids[:, None])  # [R, 1, H]: the residual stream
        rot = self.rotary(positions)
        config = self.kernels.piece_config[1:]  # keys a block, warps, stages (`tune_pieces`)
        rope, attend = self._row_kernels(rot, positions, slots, span, config, reads=slots, tiles=tiles)
        h = self._fused_layers(x, rope, attend, small=False)
        return m.cap_logits(self._head(h[last, 0]))

    def prefill_pieces(self, ids: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, span):
        """Prompt pieces after cached parts of their prompts (chunked prefill, prefix-cache hits), in
        one batch: ids [b, t] right-padded, row r at positions starts[r].. of slots[r] with lens[r]
        real tokens, attending to its slot's cached positions and causally to itself (sliding
        windows applied); only real tokens are written; `span`: the largest start + len (from the
        host: reading it here would wait for the device). Logits of each row's last token [b, V]."""
        b, t = ids.shape
        positions = starts[:, None] + torch.arange(t, device=self.device)[None, :]  # [b, t]
        real = torch.arange(t, device=self.device)[None, :] < lens[:, None]
        x = self.model.embed_tokens(ids)
        behind = positions[:, :, None] - torch.arange(span, device=self.device)[None, None, :]  # [b, t, span]
        visible = {w: ((behind >= 0) & (behind < (w or span))).view(b, 1, t, span) for w in self.windows}

        bias = {w: torch.where(m, 0.0, NEG).to(x.dtype) for w, m in visible.items()}

        def attend(i, layer, q, k, v):
            keys, values = self.cache.gather(i, slots, span)
            if self.fused_ops and layer.softcap is None:  # K/V repeated per query head: with a bias, SDPA's
                g = q.shape[1] // keys.shape[1]  # memory-efficient kernel serves (its GQA form may not)
                keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
                out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias[layer.window], scale=layer.scale)
                return out.transpose(1, 2).reshape(b, t, -1)
            return layer.attend(q, keys, values, bias[layer.window])

        x = self._layers(x, self.model.rotaries(positions, x.dtype), slots, positions, attend, real)
        return self._logits(x[torch.arange(b, device=self.device), lens - 1])

    def _prefill_triton(self, x: torch.Tensor, rot: list, slots: torch.Tensor):
        """The prefill's decoder stack on the fused kernels (rotary + cache write, adds and the
        gated activation in one kernel each), cuBLAS products, causal flash attention over each
        prompt's new tokens; `rot`: (cos, sin) of each rotary table. Returns the final-normed
        hidden states."""
        from ..kernels import fused as fk
        from ..kernels.gemv import dense

        (b, t, _), sh, cache = x.shape, self.shape, self.cache
        row_slots = slots.repeat_interleave(t)
        row_positions = torch.arange(t, device=self.device).repeat(b)
        kv_from = sh.num_heads + sh.num_kv_heads

        def rope(i, qkv):
            qkv = dense(qkv)  # a split product's partial sums: v is read from the sum below
            q, k = fk.rope_kv_write(
                qkv,
                *rot[self.model.layer_rope[i]],
                cache.keys[i],
                cache.values[i],
                cache.table,
                row_positions,
                sh.num_heads,
                sh.num_kv_heads,
                slots=row_slots,
                return_k=True,
                qk_norm=self._head_norms(self.model.layers[i]),
                kv_scale=cache.layer_scales(i),
            )
            v = qkv.view(b, t, kv_from + sh.num_kv_heads, sh.head_dim)[:, :, kv_from:]
            return q.view(b, t, sh.num_heads, -1), k.view(b, t, sh.num_kv_heads, -1), v

        def attend(i, qkv):
            return attend_prompt(self.model.layers[i], *(y.transpose(1, 2) for y in qkv))

        return self._fused_layers(x, rope, attend, small=False)

    # -- decode ----------------------------------------------------------------------------------
    def _decode_triton(self, b: int, c: int) -> torch.Tensor:
        """The decode step of slots 0..b-1 over a context bucket c on the fused kernels, products by
        the tuned gemv table."""
        from ..kernels import attention as ak
        from ..kernels.gemv import dense

        m, positions = self.model, self.positions[:b]
        x = m.embed_tokens(self.tokens[:b, None])  # the residual stream
        rot = self.rotary(positions)
        config = self.kernels.attention_table.get(b, ak.ATTENTION_CONFIGS[0])
        if c >= ak.LONG_CONTEXT:  # few rows of many keys: each row's keys split over programs where tuned
            config = self.kernels.split_table.get(b, config)
        mix = None
        if b in self.kernels.rope_batches and not m.features.qk_norm:
            rope, attend = self._rope_attention(rot, positions, self.writes[:b], c, config)
            mix = self._attention_o(rot, positions, self.writes[:b], c, config)
        else:
            rope, attend = self._row_kernels(rot, positions, self.writes[:b], c, config, pdl=self.kernels.pdl)
        h = self._fused_layers(x, rope, attend, small=True, mix=mix)
        head, scale = m.head()
        h = h if isinstance(h, Normed) else h[:, 0]  # (a head making its input: rows of [b, 1, E])
        return m.cap_logits(dense(self._project("lm_head", head, None, h, scale)).view(b, -1))

    def _row_kernels(self, rot, positions, writes, limit: int, config, reads=None, tiles=None, pdl=False) -> tuple:
        """(rope, attend) of the fused layers for token rows at `positions` [R]: the rotary kernel
        writes each row's K/V into slot writes[r]'s blocks; the attention kernel reads slot
        reads[r] (default: row r is slot r) up to the row's position, at most `limit` keys, `tiles`
        of rows to a program where given; both launched with PDL where `pdl`."""
        from ..kernels import attention as ak
        from ..kernels import fused as fk

        m, sh, cache = self.model, self.shape, self.cache
        rope = lambda i, qkv: fk.rope_kv_write(
            qkv,
            *rot[m.layer_rope[i]],
            cache.keys[i],
            cache.values[i],
            cache.table,
            positions,
            sh.num_heads,
            sh.num_kv_heads,
            slots=writes,
            qk_norm=self._head_norms(m.layers[i]),
            kv_scale=cache.layer_scales(i),
            pdl=pdl,
        )
        attend = lambda i, q: ak.decode_attention(
            q,
            cache.keys[i],
            cache.values[i],
            cache.table,
            positions,
            limit,
            config,
            *self._attention_args(m.layers[i]),
            row_slots=reads,
            kv_scale=cache.layer_scales(i),
            tiles=tiles,
            pdl=pdl,
        )
        return rope, attend

    def _rope_attention(self, rot, positions, writes, limit: int, config) -> tuple:
        """(rope, attend) of the fused layers with the rotary and the K/V write inside the attention
        kernel (`kernels/rope_attention.py`): `rope` hands the qkv product on as it is."""
        from ..kernels.rope_attention import rope_attention

        m, sh, cache = self.model, self.shape, self.cache
        attend = lambda i, qkv: rope_attention(
            qkv,
            *rot[m.layer_rope[i]],
            positions,
            writes,
            cache.keys[i],
            cache.values[i],
            cache.table,
            sh.num_heads,
            limit,
            config,
            *self._attention_args(m.layers[i]),
            kv_scale=cache.layer_scales(i),
            pdl=self.kernels.pdl,
        )
        return (lambda i, qkv: qkv), attend

    def _attention_o(self, rot, positions, writes, limit: int, config):
        """`_fused_layers`' `mix` where the decode table has attention + o's tile for these rows and
        the step's attention config is unsplit (`kernels/attention_o.py`): the o product of the
        qkv product, added into the step's sums; else None."""
        from ..kernels import attention_o as ao
        from ..kernels.attention import Tile

        m, cache, b = self.model, self.cache, positions.shape[0]
        tile = self.kernels.gemv_table.get((ao.KEY, b))
        if tile is None or Tile(*config).splits != 1:
            return None

        def mix(i, layer, qkv, sums):
            w, _, s = operands(layer.o)
            at = ao.RowAttention(
                *rot[m.layer_rope[i]], positions, writes, cache.keys[i], cache.values[i], cache.table,
                m.shape.num_heads, limit, config, *self._attention_args(layer), cache.layer_scales(i),
            )  # fmt: skip
            return ao.attention_o(qkv, at, (w, s), tile, sums, self.kernels.pdl)

        return mix

    def _decode_torch(self, b: int, c: int) -> torch.Tensor:
        """The decode step on torch ops (fused attention and norms, or the reference ops)."""
        tokens, positions = self.tokens[:b], self.positions[:b]
        rows = torch.arange(b, device=self.device)
        behind = positions[:, None] - torch.arange(c, device=self.device)[None, :]  # [b, c]
        valid = {w: ((behind >= 0) & (behind < (w or c))).view(b, 1, 1, c) for w in self.windows}
        x = self.model.embed_tokens(tokens[:, None])
        rot = self.model.rotaries(positions[:, None], x.dtype)

        def attend(i, layer, q, k, v):
            keys, values = self.cache.gather(i, rows, c)
            if self.fused_ops:
                return attend_decode(layer, q, keys, values, valid[layer.window])
            return layer.attend(q, keys, values, torch.where(valid[layer.window], 0.0, NEG))

        x = self._layers(x, rot, self.writes[:b], positions[:, None], attend)
        return self._logits(x[:, 0])

    # -- shared pieces ---------------------------------------------------------------------------
    def _norm(self, norm, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(norm, x) if self.fused_ops else norm(x)

    def _layers(self, x, rot, rows, positions, attend, real=None):
        """The decoder stack on torch ops; k/v of each layer written into the cache at `positions`
        (only where `real` [B, T], if given); `rot`: (cos, sin) of each rotary table."""
        for i, layer in enumerate(self.model.layers):
            q, k, v = layer.qkv(self._norm(layer.ln1, x), *rot[self.model.layer_rope[i]])
            self.cache.update(i, rows, positions, k, v, real)
            x = x + layer.after_attention(layer.o(attend(i, layer, q, k, v)))
            x = x + layer.after_mlp(layer.mlp(self._norm(layer.ln2, x)))
        return x

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.cap_logits(self._head(self._norm(self.model.norm, hidden)))

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """h @ the LM head's weight.T for a prompt's rows: cuBLAS, or an 8-bit head's product."""
        head, scale = self.model.head()
        if scale is None:
            return torch.matmul(h, head.t())
        return self._project("lm_head", head, None, h, scale, small=False)

    def _fused_layers(self, x: torch.Tensor, rope, attend, small: bool, mix=None) -> torch.Tensor:
        """The decoder stack on the fused kernels: per layer 4 matrix products (`_linear`; `small`:
        a decode step's, by the small-batch tables) and 4 small kernels (rotary + KV write `rope`,
        attention `attend`, residual add + norm twice (each with the output's own norm first in
        Gemma 2/3), the gated activation); add + norm and the activation hand an FP8 GEMM its input
        rounded per row (`_rounds_input`). `mix(i, layer, qkv, sums)`, where given, makes the o
        product from the qkv product itself (attention + o in one kernel). x is the residual stream
        (`ResidualStream`: at decode rows whose table says so, the products after each add + norm
        make their input); returns it normalised by the final norm, or the `Normed` input of an LM
        head that makes it."""
        m, scale = self.model, self._scale
        rows, pdl = x.numel() // x.shape[-1], self.kernels.pdl and small
        fmt = {kind: self._rounds_input(kind, rows, small) for kind in ROUNDED_BY_PRODUCER}
        sums = self._sums(x, rows, small, mix)
        readers = self._normed_readers(rows, small)
        res = ResidualStream(x, self.kernels.gemv_table if readers else None, pdl)
        first, mlp_reader = m.layers[0].ln1, readers[1] if readers else None
        h = res.norm(None, scale(first), first.eps, None, fmt["qkv_proj"], "qkv_proj")
        for i, layer in enumerate(m.layers):
            qkv = self._linear("qkv_proj", layer, h, small)
            o = mix(i, layer, qkv, sums[i % 2]) if mix else self._linear("o", layer, attend(i, rope(i, qkv)), small)
            post, other = scale(layer.post_attention), sums[(i + 1) % 2] if mix else None
            h = res.norm(o, scale(layer.ln2), layer.ln2.eps, post, fmt["gate_up"], mlp_reader, other)
            last = i + 1 == len(m.layers)
            nxt, rounds = (m.norm, None) if last else (m.layers[i + 1].ln1, fmt["qkv_proj"])
            down = self._mlp(layer, h, small, fmt["down"], pdl, sums[0] if sums is not None else None)
            reader = "lm_head" if last else "qkv_proj"
            h = res.norm(down, scale(nxt), nxt.eps, scale(layer.post_mlp), rounds, reader)
        return h

    def _normed_readers(self, rows: int, small: bool) -> tuple[str, ...]:
        """The products after an add + norm at decode rows (`normed.readers`; none in a prefill),
        which `ResidualStream` lets make their input where the table says so."""
        from ..kernels import normed

        return normed.readers(self.kernels.gemv_table, rows) if small else ()

    def _sums(self, x: torch.Tensor, rows: int, small: bool, mix) -> torch.Tensor | None:
        """Zeros for the sums that atomic-add kernels make (attention + o where `mix` is given, the
        fused MLP at decode rows whose table has its tile, `mlp.KEY`), once a step: two buffers
        [2, rows, E]. An add + norm kernel zeroes what it reads (`gemv.Accumulated`), so the fused
        MLP shares the first; a product making its input from attention + o's sums cannot (all its
        programs read them), so layer i's attention + o adds into buffer i % 2 and the product
        reading it zeroes the other (`ResidualStream.norm`'s `clear`)."""
        from ..kernels import mlp

        if mix is None and not (small and (mlp.KEY, rows) in self.kernels.gemv_table):
            return None
        return torch.zeros(2, rows, x.shape[-1], dtype=torch.float32, device=x.device)

    def _mlp(self, layer, h, small: bool, rounds: torch.dtype | None, pdl: bool, sums: torch.Tensor | None = None):
        """The down product of act(gate) * up of h: at decode rows whose table has its tile
        (`mlp.KEY`), the whole MLP in one kernel adding into the step's `sums` (`_sums`,
        `mlp.fused_mlp`); at decode rows whose table has it (`gemv.GLU_KEYS`), gate_up's tile makes
        the activation itself and a down tile takes it as it is; else gate_up's product, then
        `_down`."""
        from ..kernels import gemv, mlp

        rows = rows_of(h)
        tile = self.kernels.gemv_table.get((mlp.KEY, rows)) if small else None
        if tile is not None:
            (w, _, s), (wd, _, sd) = operands(layer.gate_up), operands(layer.down)
            return mlp.fused_mlp(h, (w, s), (wd, sd), layer.activation, tile, sums, pdl)
        if small and (gemv.GLU_KEYS[0], rows) in self.kernels.gemv_table:
            act = self._linear("gate_up", layer, h, small, gemv.GLU_KEYS[0], layer.activation)
            return self._linear("down", layer, act, small, gemv.GLU_KEYS[1])
        return self._down(layer, self._linear("gate_up", layer, h, small), small, rounds, pdl)

    def _down(self, layer, gate_up, small: bool, rounds: torch.dtype | None, pdl: bool):
        """The down product of act(gate) * up: on gate_up's product itself where the decode table
        has a tile for that (`gemv.Gated`: no activation kernel, no round trip of its output), else
        after the activation kernel (rounding per row where the product takes `rounds`)."""
        from ..kernels import fused as fk
        from ..kernels import gemv

        gated, config = gemv.Gated(gate_up, layer.activation), None
        if small:  # (a prompt's products are never gated: only decode rows have table entries)
            config = self.kernels.gemv_table.get((gemv.gated_key("down"), gated.shape.numel() // gated.shape[-1]))
        if config is None:
            return self._linear("down", layer, fk.activate_mul(gate_up, layer.activation, rounds, pdl), small)
        weight, bias, scale = operands(layer.down)
        return gemv.small_matmul(gated, weight, bias, config, scale, self._pdl_steps())

    def _pdl_steps(self) -> int | None:
        """small_matmul's PDL argument: K steps to ask L2 for, or None where PDL is off."""
        return self.kernels.prefetch_steps if self.kernels.pdl else None

    def _rounds_input(self, kind: str, rows: int, small: bool) -> torch.dtype | None:
        """e4m3 where the layers' product `kind` at `rows` rows is the FP8 GEMM or a tile that takes
        its input rounded per row, else None (the product takes its input as it is)."""
        if not self.fuse_row_quantization:
            return None
        from ..kernels import gemv, mlp, qmatmul
        from ..kernels.rows import float8_of

        weight, _, scale = operands(getattr(self.model.layers[0], kind))
        if scale is None or float8_of(weight) is None:
            return None

        table = self.kernels.gemv_table
        if small and kind == "gate_up" and (mlp.KEY, rows) in table:  # the fused MLP's tile reads it
            return weight.dtype if table[(mlp.KEY, rows)][5] == gemv.X_ROUNDED_PER_ROW else None
        if small and (kind, rows) in table:
            return weight.dtype if gemv.takes_rounded(table[(kind, rows)]) else None
        return weight.dtype if qmatmul.takes_rounded(qmatmul.choose(self.kernels.quant_table, kind, rows)) else None

    def _scale(self, norm) -> torch.Tensor | None:
        return None if norm is None else self._scales[id(norm)]

    def _head_norms(self, layer) -> tuple | None:
        """The fused rotary kernel's q/k-norm argument: (q scale, k scale, eps, Gemma-style) or None."""
        if layer.q_norm is None:
            return None
        return self._scale(layer.q_norm), self._scale(layer.k_norm), layer.q_norm.eps, bool(layer.q_norm.offset)

    @staticmethod
    def _attention_args(layer) -> tuple:
        """decode_attention's (window, scale, softcap) for a layer."""
        return layer.window, layer.scale, layer.softcap

    def _linear(self, kind: str, layer, x, small: bool = True, key: str | None = None, glu: str | None = None):
        """A layer's projection `kind` of x, by the start-up tables (`_project`)."""
        weight, bias, scale = operands(getattr(layer, kind))
        return self._project(kind, weight, bias, x, scale, small, key, glu)

    def _project(self, kind: str, weight, bias, x, scale=None, small=True, key: str | None = None, glu=None):
        """x @ weight.T + bias: the tuned small-batch tile for these rows (`small`: a decode step;
        the table's entry under `key` where given, else `kind`), else cuBLAS; an 8-bit weight (with
        `scale`) otherwise takes its tuned large-batch product, on x rounded per row where that
        product takes it so (`QuantRows`, see `_rounds_input`). `glu`: the tile makes the
        activation of gate_up's product (`gemv.small_matmul`; its table entry is a tile)."""
        from ..kernels import gemv, normed, qmatmul

        rounded, made = isinstance(x, qmatmul.QuantRows), isinstance(x, Normed)
        table_key = normed.key(key or kind) if made else key or kind
        rows = rows_of(x)
        config = self.kernels.gemv_table.get((table_key, rows)) if small else None
        if made and not isinstance(config, tuple):
            raise ValueError(f"{kind}: a product making its input needs a tile under {table_key!r}, got {config!r}")
        if config == gemv.FP8_GEMM:  # the FP8 GEMM, tuned for these rows
            return qmatmul.fp8_matmul(x, weight, scale, bias)
        if config is not None:
            if gemv.takes_rounded(config) and not (rounded or made):  # the first layer's qkv: a plain norm made x
                x = qmatmul.round_rows(x, weight.dtype)
            return gemv.small_matmul(x, weight, bias, config, scale, self._pdl_steps(), glu)
        if scale is None:
            return F.linear(x, weight, bias)
        return qmatmul.matmul(x, weight, scale, bias, qmatmul.choose(self.kernels.quant_table, kind, rows))
