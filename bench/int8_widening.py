"""Does widening int8 weights to float32 limit the small-batch gemv? Triton turns `w.to(float32)` of an
int8 into I2F, which Hopper issues at a quarter of the float rate: at one row a gemv over int8
weights needs one a byte, about as many as the copy bandwidth brings (3 TB/s against 132 SMs x 16 a
clock). An exact alternative adds 2^23 + 128 to the integer, reads the bits as a float and subtracts
2^23 + 128 (an integer and a float add). This bench times one gemv tile loop (the engine's one-row
gemv form, `gemv._rows_step`: x a vector against the weight tile, summed along K on the CUDA cores)
over int8 weights widened each way, beside the same loop over float8 weights and the engine's
`gemv.small_matmul` on the int8 and the float8 weights, for the LM heads and layer products of the
1B and 8B at one row (without PDL), against the bytes' time; and per form, a line fitted through its
best time per product against the product's bytes: a fixed cost per launch plus a streaming rate
(`fit`), which says whether the small products lose their time to each launch or to the rate they
read at. The results also record each loop's widening instructions per weight value in the SASS
compiled for sm_90 (`sass_per_value`).

  python -m bench.int8_widening
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

log = logging.getLogger("bench.int8_widening")
SHAPES = {  # (N, K) of the products a decode step streams
    "1b o": (2048, 2048),
    "1b qkv": (3072, 2048),
    "1b lm_head": (128256, 2048),
    "1b gate_up": (16384, 2048),
    "1b down": (2048, 8192),
    "8b lm_head": (128256, 4096),
    "8b gate_up": (28672, 4096),
}
TILES = ((4, 1024, 4), (2, 2048, 4), (8, 1024, 8))  # (rows of W, K step, warps), as gemv's configs
SPAN = 512 << 20  # bytes of weight copies a form reads in turn: ten times an H100's or H200's L2


@triton.jit
def widened(wt, MAGIC: tl.constexpr):
    """An 8-bit weight tile as float32: int8 through 2^23 + 128 + w read as a float, exactly, where MAGIC."""
    if MAGIC:
        y = (wt.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        y = wt.to(tl.float32)
    return y


@triton.jit
def _gemv_kernel(x, w, scale, out, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MAGIC: tl.constexpr):
    """out[n] = scale[n] * sum_k x[k] * w[n, k] for this program's BLOCK_N rows of w."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xk = tl.load(x + k, mask=k_ok, other=0.0).to(tl.float32)
        wt = tl.load(w + n[:, None] * K + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.sum(widened(wt, MAGIC) * xk[None, :], 1)
    tl.store(out + n, acc * tl.load(scale + n, mask=n_ok, other=0.0), mask=n_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, tile, magic: bool) -> torch.Tensor:
    """x [K] (bf16) times w [N, K] (int8 or float8) with a scale per row: [N] float32."""
    block_n, block_k, warps = tile
    out = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(w.shape[0], block_n),)
    _gemv_kernel[grid](x, w, scale, out, w.shape[0], w.shape[1], block_n, block_k, magic, num_warps=warps)
    return out


def weights(n: int, k: int, device, seed: int = 0) -> dict:
    """The same random values as int8 and as float8 e4m3, a scale per row."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int32).to(torch.int8)
    fp8 = (q.float() / 16).to(torch.float8_e4m3fn)
    return {"int8": q, "fp8": fp8, "scale": torch.full((n,), 1 / 64, device=device)}


def measure(name: str, n: int, k: int, bandwidth: float) -> list[dict]:
    """Every form's us for one product at one row, its share of the bytes' time, and its largest
    difference from the int8 widened the plain way (0 where exact). Each form runs over `copies`
    of the weight in turn (SPAN bytes of them) in one CUDA graph, as a decode step reads every
    layer's weight once: a single small weight replayed would be read from L2 (50 MB), not DRAM."""
    from tritonllm.runtimes.kernels import gemv as engine_gemv
    from tritonllm.runtimes.kernels.timing import graph_ms

    ws = weights(n, k, "cuda")
    copies = [ws] + [{kind: w.clone() for kind, w in ws.items()} for _ in range(-(-SPAN // (n * k)) - 1)]
    x = torch.randn(k, device="cuda").to(torch.bfloat16)
    floor_us = 1e6 * n * k / bandwidth
    rows = []
    for tile in TILES:
        engine = lambda w, s, t=tile: engine_gemv.small_matmul(x[None], w, None, t, scale=s)[0].float()
        forms = {
            "int8, I2F": lambda c: gemv(x, c["int8"], c["scale"], tile, False),
            "int8, integer + float add": lambda c: gemv(x, c["int8"], c["scale"], tile, True),
            "fp8": lambda c: gemv(x, c["fp8"], c["scale"], tile, False),
            "int8, engine small_matmul": lambda c: engine(c["int8"], c["scale"]),
            "fp8, engine small_matmul": lambda c: engine(c["fp8"], c["scale"]),
        }
        ref = forms["int8, I2F"](ws)
        for form, fn in forms.items():
            diff = float((fn(ws) - ref).abs().max()) if form.startswith("int8, integer") else None
            us = 1e3 * graph_ms(lambda f=fn: [f(c) for c in copies], 5) / len(copies)
            rows.append(dict(product=name, n=n, k=k, tile=str(tile), form=form, us=round(us, 1), copies=len(copies),
                             bytes_share_pct=round(100 * floor_us / us, 1), max_diff=diff))  # fmt: skip
            log.info("%s", rows[-1])
    return rows


def fit(rows: list[dict]) -> list[dict]:
    """Per form, least squares of its best us per product against the product's bytes (N x K):
    the fixed us per launch and the streaming rate in GB/s."""
    best: dict[str, dict[str, tuple[int, float]]] = {}
    for r in rows:
        form = best.setdefault(r["form"], {})
        old = form.get(r["product"])
        if old is None or r["us"] < old[1]:
            form[r["product"]] = (r["n"] * r["k"], r["us"])
    out = []
    for form, points in best.items():
        if len(points) < 2:
            continue
        b = torch.tensor([p[0] for p in points.values()], dtype=torch.float64)
        t = torch.tensor([p[1] for p in points.values()], dtype=torch.float64)
        a = torch.stack([torch.ones_like(b), b], 1)
        fixed, per_byte = torch.linalg.lstsq(a, t[:, None]).solution[:, 0]
        out.append({"form": form, "fixed_us": round(float(fixed), 1), "rate_gb_s": round(1e-3 / float(per_byte))})
    return out


SASS_WEIGHTS = {"int8, I2F": ("*i8", False), "int8, integer + float add": ("*i8", True), "fp8": ("*fp8e4nv", False)}
CONVERSIONS = ("I2F", "F2FP", "HADD2.F32")  # SASS that widens a weight: int to float, float8 to half, half to float


def sass_ops(fn, signature: dict, constexprs: dict, aligned: list[int], warps: int) -> collections.Counter:
    """SASS instructions by opcode of the Triton kernel `fn` compiled for sm_90 here (no GPU
    needed): `signature` and `constexprs` as `triton.compiler.ASTSource` takes them, the arguments
    at `aligned` (positions) multiples of 16 as a launch on whole tensors makes them (so the loads
    are vectorized as they run), read from what Triton's bundled cuobjdump prints."""
    from triton.backends.compiler import GPUTarget

    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["cubin"]
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        done = subprocess.run([str(path / "cuobjdump"), "-sass", f.name], capture_output=True, check=True)
    return collections.Counter(
        op.decode() for op in re.findall(rb"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", done.stdout)
    )


def loop_ops(w_type: str, magic: bool, tile=TILES[0]) -> collections.Counter:
    """The SASS (`sass_ops`) of this file's gemv loop over `w_type` weights ("*i8", "*fp8e4nv"),
    widened by the integer + float add where `magic`, for `tile`."""
    block_n, block_k, warps = tile
    sig = {"x": "*bf16", "w": w_type, "scale": "*fp32", "out": "*fp32", "N": "i32", "K": "i32",
           "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "MAGIC": "constexpr"}  # fmt: skip
    consts = {"BLOCK_N": block_n, "BLOCK_K": block_k, "MAGIC": magic}
    return sass_ops(_gemv_kernel, sig, consts, list(range(6)), warps)


def sass_per_value(form: str, tile=TILES[0]) -> dict[str, float]:
    """The widening instructions (CONVERSIONS) per weight value of `form`'s gemv loop in its sm_90
    SASS (`loop_ops`): what the GPU issues, where the PTX's `cvt`s are not."""
    ops = loop_ops(*SASS_WEIGHTS[form], tile)
    block_n, block_k, warps = tile
    values = block_n * block_k  # one K step's weight values: the loop's body, unrolled once
    return {c: round(sum(n for op, n in ops.items() if op.startswith(c)) / values * 32 * warps, 2)
            for c in CONVERSIONS}  # fmt: skip


def main() -> None:
    from bench.measure import write_results
    from bench.provenance import DEFAULT_OUT
    from bench.workloads import copy_bandwidth

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--products", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--topic", default="int8-widening")
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()
    bandwidth = copy_bandwidth()
    facts = dict(copy_bandwidth_gb_s=round(bandwidth / 1e9), gpu=torch.cuda.get_device_name())
    facts["sass_widening_per_value"] = {form: sass_per_value(form) for form in SASS_WEIGHTS}
    rows = [r for name in a.products for r in measure(name, *SHAPES[name], bandwidth)]
    facts["fit"] = fit(rows)
    log.info("fixed us per launch + streaming rate: %s", facts["fit"])
    print(write_results(a.out, a.topic, facts, rows))


if __name__ == "__main__":
    main()
