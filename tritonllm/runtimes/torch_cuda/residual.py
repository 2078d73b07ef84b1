"""The residual stream of a step on the fused kernels, and the add + norm before each product
that reads it: the add + norm kernel (in place), or at decode rows whose table has the reading
product's tile for it, that product making its own input (`kernels/rows.Normed`), which moves the
stream to the other of two buffers (the product's programs read one while its first writes the
other)."""

from __future__ import annotations

import torch

from ..kernels.rows import Normed


class ResidualStream:
    """`x` [rows, 1, E] (updated in place, or replaced by its twin buffer); `table` the decode
    table where products may make their input (None: the add + norm kernel always, as in a
    prefill); `pdl`: the kernels launched with PDL."""

    def __init__(self, x: torch.Tensor, table: dict | None, pdl: bool):
        self.x, self.spare, self.table, self.pdl = x, None, table, pdl
        self.rows = x.numel() // x.shape[-1]

    def norm(self, delta, weight, eps: float, post=None, rounds=None, reader: str | None = None, clear=None):
        """The input of the product that reads RMSNorm(x + delta) * weight (delta None: x's norm
        alone; `post`: Gemma's norm of delta first, which only the kernel makes): a `Normed` for
        the decode table's tile under `normed.key(reader)` where it has one, the stream moving to
        the other buffer, with `clear` (sums an earlier product added with atomics) zeroed by its
        programs; else the kernel's output (rounded per row to `rounds` where given), x updated in
        place, and any `Accumulated` delta zeroed by it."""
        from ..kernels import fused as fk
        from ..kernels import normed

        if self.makes(reader) and post is None:
            steps = self.table.get((normed.prefetch_key(reader), self.rows), 0)
            if delta is None:
                return Normed(None, self.x, self.x, weight, eps, clear, steps)
            if self.spare is None:
                self.spare = torch.empty_like(self.x)
            given = Normed(delta, self.x, self.spare, weight, eps, clear, steps)
            self.x, self.spare = self.spare, self.x
            return given
        return fk.add_rms_norm(delta, self.x, weight, eps, post, rounds, self.pdl)

    def makes(self, reader: str | None) -> bool:
        """Whether the product read under `reader` at these rows makes its input (`normed.key`)."""
        from ..kernels import normed

        return self.table is not None and reader is not None and (normed.key(reader), self.rows) in self.table
