from dataclasses import replace
from pathlib import Path

import pytest

from tritonllm.build.pbtxt import Enum, render
from tritonllm.build.repository import RepositoryConfig, model_configs
from tritonllm.config import EngineConfig, SamplingParams
from tritonllm.errors import RequestValidationError

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CFG = EngineConfig(max_slots=4, max_context=256, max_tokens_limit=200, default_max_tokens=16)


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_slots=0),
        dict(max_context=8),
        dict(runtime="vllm"),
        dict(max_tokens_limit=4096, max_context=2048),
        dict(kv_cache_memory_fraction=1.0),
        dict(kv_cache_tokens=1000, max_context=2048),
        dict(max_slots=4097),
        dict(engine_process="yes"),
        dict(kv_policy="lru"),
        dict(kv_cache_dtype="int8"),
        dict(io_processes=33),
        dict(tuning_cache=" "),
    ],
)
def test_engine_config_bounds(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        EngineConfig(**kw)


def test_engine_process_auto_is_on_for_gpu_runtimes_only():
    assert not EngineConfig(runtime="onnxruntime").separate_process
    assert EngineConfig(runtime="torch-cuda", dtype="bfloat16").separate_process
    assert EngineConfig(runtime="onnxruntime", engine_process="on").separate_process
    assert not EngineConfig(runtime="torch-cuda", dtype="bfloat16", engine_process="off").separate_process
    assert EngineConfig.from_parameters(EngineConfig(engine_process="on").to_parameters()).engine_process == "on"


def test_options_the_engine_cannot_honour_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*built for --runtime torch-cuda"):
        EngineConfig(runtime="onnxruntime", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="io_processes=2.*engine_process on"):
        EngineConfig(runtime="torch-cuda", dtype="bfloat16", engine_process="off", io_processes=2)
    shared = EngineConfig(runtime="torch-cuda", dtype="bfloat16", io_processes=3)
    with pytest.raises(ValueError, match="io_processes=3 with engine_instances=2"):
        RepositoryConfig(engine=shared, engine_instances=2)
    group = model_configs(RepositoryConfig(engine=shared, gpus=(0, 1)))["llm_engine"]["instance_group"]
    assert group[0]["count"] == 3 and group[0]["gpus"] == [0, 1]  # 3 I/O instances on each GPU's engine


def test_io_processes_auto_gives_an_engine_process_two_io_instances_and_records_the_number():
    def engine_instances(repo):
        config = model_configs(repo)["llm_engine"]
        params = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
        return config["instance_group"][0]["count"], params["io_processes"]

    gpu = EngineConfig(runtime="torch-cuda", dtype="bfloat16")
    assert gpu.io_processes == 0 and gpu.io_instances == 2
    assert engine_instances(RepositoryConfig(engine=gpu)) == (2, "2")
    assert engine_instances(RepositoryConfig(engine=replace(gpu, io_processes=3))) == (3, "3")
    assert engine_instances(RepositoryConfig(engine=replace(gpu, engine_process="off"))) == (1, "1")
    assert engine_instances(RepositoryConfig(engine=CFG)) == (1, "1")  # onnxruntime: the loop in the stub
    assert engine_instances(RepositoryConfig(engine=gpu, engine_instances=2)) == (2, "1")  # one each


def test_kv_cache_dtype_fp8_is_refused_on_a_gpu_without_fp8_conversions(monkeypatch):
    import torch

    from tritonllm.runtimes.torch_cuda.cache import kv_scales_for

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    cfg = EngineConfig(runtime="torch-cuda", dtype="bfloat16", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*A100.*--kv-cache-dtype auto"):
        kv_scales_for(cfg, None, torch.device("cuda"))


@pytest.mark.parametrize(
    "runtime,scheme,advice",
    [
        ("onnxruntime", "fp8", "torch-cuda"),
        ("onnxruntime", "int8-wo", "torch-cuda"),
        ("torch-cuda", "int4", "int8-wo or fp8"),
        ("torch-cuda", "int8", "int8-wo or fp8"),
        ("tensorrt", "int4", "onnxruntime"),
    ],
)
def test_a_quantization_the_runtime_cannot_run_is_refused_with_what_to_use(runtime, scheme, advice):
    with pytest.raises(ValueError, match=f"quantization='{scheme}' is not built for runtime '{runtime}'") as e:
        EngineConfig(runtime=runtime, quantization=scheme)
    assert advice in str(e.value)


def test_the_build_cli_refuses_a_quantization_before_building(tmp_path, capsys):
    from tritonllm.build.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--runtime", "onnxruntime", "--quantization", "fp8", "--out", str(tmp_path)])
    assert e.value.code == 2 and "FP8 Tensor Cores" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing built


def test_the_build_cli_sizes_the_kv_pool_and_refuses_one_too_small_for_max_context(tmp_path, capsys):
    from tritonllm.build.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--kv-cache-tokens", "1000", "--max-context", "2048", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "kv_cache_tokens=1000" in err and ">= max_context (2048)" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["--runtime", "onnxruntime", "--quantization", "int8", "--gptq"],
        ["--runtime", "torch-cuda", "--gptq"],
    ],
)
def test_the_build_cli_refuses_gptq_where_it_rounds_nothing(tmp_path, capsys, args):
    from tritonllm.build.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), *args, "--out", str(tmp_path)])
    assert e.value.code == 2 and "--gptq rounds torch-cuda's fp8 / int8-wo weights" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("runtime", ["torch-cuda", "tensorrt"])
def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch, runtime):
    """The capability check itself (these machines have no such GPU: torch's answers are set)."""
    import torch

    from tritonllm.model.quant import check_device_support

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match=rf"'fp8' on runtime {runtime} needs FP8 Tensor Cores.*has 8.0.*int8-wo"):
        check_device_support("fp8", None, runtime)
    check_device_support("int8-wo", None, runtime)  # 8-bit weights alone run anywhere
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_device_support("fp8", None, runtime)


def test_engine_config_roundtrips_through_parameters():
    assert EngineConfig.from_parameters(CFG.to_parameters()) == CFG
    quantized = EngineConfig(runtime="torch-cuda", quantization="fp8")
    assert EngineConfig.from_parameters(quantized.to_parameters()) == quantized
    sleeping = replace(CFG, ort_spin_wait=False)  # a False bool survives the strings
    assert EngineConfig.from_parameters(sleeping.to_parameters()) == sleeping != CFG


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=201), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=50, max_tokens=10), "min_tokens"),
        (dict(end_id=10**9), "end_id"),
        (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
        (dict(top_logprobs=2), "top_logprobs"),
    ],
)
def test_sampling_params_errors_name_field_and_fix(kw, field):
    with pytest.raises(RequestValidationError) as e:
        SamplingParams(**kw).validate(CFG, prompt_len=5, vocab_size=1000)
    assert e.value.field == field
    assert f"'{field}'" in str(e.value) and ("use" in str(e.value) or "lower" in str(e.value))


def test_prompt_plus_max_tokens_beyond_context_says_how_much_fits():
    with pytest.raises(RequestValidationError, match="lower max_tokens to <= 56"):
        SamplingParams(max_tokens=100).validate(CFG, prompt_len=200, vocab_size=1000)
    with pytest.raises(RequestValidationError, match="shorten the prompt"):
        SamplingParams(max_tokens=10).validate(CFG, prompt_len=300, vocab_size=1000)


def test_render_scalars_lists_messages():
    text = render(
        {
            "name": "m",
            "max_batch_size": 4,
            "flag": True,
            "dims": [-1],
            "input": [{"name": "a", "data_type": Enum("TYPE_INT32")}],
            "x": {"y": 1.5},
        }
    )
    assert text == (
        'name: "m"\nmax_batch_size: 4\nflag: true\ndims: [-1]\n'
        'input {\n  name: "a"\n  data_type: TYPE_INT32\n}\nx {\n  y: 1.5\n}\n'
    )


def test_repository_configs_match_golden_files():
    """The rendered config.pbtxt files are reviewed text: any change shows up here."""
    configs = model_configs(RepositoryConfig(name="llm", engine=CFG))
    for model, config in configs.items():
        golden = GOLDEN / f"{model}.pbtxt"
        assert render(config) == golden.read_text(), f"{model} differs from {golden}"
        assert "${" not in render(config)


def test_engine_side_detokenization_drops_the_detokenizer_stage():
    """emit_text: tokenizer -> engine; the engine's outputs are the ensemble's (golden-tested too)."""
    configs = model_configs(RepositoryConfig(name="onehop", engine=replace(CFG, emit_text=True)))
    assert set(configs) == {"onehop", "onehop_tokenizer", "onehop_engine"}
    steps = configs["onehop"]["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["onehop_tokenizer", "onehop_engine"]
    assert {o["name"] for o in configs["onehop_engine"]["output"]} == {o["name"] for o in configs["onehop"]["output"]}
    for model in ("onehop", "onehop_engine"):
        assert render(configs[model]) == (GOLDEN / f"{model}.pbtxt").read_text(), model


def test_repository_name_is_validated():
    with pytest.raises(ValueError, match="model name"):
        RepositoryConfig(name="bad name")


def test_response_info_round_trips_every_finish_reason():
    from tritonllm.tensors import FINISH_REASONS, ResponseInfo

    for reason in FINISH_REASONS:
        info = ResponseInfo(8, bool(reason), 128, 17, reason, 96)
        assert ResponseInfo.unpack(info.pack()) == info
    with pytest.raises(ValueError, match="add it to FINISH_REASONS"):
        ResponseInfo(0, True, 1, 1, "exploded").pack()
    with pytest.raises(ValueError, match="expected 6 values"):
        ResponseInfo.unpack([0, 1, 2])


def test_the_build_cli_refuses_an_lm_head_it_would_not_quantize(tmp_path, capsys):
    from tritonllm.build.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--runtime", "torch-cuda", "--quantize-lm-head", "--out", str(tmp_path)])
    assert e.value.code == 2 and "quantize_lm_head" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_onnx_threads_stop_spinning_after_each_step_of_an_integer_engine_by_default():
    """ort_spin_after_run auto: off for int8 / int4 ONNX Runtime engines, on otherwise; on / off as
    given; anything else is refused with the choices."""
    assert EngineConfig().ort_spins_after_run
    assert not EngineConfig(quantization="int8").ort_spins_after_run
    assert not EngineConfig(quantization="int4").ort_spins_after_run
    assert EngineConfig(quantization="int8", ort_spin_after_run="on").ort_spins_after_run
    assert not EngineConfig(ort_spin_after_run="off").ort_spins_after_run
    with pytest.raises(ValueError, match="ort_spin_after_run.*auto\\|on\\|off"):
        EngineConfig(ort_spin_after_run="sometimes")
