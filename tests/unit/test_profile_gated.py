"""`bench.profile_step.gated_variants`, `mlp_variants`, `attention_o_variants`, `rope_variants` and
`normed_variants`: the decode step timed with the down product gated and with the activation
kernel, with the MLP (or attention and o) in one kernel and as tuned, whichever the tuner chose,
with the rotary inside attention and before it, and with the products after each add + norm making
their input and not; the tables left as they were."""

from types import SimpleNamespace

import pytest

pytest.importorskip("triton")

from bench import profile_step


def runtime(table: dict, report: list):
    return SimpleNamespace(kernels=SimpleNamespace(gemv_table=table, gemv_report=report))


@pytest.mark.parametrize(
    "key, variants, names",
    [
        ("down+act", profile_step.gated_variants, ("activation kernel", "gated down", "gated tile")),
        ("mlp", profile_step.mlp_variants, ("MLP as tuned", "MLP in one kernel", "mlp tile")),
        (
            "attention+o",
            profile_step.attention_o_variants,
            ("attention then o", "attention + o in one kernel", "attention+o tile"),
        ),
    ],
)
def test_each_variant_sees_its_table_and_the_table_is_restored(monkeypatch, key, variants, names):
    seen = {}

    def compare(rt, batch, bucket, variants, against):
        for name, setup in variants.items():
            setup()
            seen[name] = rt.kernels.gemv_table.get((key, batch))
        return {"decode ms, x": 1.0}

    monkeypatch.setattr(profile_step, "compare", compare)
    off, on, tile = names
    timed = [{"kind": key, "rows": 1, "us": {"activation kernel + (1, 2, 4)": 9.0, "(4, 8, 4, 3)": 8.0}}]
    for table, chosen in (({(key, 1): (2, 4, 4, 3)}, (2, 4, 4, 3)), ({}, (4, 8, 4, 3))):
        before = dict(table)
        out = variants(runtime(table, timed), 1, 64)
        assert seen == {off: None, on: chosen}
        assert out[tile] == str(chosen) and out[f"{tile} chosen by the tuner"] == bool(before)
        assert table == before
    assert "no " in next(iter(variants(runtime({}, []), 1, 64).values()))


def test_rope_variants_set_the_batch_both_ways_and_restore_the_table(monkeypatch):
    seen = {}

    def compare(rt, batch, bucket, variants, against):
        for name, setup in variants.items():
            setup()
            seen[name] = batch in rt.kernels.rope_batches
        return {}

    monkeypatch.setattr(profile_step, "compare", compare)
    for table in ({1, 64}, {64}):
        before = set(table)
        rt = SimpleNamespace(kernels=SimpleNamespace(rope_batches=table))
        out = profile_step.rope_variants(rt, 1, 64)
        assert seen == {"rotary kernel": False, "rotary in attention": True}
        assert out["rotary in attention chosen by the tuner"] == (1 in before) and table == before


def test_glu_variants_set_both_tiles_or_none_and_restore_the_table(monkeypatch):
    seen = {}

    def compare(rt, batch, bucket, variants, against):
        for name, setup in variants.items():
            setup()
            seen[name] = tuple(rt.kernels.gemv_table.get((k, batch)) for k in ("glu gate_up", "glu down"))
        return {}

    monkeypatch.setattr(profile_step, "compare", compare)
    us = {"gate_up + activation kernel + down": 9.0, "((1, 2, 4), (4, 8, 4, 3))": 8.0}
    timed = [{"kind": "glu", "rows": 1, "us": us}]
    chosen = {("glu gate_up", 1): (2, 4, 4), ("glu down", 1): (4, 4, 4, 3)}
    for table, pair in ((dict(chosen), ((2, 4, 4), (4, 4, 4, 3))), ({}, ((1, 2, 4), (4, 8, 4, 3)))):
        before = dict(table)
        rt = SimpleNamespace(kernels=SimpleNamespace(gemv_table=table, gemv_report=timed))
        out = profile_step.glu_variants(rt, 1, 64)
        assert seen == {"gate_up then activation": (None, None), "gate_up makes the activation": pair}
        assert out["glu chosen by the tuner"] == bool(before) and table == before
    assert "no glu tile" in profile_step.glu_variants(runtime({}, []), 1, 64)["glu"]


def test_normed_variants_time_the_kernels_as_tuned_and_every_reader_making_its_input(monkeypatch):
    """qkv's tile making its input was kept by the tuner, the LM head's was not (its fastest form
    asks L2 for its first K step): three steps (the add + norm kernels, as tuned, both making their
    input), the table restored after."""
    seen = {}
    keys = [("qkv_proj+norm", 1), ("lm_head+norm", 1), ("lm_head+norm prefetch", 1)]

    def compare(rt, batch, bucket, variants, against):
        for name, setup in variants.items():
            setup()
            seen[name] = tuple(rt.kernels.gemv_table.get(k) for k in keys)
        return {}

    monkeypatch.setattr(profile_step, "compare", compare)
    timed = [
        {"kind": "qkv_proj+norm", "rows": 1, "us": {"add + norm kernel + (2, 4, 4)": 9.0, "(2, 4, 4)": 7.0}},
        {
            "kind": "lm_head+norm",
            "rows": 1,
            "us": {"add + norm kernel + (1, 8, 4)": 5.0, "(1, 8, 4)": 6.0, "(1, 8, 4) + L2 prefetch": 5.5},
        },  # fmt: skip
        {"kind": "qkv_proj+norm", "rows": 2, "us": {"(4, 4, 4)": 1.0}},
    ]
    table = {keys[0]: (2, 4, 4), ("qkv_proj", 1): (2, 4, 4)}
    before = dict(table)
    out = profile_step.normed_variants(runtime(table, timed), 1, 64)
    assert seen == {
        "add + norm kernels": (None, None, None),
        "as tuned": ((2, 4, 4), None, None),
        "every product makes its input": ((2, 4, 4), (1, 8, 4), 1),  # the head's fastest form prefetches
    }
    assert out["chosen by the tuner"] == ["qkv_proj+norm"] and table == before
    assert "none timed" in next(iter(profile_step.normed_variants(runtime({}, []), 1, 64).values()))
