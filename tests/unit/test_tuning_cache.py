"""The start-up kernel tables kept on disk (runtimes/torch_cuda/tuning_cache.py): a table read back
equals the one stored, a second start with the same facts reads instead of tuning, anything the
choice depends on changing tunes again, and a broken file or a folder that cannot be written never
stops an engine from starting."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tritonllm.model import quant
from tritonllm.model.modeling import CausalLM, load_hf
from tritonllm.runtimes.torch_cuda import tuning_cache as tc
from tritonllm.runtimes.torch_cuda.tuning import KernelChoice


def tuned_choice() -> KernelChoice:
    return KernelChoice(
        True,
        gemv_table={("qkv_proj", 1): (2, 4096, 4), ("gate_up", 64): "fp8", ("down", 1): (128, 256, 8, 3, 4, 2, 1)},
        attention_table={1: (32, 1, 2), 256: (64, 2, 3)},
        split_table={1: (32, 1, 2, 4)},
        quant_table={("o", 2048): "fp8", ("down", 256): (64, 128, 64, 4, 3), ("qkv_proj", 2048): "reference"},
        piece_config=(64, 64, 4, 3),
        pdl=True,
        gemv_report=[{"kind": "o", "rows": 1, "chosen": "(2, 4096, 4)", "us": {"cublas": 10.5}}],
    )


def test_a_stored_table_reads_back_equal(tmp_path):
    choice = tuned_choice()
    assert tc.load_choice(json.loads(json.dumps(tc.dump(choice))), KernelChoice) == choice


class Stages:
    """The tuning's stages over `tuned_choice()`'s tables, counting the runs of each; `stop_at`
    names a stage that raises as a start stopped there would."""

    def __init__(self, stop_at: str | None = None):
        self.runs, self.stop_at, want = [], stop_at, tuned_choice()
        parts = {"gemv": ("gemv_table", "gemv_report"), "attention": ("attention_table",), "splits": ("split_table",)}
        parts |= {"pieces": ("piece_config",), "quant": ("quant_table",)}
        self.stages = [(name, lambda c, n=name, f=f: self.run(c, n, f, want)) for name, f in parts.items()]

    def run(self, choice, name, fields, want):
        if name == self.stop_at:
            raise KeyboardInterrupt(name)
        self.runs.append(name)
        for f in fields:
            setattr(choice, f, getattr(want, f))


def start() -> KernelChoice:
    return KernelChoice(True, pdl=True)


def test_a_second_start_reads_the_tables_instead_of_tuning(tmp_path):
    facts, tuner = {"device": {"name": "H200"}, "weights": {"w": [[8, 8], "torch.float8_e4m3fn"]}}, Stages()
    first = tc.cached(tmp_path, facts, start(), tuner.stages, KernelChoice)
    again = tc.cached(tmp_path, facts, start(), tuner.stages, KernelChoice)
    assert first == again == tuned_choice() and len(tuner.runs) == 5
    other = facts | {"device": {"name": "H100"}}
    tc.cached(tmp_path, other, start(), tuner.stages, KernelChoice)
    assert len(tuner.runs) == 10 and len(list(tmp_path.glob("*.json"))) == 2
    assert tc.cached(None, facts, start(), tuner.stages, KernelChoice) == tuned_choice()  # no folder: tuned
    assert len(tuner.runs) == 15 and len(list(tmp_path.iterdir())) == 2  # ... nothing stored


def test_a_start_stopped_mid_tuning_resumes_at_the_stage_it_was_in(tmp_path):
    facts = {"device": {"name": "H200"}}
    stopped = Stages(stop_at="splits")
    with pytest.raises(KeyboardInterrupt):
        tc.cached(tmp_path, facts, start(), stopped.stages, KernelChoice)
    assert stopped.runs == ["gemv", "attention"]
    resumed = Stages()
    assert tc.cached(tmp_path, facts, start(), resumed.stages, KernelChoice) == tuned_choice()
    assert resumed.runs == ["splits", "pieces", "quant"]
    assert tc.cached(tmp_path, facts, start(), resumed.stages, KernelChoice) == tuned_choice()
    assert resumed.runs == ["splits", "pieces", "quant"]  # whole now: read, not tuned


def test_a_broken_file_or_an_unwritable_folder_only_costs_a_tuning(tmp_path):
    facts, tuner = {"device": {"name": "H200"}}, Stages()
    (tmp_path / f"{tc.key(facts)}.json").write_text('{"choice": {"triton": tru')
    assert tc.cached(tmp_path, facts, start(), tuner.stages, KernelChoice) == tuned_choice()
    assert tc.cached(tmp_path, facts, start(), tuner.stages, KernelChoice) == tuned_choice()  # rewritten
    assert len(tuner.runs) == 5
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert tc.cached(blocked / "tuning", facts, start(), tuner.stages, KernelChoice) == tuned_choice()
    assert len(tuner.runs) == 10


def test_the_key_follows_the_weights_types_and_the_cache(tiny_dir):
    model = CausalLM(load_hf(tiny_dir))
    fp8, head = copy.deepcopy(model), copy.deepcopy(model)
    quant.quantize_model(fp8, "fp8")
    quant.quantize_model(head, "fp8")
    quant.quantize_head(head)
    cache = SimpleNamespace(keys=torch.zeros(4, 16, 2, 8))
    keys = {tc.key(tc.facts(m, cache, [1, 2], 64, 0, False)) for m in (model, fp8, head)}
    assert len(keys) == 3
    base = tc.facts(model, cache, [1, 2], 64, 0, False)
    assert tc.key(base) == tc.key(tc.facts(model, cache, [1, 2], 64, 0, False))
    for changed in (
        tc.facts(model, cache, [1, 2, 4], 64, 0, False),
        tc.facts(model, cache, [1, 2], 128, 0, False),
        tc.facts(model, cache, [1, 2], 64, 0, False, deterministic=True),
    ):
        assert tc.key(changed) != tc.key(base)
    fp8_cache = SimpleNamespace(keys=torch.zeros(4, 16, 2, 8, dtype=torch.float8_e4m3fn))
    assert tc.key(tc.facts(model, fp8_cache, [1, 2], 64, 0, False)) != tc.key(base)


def test_the_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tc.cache_dir("auto") == tmp_path / "tritonllm" / "tuning"
    assert tc.cache_dir("off") is None
    assert tc.cache_dir("/srv/tables") == Path("/srv/tables")


def test_the_engine_tunes_in_a_stage_per_weight_kind(tiny_dir, monkeypatch):
    from tritonllm.runtimes.torch_cuda import tuning

    monkeypatch.delenv("TRITONLLM_GEMV", raising=False)
    model = CausalLM(load_hf(tiny_dir))
    names = lambda m, det=False, **given: [
        n for n, _ in tuning._stages(m, None, [1, 64], 512, given.get("g"), given.get("q"), 0, det)
    ]
    kinds = list(quant.PROJECTIONS)
    after_products = ["glu", "mlp", "attention", "rotary", "attention+o", "norm in products", "splits"]
    assert names(model) == [*(f"gemv {k}" for k in kinds), "gemv lm_head", *after_products]
    atomics = {"mlp", "attention+o"}  # deterministic: no atomics' order in the sums
    assert atomics.isdisjoint(names(model, det=True)) and atomics < set(names(model))
    quant.quantize_model(model, "fp8")
    assert names(model)[-len(kinds) :] == [f"quant {k}" for k in kinds]
    quant.quantize_head(model)
    assert names(model)[-1] == "quant lm_head"
    assert names(model, g={}, q={}) == [
        "gemv",
        "attention",
        "rotary",
        "splits",
        "quant",
    ]  # tables given: one stage each


def test_only_an_int8_head_beside_fp8_projections_may_take_int8_rows(tiny_dir, monkeypatch):
    from tritonllm.runtimes.kernels import qmatmul
    from tritonllm.runtimes.torch_cuda import tuning

    offered = {}
    monkeypatch.setattr(qmatmul, "tune", lambda weights, *a: offered.update({next(iter(weights)): a[-1]}) or ({}, []))
    for scheme in ("fp8", "int8-wo"):
        model = CausalLM(load_hf(tiny_dir))
        quant.quantize_model(model, scheme)
        quant.quantize_head(model)
        for kind in tuning._quant_kinds(model):
            tuning._tune_quant(model, {}, [1, 128], False, kind)
        assert offered["lm_head"] == (frozenset({"lm_head"}) if scheme == "fp8" else frozenset())
