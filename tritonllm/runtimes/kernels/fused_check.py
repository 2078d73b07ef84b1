"""The start-up check of the fused kernels (`fused.py`): each compiled and run once on small inputs
against the reference ops, before the runtime chooses them over the torch ops."""

from __future__ import annotations

import torch

from . import attention
from .fused import activate_mul, add_rms_norm, rope_kv_write
from .pages import as_values, read_pages, value_pool


def self_check(
    device, dtype, head_dim: int, qk_norm: bool = False, fp8_kv: bool = False, fp8_rows: bool = False
) -> None:
    """Compile and run each kernel once on small inputs against the reference ops (the q/k-norm
    rotary form where the model needs it, the fp8-cache forms with `fp8_kv`, the forms that round
    their output for an FP8 GEMM with `fp8_rows`); raises if a kernel does not compile on this
    GPU/Triton or disagrees."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)
    qkv, ang = r(2, 1, 4 * head_dim), torch.randn(2, 1, head_dim // 2, generator=g)
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(device, dtype) for f in (torch.cos, torch.sin))
    kc = torch.zeros(2, 1, 4, head_dim, device=device, dtype=dtype)  # 2 slots of one 4-position block each
    vc = value_pool(kc.shape, dtype, device)  # the runtime's value layout
    own = torch.arange(2, device=device, dtype=torch.int32).view(2, 1)  # slot s: block s
    q = rope_kv_write(qkv, cos, sin, kc, vc, own, torch.tensor([1, 3], device=device), 2, 1)
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
        own,
        torch.tensor([2, 0], device=device),
        2,
        1,
        slots=torch.tensor([1, 0], device=device),
        return_k=True,
    )
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(k2[:, 0], kc[torch.tensor([1, 0]), 0, torch.tensor([2, 0])])
    if qk_norm:
        weights = (r(head_dim), r(head_dim), 1e-6, False)
        q3 = rope_kv_write(qkv, cos, sin, kc, vc, own, torch.tensor([1, 3], device=device), 2, 1, qk_norm=weights)
        normed = torch.nn.functional.rms_norm(x, (head_dim,), eps=1e-6).to(dtype).float() * weights[0].float()
        ref = normed * cos.float() + torch.cat([-normed[..., half:], normed[..., :half]], -1) * sin.float()
        torch.testing.assert_close(q3.float(), ref, atol=5e-2, rtol=5e-2)
    res, w = r(2, 1, 64), r(64)
    expected = (res.float() + qkv[..., :64].float()).to(dtype)
    out = add_rms_norm(qkv[..., :64].contiguous(), res, w, 1e-5)
    torch.testing.assert_close(
        out.float(), torch.nn.functional.rms_norm(expected.float(), (64,), w.float(), 1e-5), atol=5e-2, rtol=5e-2
    )
    kc, vc, q4 = r(10, 2, 16, head_dim), as_values(r(10, 2, 16, head_dim)), r(2, 8, head_dim)  # 10 blocks of 16
    table = torch.tensor([[9, 7, 5, 3, 1], [8, 6, 4, 2, 0]], device=device, dtype=torch.int32)
    keys, values = read_pages(kc, table), read_pages(vc, table)
    pos = torch.tensor([70, 5], device=device)
    ref = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q4[i].view(2, 4, head_dim).float(),
                keys[i, :, : pos[i] + 1].float(),
                values[i, :, : pos[i] + 1].float(),
            ).view(1, -1)
            for i in range(2)
        ]
    )
    torch.testing.assert_close(
        attention.decode_attention(q4, kc, vc, table, pos, 80).view(2, -1).float(), ref, atol=5e-2, rtol=5e-2
    )
    # prompt-piece tiles (compiled separately): two tokens of slot 0 in one program, as each in its own
    tokens, one_slot = torch.tensor([69, 70], device=device), torch.zeros(2, dtype=torch.long, device=device)
    tiles = attention.PieceTiles.of([2], 16, lambda v: torch.tensor(v, dtype=torch.int32, device=device))
    alone = attention.decode_attention(q4, kc, vc, table, tokens, 80, row_slots=one_slot)
    tiled = attention.decode_attention(q4, kc, vc, table, tokens, 80, row_slots=one_slot, tiles=tiles)
    torch.testing.assert_close(tiled.float(), alone.float(), atol=5e-2, rtol=5e-2)
    if fp8_kv:  # e4m3 caches of the same values (halved: scale 2), read back through the scales
        scale = torch.full((2, 2), 2.0, device=device)
        k8, v8 = ((c.float() / 2).to(torch.float8_e4m3fn) for c in (kc, vc))
        got = attention.decode_attention(q4, k8, v8, table, pos, 80, kv_scale=scale).view(2, -1).float()
        torch.testing.assert_close(got, ref, atol=0.15, rtol=0.15)
        got = attention.decode_attention(q4, k8, v8, table, tokens, 80, row_slots=one_slot, kv_scale=scale, tiles=tiles)
        torch.testing.assert_close(got.float(), alone.float(), atol=0.15, rtol=0.15)
        own8 = torch.zeros(2, 1, 4, head_dim, device=device, dtype=torch.float8_e4m3fn)
        values8 = value_pool(own8.shape, own8.dtype, device)
        rope_kv_write(qkv, cos, sin, own8, values8, own, torch.tensor([1, 3], device=device), 2, 1, kv_scale=scale)
    gu = r(2, 1, 128)
    torch.testing.assert_close(
        activate_mul(gu).float(),
        (torch.nn.functional.silu(gu[..., :64].float()) * gu[..., 64:].float()),
        atol=5e-2,
        rtol=5e-2,
    )
    if fp8_rows:  # the e4m3 rows and scales of the row-quantizing kernel (its own check: tests, bench)
        from .qmatmul import quantize_rows

        e4m3, x, res0 = torch.float8_e4m3fn, r(2, 1, 64), r(2, 1, 64)
        for plain, rows in (
            (add_rms_norm(x, res0.clone(), w, 1e-5), add_rms_norm(x, res0.clone(), w, 1e-5, quantize=e4m3)),
            (activate_mul(gu), activate_mul(gu, quantize=e4m3)),
        ):
            q, scale = quantize_rows(plain.view(2, -1), e4m3)
            if not (torch.equal(rows.q[:2].float(), q.float()) and torch.equal(rows.scale[:2], scale)):
                raise AssertionError("a kernel's e4m3 rows differ from quantize_rows' rounding of its output")
