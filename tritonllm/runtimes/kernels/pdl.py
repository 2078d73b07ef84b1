"""Programmatic dependent launch (Hopper and later): a decode step is a chain of ~150 (1B) to ~300
(8B) small kernels, each waiting for the one before. Launched with PDL, a kernel's programs start
while the kernel before still runs: they set up and ask L2 for the weight bytes they read first
(which no kernel writes), then wait (`griddepcontrol.wait`) until the kernel before has finished
and its writes are visible. The launch gap and the first DRAM round trip of each kernel then hide
behind the previous kernel's tail.

Every kernel launched with PDL calls `enter` before it reads anything another kernel writes and
before it writes anything: the wait is what orders it after its predecessor (and, through that
predecessor's own wait, after everything earlier). A kernel launched without PDL (torch's, cuBLAS)
is ordered as usual. Triton's interpreter has no `griddepcontrol`: there PDL is never asked for."""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: `supported` says no, so PDL=True never compiles
    gdc_launch_dependents = gdc_wait = None

LINE = 128  # bytes an L2 prefetch asks for (written out in `prefetch_rows`: a jit function reads no globals)


def supported(device: torch.device) -> bool:
    """PDL on this device: CUDA compute capability 9.0+, a Triton that launches with it, not the
    interpreter; TRITONLLM_PDL=0 turns it off."""
    if device.type != "cuda" or os.environ.get("TRITONLLM_PDL") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if gdc_wait is None or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    from triton.backends.nvidia.compiler import CUDAOptions

    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def launch(pdl: bool) -> dict:
    """A kernel's keyword arguments for a launch with PDL or without (its `PDL` constexpr and, when
    on, Triton's launch option; an older Triton never sees the option)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


@triton.jit
def enter(PDL: tl.constexpr):
    """Wait for the kernel before (its writes visible), then let the next kernel's programs launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows(ptr, rows, row_ok, stride, k0, K, LINES: tl.constexpr, ELEM: tl.constexpr):
    """Ask L2 for LINES lines of 128 bytes of each row `rows` of a [*, K] matrix of ELEM-byte
    values from column k0 (rows not `row_ok` and columns past K ask for the matrix's first line)."""
    k = k0 + tl.arange(0, LINES) * (128 // ELEM)
    ok = row_ok[:, None] & (k < K)[None, :]
    ptrs = tl.where(ok, ptr + rows[:, None] * stride + k[None, :], ptr)
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
    )


def prefetch_lines(k: int, block_k: int, elem: int, steps: int) -> int:
    """Lines of a weight row `prefetch_rows` asks for: `steps` K steps of block_k values, at most
    the row's k values, a power of two (0: none)."""
    lines = min(steps * block_k, k) * elem // LINE
    return 0 if lines < 1 else triton.next_power_of_2(lines + 1) // 2
