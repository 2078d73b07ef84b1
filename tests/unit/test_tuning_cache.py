"""The start-up kernel tables kept on disk (runtimes/torch_cuda/tuning_cache.py): a table read back
equals the one stored, a second start with the same facts reads instead of tuning, anything the
choice depends on changing tunes again, and a broken file or a folder that cannot be written never
stops an engine from starting."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

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


def test_a_second_start_reads_the_tables_instead_of_tuning(tmp_path):
    tunings = []
    tune = lambda: tunings.append(1) or tuned_choice()
    facts = {"device": {"name": "H200"}, "weights": {"w": [[8, 8], "torch.float8_e4m3fn"]}}
    first = tc.cached(tmp_path, facts, tune, KernelChoice)
    again = tc.cached(tmp_path, facts, tune, KernelChoice)
    assert first == again == tuned_choice() and len(tunings) == 1
    other = facts | {"device": {"name": "H100"}}
    tc.cached(tmp_path, other, tune, KernelChoice)
    assert len(tunings) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    tc.cached(None, facts, tune, KernelChoice)  # no folder: tuned, nothing stored
    assert len(tunings) == 3 and len(list(tmp_path.iterdir())) == 2


def test_a_broken_file_or_an_unwritable_folder_only_costs_a_tuning(tmp_path):
    facts, tunings = {"device": {"name": "H200"}}, []
    tune = lambda: tunings.append(1) or tuned_choice()
    (tmp_path / f"{tc.key(facts)}.json").write_text('{"choice": {"triton": tru')
    assert tc.cached(tmp_path, facts, tune, KernelChoice) == tuned_choice() and len(tunings) == 1
    assert tc.cached(tmp_path, facts, tune, KernelChoice) == tuned_choice() and len(tunings) == 1  # rewritten
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert tc.cached(blocked / "tuning", facts, tune, KernelChoice) == tuned_choice() and len(tunings) == 2


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
    for changed in (tc.facts(model, cache, [1, 2, 4], 64, 0, False), tc.facts(model, cache, [1, 2], 128, 0, False)):
        assert tc.key(changed) != tc.key(base)
    fp8_cache = SimpleNamespace(keys=torch.zeros(4, 16, 2, 8, dtype=torch.float8_e4m3fn))
    assert tc.key(tc.facts(model, fp8_cache, [1, 2], 64, 0, False)) != tc.key(base)


def test_the_folder_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tc.cache_dir("auto") == tmp_path / "tritonllm" / "tuning"
    assert tc.cache_dir("off") is None
    assert tc.cache_dir("/srv/tables") == Path("/srv/tables")
