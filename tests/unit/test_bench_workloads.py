"""The batch-1 roofline's bytes: what a decode step of the engine's model reads per token; the
GPU bench's engine folders for Triton variants of other weights."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.workloads import engine_dir_for, save_scheme_engines, scheme_dir, weight_bytes
from tritonllm.config import EngineConfig
from tritonllm.model import quant
from tritonllm.model.modeling import ENGINE_FILE, CausalLM

H, F, V, LAYERS = 64, 128, 300, 2
PROJ = LAYERS * (H * (H + 2 * 32) + H * H + H * 2 * F + F * H)  # qkv (2 KV heads of 16), o, gate_up, down
NORMS = (2 * LAYERS + 1) * H


def model(tied: bool) -> CausalLM:
    cfg = LlamaConfig(
        hidden_size=H,
        intermediate_size=F,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        tie_word_embeddings=tied,
    )
    return CausalLM(LlamaForCausalLM(cfg).to(torch.bfloat16))


def test_a_step_reads_projections_norms_and_the_head_not_the_embedding_table():
    for tied in (True, False):
        assert weight_bytes(model(tied)) == 2 * (PROJ + NORMS + V * H)


def test_8bit_weights_count_a_byte_each_with_their_scales():
    m = model(True)
    quant.quantize_model(m, "fp8")
    scales = LAYERS * ((H + 2 * 32) + H + 2 * F + H)  # one float32 per output channel
    assert weight_bytes(m) == PROJ + 4 * scales + 2 * (NORMS + V * H)


def test_an_8bit_head_counts_as_stored():
    m = model(False)
    quant.quantize_head(m)
    assert weight_bytes(m) == 2 * (PROJ + NORMS) + V * H + 4 * V


def test_triton_variants_of_other_weights_get_their_own_folders_from_the_bf16_model(tmp_path):
    engine_dir = tmp_path / "llama8b-engine"
    (tmp_path / "llama8b-engine-int8-wo").mkdir(parents=True)  # an earlier run's folder
    base = EngineConfig(runtime="torch-cuda", dtype="bfloat16")
    fp8 = EngineConfig(runtime="torch-cuda", dtype="bfloat16", quantization="fp8", quantize_lm_head=True)
    m = model(tied=False)
    written = save_scheme_engines(m, engine_dir, base, [base, fp8, fp8])
    assert written == [tmp_path / "llama8b-engine-fp8-head"] == [scheme_dir(engine_dir, fp8)]
    assert not (tmp_path / "llama8b-engine-int8-wo").exists()
    saved = torch.load(written[0] / ENGINE_FILE, weights_only=False)
    assert quant.scheme_of(saved) == "fp8" and saved.quant_head is not None
    assert m.lm_head is not None and quant.scheme_of(m) == "none"  # the bench's own model untouched
    assert engine_dir_for(fp8, engine_dir) == written[0] and engine_dir_for(base, engine_dir) == engine_dir
