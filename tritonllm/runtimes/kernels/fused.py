"""Fused kernels (OpenAI Triton) for the torch-cuda runtime's decode and prefill: a decode step is otherwise
~390 small kernels whose launch and tail cost exceeds the matrix products at batch 1.

- `rope_kv_write`: rotary on q and k of every head plus the K/V cache write, from the fused qkv
  projection, in one kernel (replaces ~8: slices, rotate_half, muls, adds, two index_puts); for
  a decode token per slot, or a prefill's every token (rows mapped to their slots).
- `add_rms_norm`: residual add (in place) + RMSNorm in one kernel (replaces 2).
- `silu_mul`: SiLU(gate) * up in one kernel (replaces 2).
- `decode_attention`: one query token per row against its slot's cached keys/values, flash-style
  (online softmax over blocks of the context), the G query heads of a KV head as the rows of one
  tile so K/V are read once; each row reads only its own valid length (read on the device, so one
  CUDA graph serves every length).
The kernels that read a matrix product (rotary, add + norm, SiLU * up) also take it as
`gemv.SplitK` partial sums and add them up as they load (`_load_product`): a split-K product
needs no reduce kernel of its own.
Arithmetic in float32, stored in the activations' type. Checked against the reference ops with
TRITON_INTERPRET=1 on the CPU (tests/parity) and measured on the GPU (bench)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemv import SplitK


@triton.jit
def _load_product(ptr, offs, mask, n_split, s_split, like):
    """A matrix product's values at ptr + offs as float32: the sum of its `n_split` partial sums
    (slices `s_split` apart; 1 for a plain product), rounded to `like`'s element type first, as
    the unsplit product's output is."""
    acc = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in range(1, n_split):
        acc += tl.load(ptr + s * s_split + offs, mask=mask, other=0.0).to(tl.float32)
    return acc.to(like.dtype.element_ty).to(tl.float32)


def _product(y: torch.Tensor | SplitK) -> tuple[torch.Tensor, int, int, torch.dtype]:
    """(values [S, rows, N], S, stride between slices, activations' type) of a plain or split product."""
    if isinstance(y, SplitK):
        return y.parts, y.parts.shape[0], y.parts.stride(0), y.dtype
    flat = y.reshape(1, -1, y.shape[-1])
    return flat, 1, flat.stride(0), y.dtype


@triton.jit
def _rope_kv_kernel(
    qkv,
    cos,
    sin,
    q_out,
    k_out,
    k_cache,
    v_cache,
    pos,
    row_slot,
    q_w,
    k_w,
    eps,
    n_heads,
    n_kv,
    n_split,
    s_split,
    s_qkv,
    s_cs,
    s_qo_b,
    s_qo_h,
    s_c_slot,
    s_c_head,
    s_c_pos,
    HALF: tl.constexpr,
    HP: tl.constexpr,
    KP: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    WRITE_K: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    row = tl.program_id(0)  # one token of one sequence, all its heads: q and k heads as the rows of a tile
    h, j = tl.arange(0, HP)[:, None], tl.arange(0, HALF)[None, :]
    live = (h < n_heads + n_kv) & (j < HALF)
    src = row * s_qkv + h * 2 * HALF + j
    x1 = _load_product(qkv, src, live, n_split, s_split, q_out)
    x2 = _load_product(qkv, src + HALF, live, n_split, s_split, q_out)
    if QK_NORM:  # Qwen3: each q and k head RMS-normed (rounded as the module rounds), then rotated
        r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        is_q_row = h < n_heads
        w1 = tl.where(is_q_row, tl.load(q_w + j).to(tl.float32), tl.load(k_w + j).to(tl.float32))
        w2 = tl.where(is_q_row, tl.load(q_w + HALF + j).to(tl.float32), tl.load(k_w + HALF + j).to(tl.float32))
        x1 = ((x1 * r).to(q_out.dtype.element_ty).to(tl.float32) * w1).to(q_out.dtype.element_ty).to(tl.float32)
        x2 = ((x2 * r).to(q_out.dtype.element_ty).to(tl.float32) * w2).to(q_out.dtype.element_ty).to(tl.float32)
    c1, c2 = tl.load(cos + row * s_cs + j).to(tl.float32), tl.load(cos + row * s_cs + HALF + j).to(tl.float32)
    s1, s2 = tl.load(sin + row * s_cs + j).to(tl.float32), tl.load(sin + row * s_cs + HALF + j).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    is_q = live & (h < n_heads)
    dst = q_out + row * s_qo_b + h * s_qo_h + j
    tl.store(dst, y1.to(q_out.dtype.element_ty), mask=is_q)
    tl.store(dst + HALF, y2.to(q_out.dtype.element_ty), mask=is_q)
    slot = tl.load(row_slot + row) if HAS_SLOTS else row
    at = slot * s_c_slot + tl.load(pos + row) * s_c_pos
    is_k, kv = live & (h >= n_heads), h - n_heads
    tl.store(k_cache + at + kv * s_c_head + j, y1.to(k_cache.dtype.element_ty), mask=is_k)
    tl.store(k_cache + at + kv * s_c_head + HALF + j, y2.to(k_cache.dtype.element_ty), mask=is_k)
    if WRITE_K:
        kdst = k_out + (row * n_kv + kv) * 2 * HALF + j
        tl.store(kdst, y1.to(k_out.dtype.element_ty), mask=is_k)
        tl.store(kdst + HALF, y2.to(k_out.dtype.element_ty), mask=is_k)
    g, d = tl.arange(0, KP)[:, None], tl.arange(0, 2 * HALF)[None, :]  # v heads: copied as they are
    v_live = (g < n_kv) & (d < 2 * HALF)
    v = _load_product(qkv, row * s_qkv + (n_heads + n_kv + g) * 2 * HALF + d, v_live, n_split, s_split, v_cache)
    tl.store(v_cache + at + g * s_c_head + d, v.to(v_cache.dtype.element_ty), mask=v_live)


def rope_kv_write(
    qkv: torch.Tensor | SplitK,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    n_heads: int,
    n_kv: int,
    slots: torch.Tensor | None = None,
    return_k: bool = False,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """qkv [..., (H+2Hkv)*D] (or its split partial sums): R token rows, row r at positions[r] of
    cache slot slots[r] (default: slot r, one decode token per slot); cos/sin [..., D] per row;
    k/v_cache [slots,Hkv,C,D] (one layer). Writes rotated k and v into the caches; returns rotated
    q [R,H,D], and with `return_k` also the rotated k [R,Hkv,D] (what a prefill attends to).
    `qk_norm`: (q weight [D], k weight [D], eps) of an RMSNorm over each head before the rotary."""
    parts, n_split, s_split, dtype = _product(qkv)
    rows, d = parts.shape[1], k_cache.shape[-1]
    cos, sin = cos.reshape(-1, d), sin.reshape(-1, d)
    q = torch.empty((rows, n_heads, d), dtype=dtype, device=parts.device)
    k = torch.empty((rows, n_kv, d), dtype=dtype, device=parts.device) if return_k else q
    _rope_kv_kernel[(rows,)](
        parts,
        cos,
        sin,
        q,
        k,
        k_cache,
        v_cache,
        positions,
        slots if slots is not None else positions,
        qk_norm[0] if qk_norm else cos,
        qk_norm[1] if qk_norm else cos,
        qk_norm[2] if qk_norm else 0.0,
        n_heads,
        n_kv,
        n_split,
        s_split,
        parts.stride(1),
        cos.stride(0),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HALF=d // 2,
        HP=triton.next_power_of_2(n_heads + n_kv),
        KP=max(2, triton.next_power_of_2(n_kv)),
        HAS_SLOTS=slots is not None,
        WRITE_K=return_k,
        QK_NORM=qk_norm is not None,
    )
    return (q, k) if return_k else q


@triton.jit
def _add_rms_norm_kernel(x, residual, weight, out, n, eps, n_split, s_split, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < n
    s = _load_product(x, row * n + i, m, n_split, s_split, residual) + tl.load(
        residual + row * n + i, mask=m, other=0.0
    ).to(tl.float32)
    s_stored = s.to(residual.dtype.element_ty)
    tl.store(residual + row * n + i, s_stored, mask=m)
    s = s_stored.to(tl.float32)  # normalise what the residual stream holds
    inv = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n + eps)
    w = tl.load(weight + i, mask=m, other=0.0).to(tl.float32)
    tl.store(out + row * n + i, (s * inv * w).to(out.dtype.element_ty), mask=m)


def add_rms_norm(x: torch.Tensor | SplitK, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place); returns RMSNorm(residual) * weight. Contiguous [..., E] tensors
    (x may be a product's split partial sums)."""
    parts, n_split, s_split, _ = _product(x)
    n = residual.shape[-1]
    out = torch.empty_like(residual)
    _add_rms_norm_kernel[(residual.numel() // n,)](
        parts, residual, weight, out, n, eps, n_split, s_split, BLOCK=triton.next_power_of_2(n)
    )
    return out


@triton.jit
def _silu_mul_kernel(gate_up, out, f, n_split, s_split, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    i = blk * BLOCK + tl.arange(0, BLOCK)
    m = i < f
    g = _load_product(gate_up, row * 2 * f + i, m, n_split, s_split, out)
    u = _load_product(gate_up, row * 2 * f + f + i, m, n_split, s_split, out)
    tl.store(out + row * f + i, (g / (1.0 + tl.exp(-g)) * u).to(out.dtype.element_ty), mask=m)


def silu_mul(gate_up: torch.Tensor | SplitK) -> torch.Tensor:
    """[..., 2F] (gate then up; or its split partial sums [S, rows, 2F]) -> SiLU(gate) * up [..., F]
    ([rows, 1, F] from partial sums)."""
    parts, n_split, s_split, dtype = _product(gate_up)
    f, rows = parts.shape[-1] // 2, parts.shape[1]
    lead = gate_up.shape[:-1] if isinstance(gate_up, torch.Tensor) else (rows, 1)
    out = torch.empty((*lead, f), dtype=dtype, device=parts.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(f, block))](parts, out, f, n_split, s_split, BLOCK=block)
    return out


@triton.jit
def _decode_attention_kernel(
    q,
    k_cache,
    v_cache,
    pos,
    out,
    limit,
    window,
    scale,
    s_q_b,
    s_q_h,
    s_c_slot,
    s_c_head,
    s_c_pos,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b, kv = tl.program_id(0), tl.program_id(1)
    g, d = tl.arange(0, GP), tl.arange(0, D)
    rows = (kv * G + g)[:, None] * s_q_h + d[None, :]
    qv = tl.load(q + b * s_q_b + rows, mask=(g < G)[:, None], other=0.0)
    n = tl.minimum(tl.load(pos + b) + 1, limit)  # keys 0..pos, never beyond the graph's context
    lo = tl.maximum(n - window, 0)  # a sliding window sees the last `window` keys only
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = b * s_c_slot + kv * s_c_head
    for start in range((lo // BLOCK_N) * BLOCK_N, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        live = (cols < n) & (cols >= lo)
        at = base + cols[:, None] * s_c_pos + d[None, :]
        kb = tl.load(k_cache + at, mask=live[:, None], other=0.0)
        s = tl.where(live[None, :], tl.dot(qv, tl.trans(kb)).to(tl.float32) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_cache + at, mask=live[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb).to(tl.float32)
        m_i = m_new
    tl.store(out + b * s_q_b + rows, (acc / l_i[:, None]).to(out.dtype.element_ty), mask=(g < G)[:, None])


# (keys per block, warps, stages); 2 warps: a batch of many rows runs more programs per SM at once
ATTENTION_CONFIGS = ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2), (64, 2, 3), (32, 2, 4))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    limit: int,
    config: tuple[int, int, int] = ATTENTION_CONFIGS[0],
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q [B,H,D] (contiguous) of slots 0..B-1 at positions [B]; k/v_cache [slots,Hkv,C,D] (one layer).
    Row b attends to keys 0..min(positions[b], limit - 1), the last `window` of them where one is
    set; scores scaled by `scale` (default D ** -0.5). Returns [B,1,H*D]. `config`: keys per block
    (fewer blocks, fewer dependent loads: what a batch of few rows waits on), warps, stages."""
    b, h, d = q.shape
    hkv = k_cache.shape[1]
    out = torch.empty_like(q)
    block_n, warps, stages = config
    _decode_attention_kernel[(b, hkv)](
        q,
        k_cache,
        v_cache,
        positions,
        out,
        limit,
        window or 2**30,
        scale or d**-0.5,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        G=h // hkv,
        GP=max(16, triton.next_power_of_2(h // hkv)),
        D=d,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
    )
    return out.view(b, 1, h * d)


def tune_attention(k_caches, v_caches, num_heads: int, batches, context: int) -> tuple[dict, list]:
    """The fastest ATTENTION_CONFIGS entry per batch size, timed over every layer's cache at
    `context` keys per row (CUDA graph replays). Returns ({batch: config}, timings for the log)."""
    from .gemv import graph_ms

    d = k_caches[0].shape[-1]
    table, report = {}, []
    for b in batches:
        q = torch.randn(b, num_heads, d, device=k_caches[0].device, dtype=k_caches[0].dtype)
        pos = torch.full((b,), context - 1, device=q.device)
        kr, vr = (torch.randn_like(c[0][:b, :, :context]) for c in (k_caches, v_caches))  # the cache may be all zeros
        ref = decode_attention(q, kr, vr, pos, context).float()
        agree = [
            cfg
            for cfg in ATTENTION_CONFIGS  # the default is checked against SDPA in self_check
            if torch.allclose(decode_attention(q, kr, vr, pos, context, cfg).float(), ref, atol=2e-2, rtol=2e-2)
        ]
        times = {
            cfg: graph_ms(
                lambda cfg=cfg: [decode_attention(q, k, v, pos, context, cfg) for k, v in zip(k_caches, v_caches)]
            )
            for cfg in agree
        }
        table[b] = min(times, key=times.get)
        report.append(
            {"batch": b, "chosen": str(table[b]), "us": {str(c): round(1e3 * t, 1) for c, t in times.items()}}
        )
    return table, report


def self_check(device, dtype, head_dim: int, qk_norm: bool = False) -> None:
    """Compile and run each kernel once on small inputs against the reference ops (the q/k-norm
    rotary form where the model needs it); raises if a kernel does not compile on this GPU/Triton
    or disagrees."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    qkv, ang = r(2, 1, 4 * head_dim), torch.randn(2, 1, head_dim // 2, generator=g)
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin))
    kc = torch.zeros(2, 1, 4, head_dim, device=device, dtype=dtype)
    vc = torch.zeros_like(kc)
    q = rope_kv_write(qkv, cos, sin, kc, vc, torch.tensor([1, 3], device=device), 2, 1)
    x = qkv.view(2, 1, 4, head_dim)[:, 0, :2].float()
    half = head_dim // 2
    ref = x * cos.float() + torch.cat([-x[..., half:], x[..., :half]], -1) * sin.float()
    torch.testing.assert_close(q.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(vc[1, 0, 3].float(), qkv[1, 0, 3 * head_dim :].float())
    # the prefill form: rows mapped to slots, rotated k returned (compiled separately)
    q2, k2 = rope_kv_write(
        qkv,
        cos,
        sin,
        kc,
        vc,
        torch.tensor([2, 0], device=device),
        2,
        1,
        slots=torch.tensor([1, 0], device=device),
        return_k=True,
    )
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(k2[:, 0], kc[torch.tensor([1, 0]), 0, torch.tensor([2, 0])])
    if qk_norm:
        weights = (r(head_dim), r(head_dim), 1e-6)
        q3 = rope_kv_write(qkv, cos, sin, kc, vc, torch.tensor([1, 3], device=device), 2, 1, qk_norm=weights)
        normed = torch.nn.functional.rms_norm(x, (head_dim,), eps=1e-6).to(dtype).float() * weights[0].float()
        ref = normed * cos.float() + torch.cat([-normed[..., half:], normed[..., :half]], -1) * sin.float()
        torch.testing.assert_close(q3.float(), ref, atol=5e-2, rtol=5e-2)
    res, w = r(2, 1, 64), r(64)
    expected = (res.float() + qkv[..., :64].float()).to(dtype)
    out = add_rms_norm(qkv[..., :64].contiguous(), res, w, 1e-5)
    torch.testing.assert_close(
        out.float(), torch.nn.functional.rms_norm(expected.float(), (64,), w.float(), 1e-5), atol=5e-2, rtol=5e-2
    )
    kc, vc, q4 = r(2, 2, 80, head_dim), r(2, 2, 80, head_dim), r(2, 8, head_dim)
    pos = torch.tensor([70, 5], device=device)
    ref = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q4[i].view(2, 4, head_dim).float(), kc[i, :, : pos[i] + 1].float(), vc[i, :, : pos[i] + 1].float()
            ).view(1, -1)
            for i in range(2)
        ]
    )
    torch.testing.assert_close(decode_attention(q4, kc, vc, pos, 80).view(2, -1).float(), ref, atol=5e-2, rtol=5e-2)
    gu = r(2, 1, 128)
    torch.testing.assert_close(
        silu_mul(gu).float(),
        (torch.nn.functional.silu(gu[..., :64].float()) * gu[..., 64:].float()),
        atol=5e-2,
        rtol=5e-2,
    )
