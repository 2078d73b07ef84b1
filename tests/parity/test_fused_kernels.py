"""The fused OpenAI-Triton decode kernels, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1): each against the reference ops, and the whole fused decode step inside the
engine loop against HF greedy ids (with the small-batch `gemv` products, whose own checks are in
test_gemv_products.py). `triton` is pinned in requirements.lock, so `make test` runs these (fp32: the
interpreter's bf16 dot is wrong); the GPU benchmark runs the kernels compiled, in bf16."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
import triton
import triton.language as tl

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model.modeling import CausalLM, load_hf, rotate_half
from tritonllm.runtimes.kernels import attention as ak
from tritonllm.runtimes.kernels import attention_o as ao
from tritonllm.runtimes.kernels import attention_tuning, fused_check, gemv, mlp, normed
from tritonllm.runtimes.kernels import fused as fk
from tritonllm.runtimes.kernels import rope_attention as ra
from tritonllm.runtimes.kernels.pages import as_values, read_pages
from tritonllm.runtimes.kernels.rope_attention import rope_attention as fused_rope_attention
from tritonllm.runtimes.kernels.rows import Normed
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.runtimes.torch_cuda.tuning import PROJECTIONS
from tritonllm.text import TokenizerFiles


def paged(static: torch.Tensor, page: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot-laid cache [slots, Hkv, C, D] as a paged one: (pool [blocks, Hkv, page, D] holding its
    blocks in shuffled order, table [slots, C / page] (int32) of where each went)."""
    slots, h, c, d = static.shape
    n = -(-c // page)
    padded = torch.zeros(slots, h, n * page, d)
    padded[:, :, :c] = static
    blocks = padded.view(slots, h, n, page, d).permute(0, 2, 1, 3, 4).reshape(slots * n, h, page, d)
    where = torch.randperm(slots * n, generator=torch.Generator().manual_seed(seed))
    pool = torch.empty_like(blocks)
    pool[where] = blocks
    return pool, where.view(slots, n).to(torch.int32)


def paged_values(static: torch.Tensor, page: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`paged`, the pool laid out as the runtime's cache keeps values (`as_values`: [D, page] a block)."""
    pool, table = paged(static, page, seed)
    return as_values(pool), table


def test_rope_kv_write_matches_rotate_half_and_writes_the_cache():
    torch.manual_seed(0)
    b, h, hkv, d, slots, ctx = 3, 4, 2, 8, 4, 16
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d)
    ang = torch.randn(b, 1, d // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    (kp, table), (vp, _) = paged(torch.zeros(slots, hkv, ctx, d), 4), paged_values(torch.zeros(slots, hkv, ctx, d), 4)
    pos = torch.tensor([5, 0, 11])
    q = fk.rope_kv_write(qkv, cos, sin, kp, vp, table, pos, h, hkv)
    kc, vc = read_pages(kp, table), read_pages(vp, table)  # back in slot order
    heads = qkv.view(b, 1, h + 2 * hkv, d)
    ref = heads[:, :, : h + hkv] * cos[:, :, None] + rotate_half(heads[:, :, : h + hkv]) * sin[:, :, None]
    torch.testing.assert_close(q, ref[:, 0, :h])
    for i in range(b):
        torch.testing.assert_close(kc[i, :, pos[i]], ref[i, 0, h:])
        torch.testing.assert_close(vc[i, :, pos[i]], heads[i, 0, h + hkv :])
    assert kc.abs().sum() == sum(kc[i, :, pos[i]].abs().sum() for i in range(b))  # nothing else written


def test_add_rms_norm_and_activate_mul_match_the_reference_ops():
    torch.manual_seed(1)
    x, res, w = torch.randn(3, 1, 40), torch.randn(3, 1, 40), torch.randn(40)
    expected_res = res + x
    out = fk.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(res, expected_res)
    torch.testing.assert_close(out, torch.nn.functional.rms_norm(expected_res, (40,), w, 1e-5))
    alone = fk.add_rms_norm(None, res, w, 1e-5)  # a step's first norm: no product to add
    torch.testing.assert_close(res, expected_res)
    torch.testing.assert_close(alone, out)
    gu = torch.randn(2, 1, 2 * 1500)
    torch.testing.assert_close(fk.activate_mul(gu), torch.nn.functional.silu(gu[..., :1500]) * gu[..., 1500:])
    geglu = torch.nn.functional.gelu(gu[..., :1500], approximate="tanh") * gu[..., 1500:]
    torch.testing.assert_close(fk.activate_mul(gu, "gelu_tanh"), geglu)


@pytest.mark.parametrize(
    "width, rows, warps",
    [(40, 1, 4), (1024, 1, 4), (2048, 1, 8), (4096, 1, 16), (5000, 64, 16), (16384, 8, 16), (4096, 65, 4)],
)
def test_add_rms_norm_gives_a_thread_8_values_between_4_and_16_warps_at_a_few_rows(width, rows, warps):
    assert fk.norm_warps(width, rows) == warps


def test_add_rms_norm_norms_the_product_first_for_sandwich_norms():
    """Gemma 2/3: residual += RMSNorm(x) * (1 + w_post); out = RMSNorm(residual) * (1 + w_pre)."""
    from tritonllm.model.modeling import RMSNorm

    torch.manual_seed(6)
    x, res = torch.randn(3, 1, 40), torch.randn(3, 1, 40)
    post, pre = RMSNorm(torch.randn(40), 1e-6, offset=1.0), RMSNorm(torch.randn(40), 1e-6, offset=1.0)
    expected_res = res + post(x)
    out = fk.add_rms_norm(x, res, 1 + pre.weight, 1e-6, pre_weight=1 + post.weight)
    torch.testing.assert_close(res, expected_res)
    torch.testing.assert_close(out, pre(expected_res))


@pytest.mark.parametrize("config", ak.ATTENTION_CONFIGS[:2] + ak.ATTENTION_CONFIGS[3:])
@pytest.mark.parametrize(
    "heads,kv_heads,transposed,splits",
    [(9, 3, False, 1), (8, 2, False, 1), (8, 2, True, 1), (8, 2, False, 4), (9, 3, True, 8)],
)
def test_decode_attention_matches_sdpa_over_each_rows_valid_keys(heads, kv_heads, transposed, splits, config):
    """Every row over its own keys (row 0 has one: most splits of it see none), each config, the keys
    read transposed or not, split over programs whose sums are combined or not."""
    torch.manual_seed(2)
    b, d, ctx = 3, 16, 150
    q = torch.randn(b, heads, d)
    kc, vc = torch.randn(4, kv_heads, ctx, d), torch.randn(4, kv_heads, ctx, d)
    (kp, table), (vp, _) = paged(kc), paged_values(vc)
    pos = torch.tensor([0, 70, 149])
    got = ak.decode_attention(q, kp, vp, table, pos, limit=128, config=(*config, transposed, splits))
    # row 2 is cut at the graph's context
    g = heads // kv_heads
    for i in range(b):
        n = min(int(pos[i]) + 1, 128)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i].view(kv_heads, g, d), kc[i, :, :n], vc[i, :, :n]
        ).reshape(-1)
        torch.testing.assert_close(got[i, 0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_attention_reads_values_through_their_strides(fp8):
    """Values stored [page, D] a block (contiguous) or [D, page] (the runtime's `value_pool`) give
    the same output: the kernel reads them through their strides, a block at a time."""
    torch.manual_seed(5)
    q, kc, vc = torch.randn(3, 8, 16), torch.randn(4, 2, 100, 16), torch.randn(4, 2, 100, 16)
    (kp, table), (plain, _), (laid, _) = paged(kc), paged(vc), paged_values(vc)
    dtype, scales = (torch.float8_e4m3fn, torch.ones(2, 2)) if fp8 else (kp.dtype, None)
    kp, plain, laid = kp.to(dtype), plain.to(dtype), laid.to(dtype)
    assert plain.is_contiguous() and laid.stride(-2) == 1
    pos = torch.tensor([0, 40, 99])
    got = [ak.decode_attention(q, kp, v, table, pos, 128, (32, 1, 2), kv_scale=scales) for v in (plain, laid)]
    torch.testing.assert_close(got[0], got[1], atol=0, rtol=0)
    with pytest.raises(ValueError, match="strides"):
        ak.decode_attention(q, kp, laid[:, :1], table, pos, 128)


@pytest.mark.parametrize("config", [ak.ATTENTION_CONFIGS[0], ak.ATTENTION_CONFIGS[5], (32, 1, 2, False, 4)])
def test_decode_attention_keeps_to_a_sliding_window_with_a_query_scale(config):
    torch.manual_seed(4)
    b, heads, kv_heads, d, ctx, window, scale = 3, 4, 2, 16, 150, 40, 0.3
    q = torch.randn(b, heads, d)
    kc, vc = torch.randn(4, kv_heads, ctx, d), torch.randn(4, kv_heads, ctx, d)
    (kp, table), (vp, _) = paged(kc, 32, seed=1), paged_values(vc, 32, seed=1)
    pos = torch.tensor([10, 70, 149])  # inside the window, past it, and cut at the graph's context
    got = ak.decode_attention(q, kp, vp, table, pos, 128, config, window=window, scale=scale)
    for i in range(b):
        n = min(int(pos[i]) + 1, 128)
        lo = max(0, n - window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i].view(kv_heads, 2, d), kc[i, :, lo:n], vc[i, :, lo:n], scale=scale
        ).reshape(-1)
        torch.testing.assert_close(got[i, 0], ref, atol=1e-4, rtol=1e-4)


def test_decode_attention_soft_caps_the_scores():
    torch.manual_seed(7)
    b, heads, kv_heads, d, ctx, cap = 2, 4, 2, 16, 40, 0.5
    q, kc, vc = torch.randn(b, heads, d), torch.randn(3, kv_heads, ctx, d), torch.randn(3, kv_heads, ctx, d)
    pos = torch.tensor([9, 33])
    (kp, table), (vp, _) = paged(kc, 8, seed=2), paged_values(vc, 8, seed=2)
    got = ak.decode_attention(q, kp, vp, table, pos, 64, window=16, scale=1.0, softcap=cap)
    for i in range(b):
        n = int(pos[i]) + 1
        lo = max(0, n - 16)
        scores = torch.matmul(q[i].view(kv_heads, 2, d), kc[i, :, lo:n].transpose(-1, -2))
        probs = torch.softmax(torch.tanh(scores / cap) * cap, -1)
        torch.testing.assert_close(got[i, 0], torch.matmul(probs, vc[i, :, lo:n]).reshape(-1), atol=1e-4, rtol=1e-4)


def test_fused_prefill_gives_the_torch_ops_logits_and_cache(tiny_dir):
    from tritonllm.runtimes.base import StepInput

    hf = load_hf(tiny_dir)
    cfg = EngineConfig(max_slots=3, max_context=128, max_tokens_limit=64)
    rows = [StepInput(2, [5, 6, 7, 8, 9, 10, 11], 0), StepInput(0, [12, 13, 14], 0)]  # ragged, slots out of order
    runs = []
    for triton_kernels in (False, True):
        rt = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", triton_kernels=triton_kernels, gemv_table={})
        runs.append((rt.step(rows), rt.cache.keys, rt.cache.values))
    for ref, got in zip(*runs):  # the same blocks taken in the same order: the pools compare as they are
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    held = rt.blocks.tables
    assert len(held[2]) == 1 and len(held[0]) == 1 and held[1] == []  # slot 1 holds nothing
    keys, _ = rt.cache.gather(0, torch.tensor([2]), 7)
    assert keys.abs().sum() > 0


@pytest.mark.parametrize(
    "use_gemv",
    [False, True, "split", "keys split", "rope in attention", "rope in attention, keys split", "glu", "mlp"]
    + ["rope in attention, o and mlp", "norm in products", "glu, norm in products", "rope in attention, o, norm in"]
    + ["split, norm in products"],
)
def test_fused_decode_step_gives_hf_greedy_ids(tiny_dir, use_gemv, monkeypatch):
    from .test_engine_parity import PROMPTS, hf_greedy

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    prompts, lengths = [tok.encode(p) for p in PROMPTS[:3]], [10, 4, 7]
    cfg = EngineConfig(max_slots=2, max_context=160, max_tokens_limit=64)
    # wide tiles for the LM head: the interpreter runs programs one by one
    table = (
        {
            (kind, rows): (1024, 64, 4) if kind == "lm_head" else gemv.CONFIGS[1]
            for kind in PROJECTIONS + ("lm_head",)
            for rows in (1, 2)
        }
        if use_gemv in (True, "split", "glu", "mlp", "rope in attention, o and mlp") or "norm in" in str(use_gemv)
        else {}
    )
    if str(use_gemv).startswith("glu"):  # gate_up's tile makes the activation, the down tile takes it as it is
        table.update({(key, rows): (16, 64, 4, 2) for key in gemv.GLU_KEYS for rows in (1, 2)})
    fuse_o = str(use_gemv).startswith("rope in attention, o")  # attention + o (and the MLP) add into sums
    if use_gemv in (
        "mlp",
        "rope in attention, o and mlp",
    ):  # the MLP in one kernel (plain at 1 row, swapped at 2); add + norm zeroes sums
        table.update({(mlp.KEY, 1): (32, 64, 64, 4, 1, 0, 0), (mlp.KEY, 2): (16, 64, 32, 4, 2, 0, 1)})
    if fuse_o:
        table.update({(ao.KEY, 1): (32, 4, 2), (ao.KEY, 2): (64, 4, 2)})
    if str(use_gemv).startswith("split"):  # every product split along K, the LM head's summed before the logits
        table = {key: (1024, 64, 4, 2, 2) if key[0] == "lm_head" else (32, 64, 4, 2, 2) for key in table}
    readers = ("qkv_proj", "lm_head", gemv.GLU_KEYS[0] if str(use_gemv).startswith("glu") else "gate_up")
    if "norm in" in str(use_gemv):  # the products after each add + norm make their input themselves
        table.update({(normed.key(kind), rows): table[(kind, rows)] for kind in readers for rows in (1, 2)})
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", triton_kernels=True, gemv_table=table)
    assert runtime.describe()["triton_kernels"] and len(runtime.describe()["gemv"]) == len(table)
    fuse_rope = str(use_gemv).startswith("rope in attention")
    runtime.kernels.rope_batches = {1, 2} if fuse_rope else set()
    calls, glus, made = [], [], []
    monkeypatch.setattr(ra, "rope_attention", lambda *a, **k: calls.append(1) or fused_rope_attention(*a, **k))
    real_matmul = gemv.small_matmul

    def small_matmul(*a, **k):  # counts the tiles asked to make the activation (small_matmul's 7th argument)
        glus.extend(a[6:7] if len(a) > 6 and a[6] else [])
        made.append(isinstance(a[0], Normed))
        return real_matmul(*a, **k)

    monkeypatch.setattr(gemv, "small_matmul", small_matmul)
    mlps, real_mlp = [], mlp.fused_mlp
    monkeypatch.setattr(mlp, "fused_mlp", lambda *a, **k: mlps.append(a[4]) or real_mlp(*a, **k))
    os_, real_o = [], ao.attention_o
    monkeypatch.setattr(ao, "attention_o", lambda *a, **k: os_.append(a[3]) or real_o(*a, **k))
    if str(use_gemv).endswith(
        "keys split"
    ):  # every decode graph long enough for the split table, which splits 4 / 2 ways
        monkeypatch.setattr(ak, "LONG_CONTEXT", 1)
        runtime.kernels.split_table = {1: ak.Tile(32, 1, 2, False, 4), 2: ak.Tile(16, 4, 3, True, 2)}
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        got = [
            s.wait(300).ids
            for s in [
                eng.submit(ids, max_tokens=n, temperature=0.0, ignore_eos=True) for ids, n in zip(prompts, lengths)
            ]
        ]
    assert got == [hf_greedy(hf, ids, n) for ids, n in zip(prompts, lengths)]
    assert bool(calls) == (fuse_rope and not fuse_o)  # attention + o calls attend_new_row, not rope_attention
    assert set(os_) == ({table[(ao.KEY, 1)], table[(ao.KEY, 2)]} if fuse_o else set())
    assert bool(glus) == str(use_gemv).startswith("glu")
    # a decode step's tiles: 4 a layer (3 with o fused) and the LM head; qkv, gate_up and the head make their input
    layers = len(hf.model.layers)
    steps = len(made) / ((3 if fuse_o else 4) * layers + 1)
    assert sum(made) == (steps * (2 * layers + 1) if "norm in" in str(use_gemv) else 0)
    assert set(mlps) == ({table[(mlp.KEY, 1)], table[(mlp.KEY, 2)]} if (mlp.KEY, 1) in table else set())


def test_rotary_table_rows_are_the_models_own_rotary_at_those_positions(tiny_dir):
    from tritonllm.runtimes.torch_cuda.ops import RotaryTable

    model = CausalLM(load_hf(tiny_dir))
    positions = torch.tensor([0, 5, 159, 17])
    table = RotaryTable(model, 160, torch.float32, "cpu")
    for (cos, sin), (ref_cos, ref_sin) in zip(table(positions), model.rotaries(positions[:, None], torch.float32)):
        assert cos.shape == ref_cos.shape and cos.stride(0) == sin.stride(0)  # the kernels' one row stride
        torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-6)


def test_split_candidates_only_where_rows_leave_programs_free():
    many = attention_tuning.split_candidates([1, 16, 64, 128, 256], kv_heads=8, programs=132, fp8=True)
    assert sorted(many) == [1, 16, 64]  # 64 x 8 = 512 <= 4 x 132 < 128 x 8
    assert len(many[1]) == len(ak.SPLIT_TILES) * 2 * len(ak.SPLITS) and all(t.splits > 1 for t in many[1])
    assert not any(t.transposed for t in attention_tuning.split_candidates([1], 8, 132, fp8=False)[1])


def test_start_up_self_check_passes_for_every_kernel_form():
    """What the GPU runtime runs before enabling the kernels (decode and prefill rotary forms, and
    the q/k-norm, fp8-cache and fp8-rows forms, included: a form that fails to compile there turns the fused
    kernels off, not the engine)."""
    fused_check.self_check(torch.device("cpu"), torch.float32, 64, qk_norm=True, fp8_kv=True, fp8_rows=True)


def test_rope_kv_write_norms_each_q_and_k_head_first():
    from tritonllm.model.modeling import RMSNorm, apply_rotary

    torch.manual_seed(5)
    b, h, hkv, d = 2, 4, 2, 16
    qkv, ang = torch.randn(b, 1, (h + 2 * hkv) * d), torch.randn(b, 1, d // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    qn, kn = RMSNorm(torch.randn(d), 1e-6), RMSNorm(torch.randn(d), 1e-6)
    kc, vc = torch.zeros(3, hkv, 8, d), torch.zeros(3, hkv, 8, d)
    own = torch.arange(3, dtype=torch.int32).view(3, 1)  # slot s: block s of 8 positions
    heads = qkv.view(b, 1, h + 2 * hkv, d)
    for offset in (0.0, 1.0):  # Qwen3's norm, Gemma 3's (1 + w)
        qn.offset = kn.offset = offset
        scales = (offset + qn.weight, offset + kn.weight, 1e-6, bool(offset))
        q = fk.rope_kv_write(qkv, cos, sin, kc, vc, own, torch.tensor([3, 6]), h, hkv, qk_norm=scales)
        normed = torch.cat([qn(heads[:, :, :h]), kn(heads[:, :, h : h + hkv])], dim=2)
        ref = apply_rotary(normed, cos[:, :, None], sin[:, :, None])
        torch.testing.assert_close(q, ref[:, 0, :h])
        torch.testing.assert_close(kc[0, :, 3], ref[0, 0, h:])


@pytest.mark.parametrize("k", [0, 5, 20])
def test_logprob_kernels_match_log_softmax_and_topk(k):
    """Chunked log-sum-exp and top k over a vocabulary of several chunks (one not full), rows taken
    by index, temperatures, masked (-inf) entries: against torch's log_softmax and topk."""
    from tritonllm.runtimes.kernels import logprobs as lk

    torch.manual_seed(4)
    v = 2 * lk.CHUNK + 123
    logits = torch.randn(5, v) * 3
    logits[:, 7] = float("-inf")  # a masked EOS
    logits[3, : lk.CHUNK] = float("-inf")  # a whole chunk masked
    rows, temps = torch.tensor([4, 1, 3]), torch.tensor([1.0, 0.5, 2.0])
    x = logits[rows] / temps[:, None]
    chosen = torch.tensor([int(x[0].argmax()), 9, v - 1])
    vals, ids = lk.logprob_stats(logits, rows, temps, chosen, k)
    ref = torch.log_softmax(x.double(), -1)
    torch.testing.assert_close(vals[:, 0].double(), ref.gather(1, chosen[:, None])[:, 0], atol=1e-4, rtol=0)
    if k:
        top = torch.topk(ref, k)
        torch.testing.assert_close(vals[:, 1:].double(), top.values, atol=1e-4, rtol=0)
        assert ids.tolist() == top.indices.tolist()


def test_paged_cache_through_the_kernels_admits_by_blocks_and_reuses_prefixes_with_hf_ids(tiny_dir):
    """The rotary write and decode attention kernels (interpreted) find positions through the block
    tables of a pool small enough that requests wait for blocks and cached prefixes are evicted."""
    from .test_torch_runtime import check_paged_cache

    check_paged_cache(tiny_dir, triton_kernels=True)


def test_decode_attention_rows_of_one_slot_attend_up_to_their_own_positions():
    """A prompt piece's tokens as rows of one slot (`row_slots`): each attends to the keys up to its
    own position, which is causal attention over the piece and its cached past."""
    torch.manual_seed(8)
    heads, kv_heads, d, ctx = 4, 2, 16, 48
    kc, vc = torch.randn(2, kv_heads, ctx, d), torch.randn(2, kv_heads, ctx, d)
    (kp, table), (vp, _) = paged(kc, seed=3), paged_values(vc, seed=3)
    row_slots, pos = torch.tensor([1, 1, 1, 0, 0]), torch.tensor([30, 31, 32, 0, 1])
    q = torch.randn(5, heads, d)
    got = ak.decode_attention(q, kp, vp, table, pos, 64, row_slots=row_slots)
    for i in range(5):
        s, n = int(row_slots[i]), int(pos[i]) + 1
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[i].view(kv_heads, 2, d), kc[s, :, :n], vc[s, :, :n]
        ).reshape(-1)
        torch.testing.assert_close(got[i, 0], ref, atol=1e-4, rtol=1e-4)


@triton.jit
def _to_e4m3(x, y, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y + i, tl.load(x + i, mask=i < n).to(y.dtype.element_ty), mask=i < n)


def triton_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x as e4m3 by Triton's own conversion. On the GPU it is the hardware's (round to nearest,
    saturating); the interpreter's emulation drops some carries into the exponent (124.3 -> 64), so
    the kernels' stores are compared with the same conversion, not torch's."""
    flat = x.contiguous().view(-1)
    out = torch.empty_like(flat, dtype=torch.float8_e4m3fn)
    _to_e4m3[(1,)](flat, out, flat.numel(), BLOCK=triton.next_power_of_2(flat.numel()))
    return out.view(x.shape)


@pytest.mark.parametrize("transposed,splits", [(False, 1), (True, 1), (True, 2)])
def test_fp8_cache_kernels_store_scaled_e4m3_and_attend_to_the_dequantized_values(transposed, splits):
    """kv_cache_dtype fp8: the rotary kernel stores k / scale and v / scale (per KV head) as e4m3,
    saturated at 448; decode attention multiplies them back: it equals SDPA over the dequantized cache."""
    torch.manual_seed(8)
    b, h, hkv, d, slots, ctx = 3, 4, 2, 8, 4, 16
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d) * 4
    ang = torch.randn(b, 1, d // 2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    (kp, table), (vp, _) = paged(torch.zeros(slots, hkv, ctx, d), 4), paged_values(torch.zeros(slots, hkv, ctx, d), 4)
    kp8, vp8 = kp.to(torch.float8_e4m3fn), vp.to(torch.float8_e4m3fn)
    scale = torch.tensor([[0.05, 0.002], [0.02, 0.5]])  # [k, v] x KV head; 0.002: k of head 1 saturates
    pos = torch.tensor([5, 0, 11])
    q = fk.rope_kv_write(qkv, cos, sin, kp8, vp8, table, pos, h, hkv, kv_scale=scale)
    heads = qkv.view(b, 1, h + 2 * hkv, d)
    ref = heads[:, :, : h + hkv] * cos[:, :, None] + rotate_half(heads[:, :, : h + hkv]) * sin[:, :, None]
    torch.testing.assert_close(q, ref[:, 0, :h])
    kc, vc = read_pages(kp8, table), read_pages(vp8, table)
    for i in range(b):
        want_k = triton_e4m3((ref[i, 0, h:] / scale[0][:, None]).clamp(-448, 448))
        want_v = triton_e4m3((heads[i, 0, h + hkv :] / scale[1][:, None]).clamp(-448, 448))
        torch.testing.assert_close(kc[i, :, pos[i]].float(), want_k.float(), atol=0, rtol=0)
        torch.testing.assert_close(vc[i, :, pos[i]].float(), want_v.float(), atol=0, rtol=0)
    assert (kc[:, 1].float().abs() == 448).any()  # saturated, not inf/nan
    q1 = torch.randn(b, h, d)
    keys, values = torch.randn(slots, hkv, ctx, d), torch.randn(slots, hkv, ctx, d)
    (k8, tab8), (v8, _) = paged((keys / scale[0][None, :, None, None]).clamp(-448, 448)), paged_values(values / 0.5)
    k8, v8 = k8.to(torch.float8_e4m3fn), v8.to(torch.float8_e4m3fn)
    scales = torch.stack([scale[0], torch.full((hkv,), 0.5)])
    got = ak.decode_attention(q1, k8, v8, tab8, pos, 16, (16, 4, 3, transposed, splits), kv_scale=scales)
    kd = read_pages(k8, tab8).float() * scales[0][None, :, None, None]
    vd = read_pages(v8, tab8).float() * 0.5
    for i in range(b):
        n = int(pos[i]) + 1
        ref_i = torch.nn.functional.scaled_dot_product_attention(
            q1[i].view(hkv, h // hkv, d), kd[i, :, :n], vd[i, :, :n]
        )
        # the products run in fp16: the query and the probabilities rounded to it
        torch.testing.assert_close(got[i, 0], ref_i.reshape(-1), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "rows, config",
    [(1, ak.PIECE_CONFIGS[0]), (4, ak.PIECE_CONFIGS[0]), (16, ak.PIECE_CONFIGS[0])]
    + [(c[0] // 4, c) for c in ak.PIECE_CONFIGS[1:4:2] + ak.PIECE_CONFIGS[4:6] + ak.PIECE_CONFIGS[7:]],
)
def test_piece_tiles_attend_as_one_row_per_program(rows, config):
    """Prompt pieces' tokens taken `rows` to a program (`PieceTiles`: one tile of keys read for all
    of them) give each token the attention of its own row: causal over its piece and the slot's
    cached past, pieces of lengths that do and do not fill tiles, a sliding window too; under each
    tile configuration `tune_pieces` may choose (rows from its query rows, 4 query heads a KV head)."""
    torch.manual_seed(9)
    heads, kv_heads, d, ctx = 8, 2, 16, 96
    kc, vc = torch.randn(3, kv_heads, ctx, d), torch.randn(3, kv_heads, ctx, d)
    (kp, table), (vp, _) = paged(kc, seed=4), paged_values(vc, seed=4)
    pieces = [(2, 40, 23), (0, 0, 5), (1, 70, 16)]  # (slot, first position, tokens)
    row_slots = torch.tensor([s for s, _, n in pieces for _ in range(n)])
    pos = torch.tensor([p + j for _, p, n in pieces for j in range(n)])
    q = torch.randn(len(pos), heads, d)
    tiles = ak.PieceTiles.of([n for *_, n in pieces], rows, lambda v: torch.tensor(v, dtype=torch.int32))
    assert len(tiles) == sum(-(-n // rows) for *_, n in pieces)
    assert ak.PieceTiles.rows_for(4, 4096, 8) == 16 and ak.PieceTiles.rows_for(4, 512, 8) == 4  # programs kept
    assert ak.PieceTiles.rows_for(4, 8192, 8, 128) == 32 and ak.PieceTiles.rows_for(4, 8192, 8, 32) == 8
    for window in (None, 24):
        got = ak.decode_attention(
            q, kp, vp, table, pos, 128, config[1:], window=window, row_slots=row_slots, tiles=tiles
        )
        for i in range(len(pos)):
            s, n = int(row_slots[i]), int(pos[i]) + 1
            lo = max(0, n - window) if window else 0
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[i].view(kv_heads, heads // kv_heads, d), kc[s, :, lo:n], vc[s, :, lo:n]
            ).reshape(-1)
            torch.testing.assert_close(got[i, 0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("budget", [8192, 40])
def test_pieces_padded_to_their_graph_bucket_give_hf_ids(tiny_dir, budget, monkeypatch):
    """Steps of prompt pieces (prefix-cache hits; with a 40-token budget, chunks) run as their CUDA
    graph would, padded to its bucket (`PieceGraphs.eager`: the captured body, launched eagerly on
    the CPU): greedy ids equal HF's and the padding computed is counted."""
    from .test_engine_parity import hf_greedy

    hf, tok = load_hf(tiny_dir), TokenizerFiles(tiny_dir)
    shared = tok.encode("Paged attention keeps each sequence's keys in blocks of sixteen. " * 3)
    prompts = [shared + tok.encode(" and then" * (i + 1)) for i in range(4)]
    cfg = EngineConfig(
        max_slots=4, max_context=128, max_tokens_limit=32, default_max_tokens=5, max_prefill_tokens=budget
    )
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(hf), device="cpu", triton_kernels=True, gemv_table={})
    buckets, pieces = [], runtime.pieces
    runtime.graph_pieces = True
    monkeypatch.setattr(
        pieces, "replay", lambda rows, bucket, ring: buckets.append(bucket) or pieces.eager(rows, bucket)
    )
    with InProcessEngine(None, cfg, runtime=runtime) as eng:
        kw = dict(max_tokens=5, temperature=0.0, ignore_eos=True)
        first = eng.generate(prompts[0], **kw)
        rest = [s.wait(300) for s in [eng.submit(p, **kw) for p in prompts[1:]]]
    assert [first.ids] + [r.ids for r in rest] == [hf_greedy(hf, p, 5) for p in prompts]
    assert buckets and all(b in runtime.pieces.buckets.all() for b in buckets)
    stats = runtime.stats()
    assert stats.prefill_computed_tokens > stats.prefill_tokens  # padded to the buckets
