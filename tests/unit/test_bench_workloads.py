"""The batch-1 roofline's bytes: what a decode step of the engine's model reads per token."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.workloads import weight_bytes
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM

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
