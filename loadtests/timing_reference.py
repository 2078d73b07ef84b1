"""A timing-reference model for checking a load generator: Triton python model, decoupled, first
token after 50 ms, then one every 20 ms (`loadtests/timing_model/model.py`), with the ensemble's
tensor names, so Locust's numbers can be compared with known truth."""

from __future__ import annotations

import shutil
from pathlib import Path

from tritonllm.build.pbtxt import Enum, render

MODEL_PY = Path(__file__).parent / "timing_model" / "model.py"
FIRST_TOKEN_MS, INTER_TOKEN_MS = 50.0, 20.0


def timing_config() -> dict:
    def t(name, dtype, dims, optional=False):
        d = {"name": name, "data_type": Enum(f"TYPE_{dtype}"), "dims": dims}
        if optional:
            d["optional"] = True
        return d

    return {
        "name": "timing",
        "backend": "python",
        "max_batch_size": 64,
        "input": [t("text_input", "STRING", [1]), t("max_tokens", "INT32", [1], True), t("stream", "BOOL", [1], True)],
        "output": [
            t("text_output", "STRING", [-1]),
            t("num_output_tokens", "INT32", [1]),
            t("finish_reason", "STRING", [1]),
        ],
        "model_transaction_policy": {"decoupled": True},
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
    }


def write_timing_repository(repo: Path) -> Path:
    (repo / "timing" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(MODEL_PY, repo / "timing" / "1" / "model.py")
    (repo / "timing" / "config.pbtxt").write_text(render(timing_config()))
    return repo
