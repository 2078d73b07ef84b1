"""Quantized engine folders made by the build pipeline, on the CPU: ONNX Runtime's int8 / int4
graphs (served by the engine, refused under a config of another scheme, rebuilt when their format
or calibration changes), the TensorRT Q/DQ graph, GPTQ rounding and the 8-bit LM head."""

import os
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tritonllm.config import EngineConfig
from tritonllm.engine.inprocess import InProcessEngine
from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.torch_cuda import TorchCudaRuntime
from tritonllm.text import TokenizerFiles


@pytest.fixture(scope="module")
def onnx_quantized(tiny_dir, tmp_path_factory):
    """The tiny model's fp32, int8 and int4 engine folders, made by the build pipeline."""
    from tritonllm.build.pipeline import engine_files

    onnx_dir = tmp_path_factory.mktemp("onnx")
    return {
        scheme: engine_files(tiny_dir, "tiny", EngineConfig(quantization=scheme), onnx_dir)
        for scheme in ("none", "int8", "int4")
    }


def test_onnx_quantized_graphs_are_smaller_and_close_to_fp32(onnx_quantized, tiny_dir):
    """The engine's next-token distributions from each graph (one prefill of 3 prompts): int8 close
    to fp32 (KL < 1e-3), int4 within KL 0.05 on this random model; the weights shrink."""
    from tritonllm.build.quantize_onnx import read_scheme
    from tritonllm.runtimes.base import StepInput
    from tritonllm.runtimes.onnx_runtime import OnnxRuntime

    from .test_engine_parity import PROMPTS

    tok = TokenizerFiles(tiny_dir)
    rows = [StepInput(i, tok.encode(p), 0) for i, p in enumerate(PROMPTS[:3])]
    logp = {}
    for scheme, folder in onnx_quantized.items():
        assert read_scheme(folder) == scheme
        cfg = EngineConfig(max_slots=3, max_context=64, max_tokens_limit=32, default_max_tokens=8, quantization=scheme)
        rt = OnnxRuntime(folder, cfg)
        logp[scheme] = torch.log_softmax(torch.as_tensor(rt.step(rows)).double(), -1)
    kl = {s: float((logp["none"].exp() * (logp["none"] - logp[s])).sum(-1).max()) for s in ("int8", "int4")}
    assert kl["int8"] < 1e-3 and kl["int4"] < 0.05, kl
    size = {s: (f / "model.onnx").stat().st_size for s, f in onnx_quantized.items()}
    assert size["int4"] < size["int8"] < size["none"]


def test_an_onnx_engine_refuses_a_config_of_another_scheme(onnx_quantized):
    from tritonllm.runtimes.onnx_runtime import OnnxRuntime

    with pytest.raises(ValueError, match="quantized 'int8'.*--quantization int8"):
        OnnxRuntime(
            onnx_quantized["int8"], EngineConfig(max_slots=1, max_context=64, max_tokens_limit=32, default_max_tokens=8)
        )


def test_a_cached_graph_of_another_format_or_calibration_is_quantized_again(onnx_quantized, tiny_dir):
    """A graph an earlier build made in another format (say quantize_dynamic's), or calibrated on
    other text, is not reused."""
    import json

    from tritonllm.build.pipeline import quantized_graph
    from tritonllm.build.quantize_onnx import FORMAT, QUANT_FILE, write_scheme

    folder, cfg = onnx_quantized["int8"], EngineConfig(quantization="int8")
    calibrated = json.loads((folder / QUANT_FILE).read_text())["calibration"]
    write_scheme(folder, {"scheme": "int8", "format": "QOperator DynamicQuantizeMatMul", "calibration": calibrated})
    assert quantized_graph(folder.parent, cfg, tiny_dir) == folder
    assert json.loads((folder / QUANT_FILE).read_text())["format"] == FORMAT["int8"]
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    assert quantized_graph(folder.parent, cfg, tiny_dir) == folder  # up to date: kept
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp
    assert quantized_graph(folder.parent, cfg, tiny_dir, "One other paragraph of text.") == folder
    report = json.loads((folder / QUANT_FILE).read_text())
    assert report["calibration"] != calibrated and (folder / "model.onnx").stat().st_mtime_ns != stamp


def test_the_tensorrt_qdq_graph_holds_the_torch_engines_int8_weights(tiny_dir, tmp_path):
    """The weight-only Q/DQ graph for TensorRT (a DequantizeLinear per projection, the LM head left
    alone), run through TensorRTRuntime with the ONNX Runtime stand-in for TensorRT (its wiring, not
    TensorRT), gives the greedy ids of the torch engine's int8-wo weights on the reference ops."""
    import onnx

    from tritonllm.build.pipeline import engine_files
    from tritonllm.runtimes.tensorrt import plan as trt_plan
    from tritonllm.runtimes.tensorrt.runtime import TensorRTRuntime

    from . import trt_standin
    from .test_engine_parity import PROMPTS

    cfg = EngineConfig(
        runtime="tensorrt", dtype="float32", max_slots=2, max_context=128, max_tokens_limit=64, quantization="int8-wo"
    )
    engine_dir = engine_files(tiny_dir, "tiny", cfg, tmp_path / "onnx")
    graph = onnx.load(str(engine_dir / "model.onnx"))
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    hf = load_hf(tiny_dir)
    assert len(dq) == 4 * hf.config.num_hidden_layers
    spec = trt_plan.PlanSpec(cfg.max_slots, cfg.max_context, dtype=cfg.dtype)
    key = trt_plan.plan_key(engine_dir / "model.onnx", spec, trt_standin)
    trt_standin.write_plan(engine_dir / "trt" / f"model-{key}.plan", engine_dir / "model.onnx")
    prompts = [TokenizerFiles(tiny_dir).encode(p) for p in PROMPTS[:2]]
    model = CausalLM(hf)
    quant.quantize_model(model, "int8-wo")
    torch_cfg = replace(cfg, runtime="torch-cuda")
    runtimes = [
        (cfg, TensorRTRuntime(engine_dir, cfg, device="cpu", trt=trt_standin)),
        (torch_cfg, TorchCudaRuntime(None, torch_cfg, model=model, device="cpu", fused_kernels=False)),
    ]
    from tritonllm.runtimes.base import StepInput

    rows = [StepInput(0, prompts[0], 0)]
    logits = [torch.as_tensor(rt.step(rows)).float() for _, rt in runtimes]
    plain = TorchCudaRuntime(None, replace(torch_cfg, quantization="none"), model=CausalLM(hf), device="cpu")
    unquantized = plain.step(rows).float()
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)  # the same int8 numbers
    assert (logits[0] - unquantized).abs().max() > 1e-3  # ... which are not the fp32 weights
    ids = []
    for c, runtime in runtimes:
        assert runtime.quantization == "int8-wo"
        with InProcessEngine(None, c, runtime=runtime) as eng:
            ids.append([eng.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True).ids for p in prompts])
    assert ids[0] == ids[1]


def test_a_gptq_build_records_its_rounding_and_serves(tiny_dir, tmp_path, monkeypatch):
    """--gptq: the engine folder holds GPTQ-rounded weights in the scheme's format (other roundings
    than the nearest, the same scales), says so in quantization.json, and the engine serves them."""
    import json

    from tritonllm.build.calibrate import Calibration
    from tritonllm.build.pipeline import engine_files
    from tritonllm.model.modeling import load_engine_model

    monkeypatch.chdir(tmp_path)  # the build writes build/engines/<name> under the working directory
    cfg = EngineConfig(
        runtime="torch-cuda", dtype="float32", max_slots=2, max_context=128, max_tokens_limit=64, quantization="int8-wo"
    )
    out = engine_files(tiny_dir, "tiny-gptq", cfg, calibration=Calibration(gptq=True))
    report = json.loads((out / "quantization.json").read_text())
    assert report["calibration"].startswith("GPTQ") and "sampled from the model" in report["calibration_data"]
    assert report["calibration_tokens"] > 32 * 256  # the built-in text and the model's own samples
    built, nearest = load_engine_model(out, torch.float32), CausalLM(load_hf(tiny_dir))
    quant.quantize_model(nearest, "int8-wo")
    pairs = [(getattr(a, k), getattr(b, k)) for a, b in zip(built.layers, nearest.layers) for k in quant.PROJECTIONS]
    assert all(a.qweight.dtype == torch.int8 and torch.equal(a.scale, b.scale) for a, b in pairs)
    assert any(not torch.equal(a.qweight, b.qweight) for a, b in pairs)
    with InProcessEngine(None, cfg, runtime=TorchCudaRuntime(out, cfg, device="cpu", fused_kernels=False)) as eng:
        assert len(eng.generate([1, 2, 3, 4], max_tokens=6, temperature=0.0, ignore_eos=True).ids) == 6


def test_the_build_quantizes_the_lm_head_once_where_asked(tiny_dir, tmp_path, monkeypatch):
    """--quantize-lm-head: the engine folder holds the 8-bit head (recorded in quantization.json)
    and no unquantized one, and the engine serves it."""
    import json

    from tritonllm.build.pipeline import engine_files
    from tritonllm.model.modeling import load_engine_model

    monkeypatch.chdir(tmp_path)
    cfg = EngineConfig(
        runtime="torch-cuda", dtype="float32", max_slots=2, max_context=128, max_tokens_limit=64, default_max_tokens=8
    )
    cfg = replace(cfg, quantization="int8-wo", quantize_lm_head=True)
    out = engine_files(tiny_dir, "tiny-head", cfg)
    report = json.loads((out / "quantization.json").read_text())
    assert report["lm_head"] == "int8-wo" and report["quantized_lm_head_bytes"] * 4 == report["lm_head_bytes"]
    built = load_engine_model(out, torch.float32)
    assert built.lm_head is None and built.head()[0].dtype == torch.int8
    with InProcessEngine(None, cfg, runtime=TorchCudaRuntime(out, cfg, device="cpu", fused_kernels=False)) as eng:
        assert len(eng.generate([1, 2, 3, 4], max_tokens=6, temperature=0.0, ignore_eos=True).ids) == 6
