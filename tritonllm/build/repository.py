"""Write a Triton model repository for one LLM: <name> (ensemble), <name>_tokenizer,
<name>_engine (decoupled, in-flight batching), <name>_detokenizer. Several LLMs can share one
repository under distinct names. Each stage's model.py is its adapter from `tritonllm/triton/models/`,
and the `tritonllm` package is copied beside it: Triton's python backend puts a model's version
folder on `sys.path`, so the repository serves from a stock `tritonserver:<yy.mm>-py3` container
with only the runtime's packages installed (README, "Serving from a stock Triton container")."""
from __future__ import annotations

import os
import re
import shutil
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from .. import tensors as T
from ..config import EngineConfig
from .pbtxt import Enum, render

PACKAGE_DIR = Path(__file__).resolve().parent.parent
ADAPTERS_DIR = PACKAGE_DIR / "triton" / "models"  # <stage>.py, copied as each stage's model.py
REQUIREMENTS_DIR = PACKAGE_DIR / "build" / "requirements"  # <runtime>.txt: what a served repository imports
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
WARMUP_TEXT = "Hello"  # the tokenizer's warm-up prompt (`stage_warmup`), in <name>_tokenizer/warmup/text_input


@dataclass(frozen=True)
class RepositoryConfig:
    name: str = "llm"
    max_batch_size: int = 64          # batch dimension of every model (clients send [1, 1] scalars)
    tokenizer_instances: int = 1      # python processes tokenizing in parallel (a burst of prompts queues here)
    detokenizer_instances: int = 1
    engine_instances: int = 1         # engine processes on the CPU kind (each its own slots and weights) ...
    gpus: tuple[int, ...] = ()        # ... or one engine instance on each of these GPUs (kind GPU)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ValueError(f"model name {self.name!r}: use letters, digits, '_', '.', '-' (start with a letter)")
        if not 1 <= self.max_batch_size <= 4096:
            raise ValueError(f"max_batch_size={self.max_batch_size}: use 1..4096")
        for stage in ("tokenizer", "detokenizer", "engine"):
            n = getattr(self, f"{stage}_instances")
            if not 1 <= n <= 64:
                raise ValueError(f"{stage}_instances={n}: use 1..64")
        if self.gpus and self.engine.runtime == "onnxruntime":
            raise ValueError(f"gpus={list(self.gpus)}: the onnxruntime engine runs on the CPU; use --runtime torch-cuda, "
                             "or --engine-instances for several CPU engines")
        if self.gpus and (self.engine_instances != 1 or len(set(self.gpus)) != len(self.gpus) or min(self.gpus) < 0):
            raise ValueError(f"gpus={list(self.gpus)}, engine_instances={self.engine_instances}: list distinct GPU "
                             "indices, one engine each (engine_instances applies to CPU engines)")
        if self.engine.io_processes > 1 and self.engine_instances > 1:  # asked for: auto (0) gives them one each
            raise ValueError(f"io_processes={self.engine.io_processes} with engine_instances={self.engine_instances}: "
                             "I/O processes share one engine; use one engine (or one per GPU with --gpus)")

    @property
    def served_engine(self) -> EngineConfig:
        """The engine config the repository records: `io_processes` resolved (auto: 1 per engine when
        several CPU engines run, else the engine's own default)."""
        io = 1 if self.engine_instances > 1 else self.engine.io_instances
        return replace(self.engine, io_processes=io)

    def stage(self, stage: str) -> str:
        return f"{self.name}_{stage}"

    def model_names(self) -> list[str]:
        """The ensemble and its stages (no detokenizer when the engine emits text)."""
        stages = ("tokenizer", "engine") if self.engine.emit_text else ("tokenizer", "engine", "detokenizer")
        return [self.name, *(self.stage(s) for s in stages)]


def _io(specs: list[T.TensorSpec], ragged: bool = False) -> list[dict]:
    out = []
    for s in specs:
        d = {"name": s.name, "data_type": Enum(f"TYPE_{s.dtype}"), "dims": list(s.dims)}
        if s.optional:
            d["optional"] = True
        if ragged and -1 in s.dims:
            d["allow_ragged_batch"] = True
        out.append(d)
    return out


def _outputs(specs: list[T.TensorSpec]) -> list[dict]:
    return [{"name": s.name, "data_type": Enum(f"TYPE_{s.dtype}"), "dims": list(s.dims)} for s in specs]


def _params(values: dict[str, str]) -> list[dict]:
    return [{"key": k, "value": {"string_value": v}} for k, v in values.items()]


def instance_group(count: int = 1, gpus: tuple[int, ...] = ()) -> list[dict]:
    """`count` instances on the CPU kind, or `count` on each of `gpus` (Triton passes each its
    device id; the engine runs there)."""
    if gpus:
        return [{"count": count, "kind": Enum("KIND_GPU"), "gpus": list(gpus)}]
    return [{"count": count, "kind": Enum("KIND_CPU")}]


def stage_warmup(stage: str) -> list[dict]:
    """One request Triton sends through each instance of a text stage while loading it (Triton's
    model_warmup): a python stub's first request otherwise waits ~50 ms for its set-up, and with
    several instances each one's first request does. The engine gets none: a warm-up there would be
    a generation counted in its metrics."""
    inputs: dict[str, dict]
    if stage == "tokenizer":
        inputs = {"text_input": {"data_type": Enum("TYPE_STRING"), "dims": [1], "input_data_file": "text_input"}}
    elif stage == "detokenizer":  # one id, no context, not final: a stateless delta
        inputs = {"output_ids": {"data_type": Enum("TYPE_INT32"), "dims": [1], "zero_data": True},
                  "response_info": {"data_type": Enum("TYPE_INT32"), "dims": [len(T.RESPONSE_INFO)], "zero_data": True}}
    else:
        raise ValueError(f"no warm-up request for the {stage!r} stage")
    return [{"name": f"{stage}_warmup", "batch_size": 1, "inputs": [{"key": k, "value": v} for k, v in inputs.items()]}]


def python_model(name: str, cfg: RepositoryConfig, inputs, outputs, params, instances=None, decoupled=False,
                 warmup: list[dict] | None = None) -> dict:
    d = {"name": name, "backend": "python", "max_batch_size": cfg.max_batch_size,
         "input": _io(inputs, ragged=True), "output": _outputs(outputs),
         "instance_group": instances or instance_group()}
    if decoupled:
        d["model_transaction_policy"] = {"decoupled": True}
    # No dynamic batcher on any stage: in Triton 2.51, when an ensemble request is cancelled, the
    # batcher drops the stage requests it still queues and the ensemble never releases the request
    # (it stays in flight until Triton's exit timeout: docs/decisions.md, 2026-12-01).
    d["parameters"] = _params(params) or None
    d["model_warmup"] = warmup
    return d


def ensemble_model(cfg: RepositoryConfig) -> dict:
    """tokenizer -> engine -> detokenizer (or tokenizer -> engine with `emit_text`); stage-to-stage
    tensors get internal names ('_' prefix)."""
    internal = {s.name: f"_{s.name}" for s in T.TOKENIZER_OUTPUTS + T.ENGINE_OUTPUTS if s.name != "stop_words"}

    def step(stage, inputs, outputs, out_names, in_names=None):
        in_names = internal | (in_names or {})
        return {"model_name": cfg.stage(stage), "model_version": -1,
                "input_map": [{"key": i.name, "value": in_names.get(i.name, i.name)} for i in inputs],
                "output_map": [{"key": o.name, "value": out_names.get(o.name, o.name)} for o in outputs]}

    steps = [step("tokenizer", T.TOKENIZER_INPUTS, T.TOKENIZER_OUTPUTS, internal)]
    if cfg.engine.emit_text:
        steps.append(step("engine", T.ENGINE_INPUTS, T.ENGINE_TEXT_OUTPUTS, {}))
    else:
        steps += [step("engine", T.ENGINE_INPUTS, T.ENGINE_OUTPUTS, internal | {"stop_words": "_stop_words"}),
                  step("detokenizer", T.DETOKENIZER_INPUTS, T.DETOKENIZER_OUTPUTS, {}, {"stop_words": "_stop_words"})]
    return {
        "name": cfg.name, "platform": "ensemble", "max_batch_size": cfg.max_batch_size,
        "input": _io(T.ENSEMBLE_INPUTS), "output": _outputs(T.ENSEMBLE_OUTPUTS),
        "ensemble_scheduling": {"step": steps},
    }


def model_configs(cfg: RepositoryConfig) -> dict[str, dict]:
    eng = cfg.served_engine
    engine_outputs = T.ENGINE_TEXT_OUTPUTS if eng.emit_text else T.ENGINE_OUTPUTS
    configs = {
        cfg.stage("tokenizer"): python_model(cfg.stage("tokenizer"), cfg, T.TOKENIZER_INPUTS, T.TOKENIZER_OUTPUTS,
                                             {"max_context": str(eng.max_context)},
                                             instances=instance_group(cfg.tokenizer_instances),
                                             warmup=stage_warmup("tokenizer")),
        cfg.stage("engine"): python_model(cfg.stage("engine"), cfg, T.ENGINE_INPUTS, engine_outputs,
                                          eng.to_parameters(), instance_group(cfg.engine_instances * eng.io_instances, cfg.gpus),
                                          decoupled=True),
    }
    if not eng.emit_text:
        configs[cfg.stage("detokenizer")] = python_model(cfg.stage("detokenizer"), cfg, T.DETOKENIZER_INPUTS,
                                                         T.DETOKENIZER_OUTPUTS, {},
                                                         instances=instance_group(cfg.detokenizer_instances),
                                                         warmup=stage_warmup("detokenizer"))
    return configs | {cfg.name: ensemble_model(cfg)}


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_package(dst: Path) -> None:
    shutil.copytree(PACKAGE_DIR, dst / "tritonllm", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def write_repository(out: Path, cfg: RepositoryConfig, checkpoint: Path, engine_dir: Path) -> Path:
    """Write (or replace) this LLM's four models under `out`; other LLMs there are left alone."""
    out = Path(out)
    configs = model_configs(cfg)
    if cfg.stage("detokenizer") not in configs:  # a stale detokenizer from an earlier build would still load
        shutil.rmtree(out / cfg.stage("detokenizer"), ignore_errors=True)
    for model, config in configs.items():
        mdir = out / model
        if mdir.exists():
            shutil.rmtree(mdir)
        version = mdir / "1"
        version.mkdir(parents=True)
        (mdir / "config.pbtxt").write_text(render(config))
        if model == cfg.name:
            continue
        stage = model[len(cfg.name) + 1:]
        shutil.copy2(ADAPTERS_DIR / f"{stage}.py", version / "model.py")
        _copy_package(version)
        for f in TOKENIZER_FILES:
            if (Path(checkpoint) / f).exists():
                _link_or_copy(Path(checkpoint) / f, version / "tokenizer" / f)
        if stage == "tokenizer":  # Triton's BYTES serialization: a 4-byte little-endian length, then the bytes
            (mdir / "warmup").mkdir()
            (mdir / "warmup" / "text_input").write_bytes(struct.pack("<I", len(WARMUP_TEXT)) + WARMUP_TEXT.encode())
        if stage == "engine":  # what a container serving this repository must install
            shutil.copy2(REQUIREMENTS_DIR / f"{cfg.engine.runtime}.txt", mdir / "requirements.txt")
            for f in Path(engine_dir).iterdir():
                if f.is_file():
                    _link_or_copy(f, version / "engine" / f.name)
    return out
