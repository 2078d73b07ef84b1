"""The start-up kernel tables kept on disk: tuning an 8B fp8 engine times thousands of kernel
candidates (1.5-3 minutes on an H200), and every start of the same engine on the same kind of GPU
would choose the same. A file per key in a cache folder (`EngineConfig.tuning_cache`), the key
a hash of everything the choice depends on: the GPU model, torch / Triton / CUDA versions, the
model's weight shapes and types, the cache's, the batch buckets and context, and the source of the
kernels and of the tuner themselves (a code change tunes again). A file that cannot be read is
tuned again and rewritten; a folder that cannot be written only costs the next start its tuning."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
VERSION = 1  # of the file's layout


def cache_dir(setting: str) -> Path | None:
    """The folder of `EngineConfig.tuning_cache`: "off" none, "auto" the user's cache folder
    ($XDG_CACHE_HOME or ~/.cache, then tritonllm/tuning), else the path given."""
    if setting == "off":
        return None
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonllm" / "tuning"
    return Path(setting)


def _sources() -> str:
    """The kernels' and the tuner's source text (what a table was chosen from)."""
    from .. import kernels
    from . import tuning

    files = sorted(Path(kernels.__file__).parent.glob("*.py")) + [Path(inspect.getfile(tuning))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _device(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": [props.major, props.minor], "sms": props.multi_processor_count}


def facts(model, cache, batch_buckets: list[int], max_context: int, piece_tokens: int, pdl: bool) -> dict:
    """What the tables depend on (weights by shape and type, not value)."""
    import triton

    tensors = {name: [list(t.shape), str(t.dtype)] for name, t in model.state_dict().items()}
    return {
        "version": VERSION,
        "device": _device(cache.keys.device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "weights": tensors,
        "kv_cache": [list(cache.keys.shape), str(cache.keys.dtype)],
        "batch_buckets": list(batch_buckets),
        "max_context": max_context,
        "piece_tokens": piece_tokens,
        "pdl": pdl,
        "gemv_env": os.environ.get("TRITONLLM_GEMV"),
        "sources": _sources(),
    }


def key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _plain(value):
    """A table entry as JSON keeps it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def _entry(value):
    return tuple(value) if isinstance(value, list) else value


def dump(choice) -> dict:
    """A KernelChoice as JSON-able data (tuple keys and configs as lists)."""
    return {
        "triton": choice.triton,
        "gemv_table": [[kind, rows, _plain(c)] for (kind, rows), c in choice.gemv_table.items()],
        "attention_table": [[b, _plain(c)] for b, c in choice.attention_table.items()],
        "split_table": [[b, _plain(c)] for b, c in choice.split_table.items()],
        "quant_table": [[kind, rows, _plain(c)] for (kind, rows), c in choice.quant_table.items()],
        "piece_config": list(choice.piece_config),
        "pdl": choice.pdl,
        "prefetch_steps": choice.prefetch_steps,
        "reports": {n: getattr(choice, n) for n in ("gemv_report", "attention_report", "quant_report", "piece_report")},
    }


def load_choice(data: dict, cls):
    """The KernelChoice `dump` wrote."""
    return cls(
        triton=data["triton"],
        gemv_table={(kind, rows): _entry(c) for kind, rows, c in data["gemv_table"]},
        attention_table={b: _entry(c) for b, c in data["attention_table"]},
        split_table={b: _entry(c) for b, c in data["split_table"]},
        quant_table={(kind, rows): _entry(c) for kind, rows, c in data["quant_table"]},
        piece_config=tuple(data["piece_config"]),
        pdl=data["pdl"],
        prefetch_steps=data["prefetch_steps"],
        **data["reports"],
    )


def cached(folder: Path | None, fields: dict, tune: Callable[[], object], cls):
    """The tables stored under `fields`' key in `folder`, else `tune()`'s, stored there for the
    next start (`folder` None: always tuned, nothing stored)."""
    if folder is None:
        return tune()
    path = folder / f"{key(fields)}.json"
    try:
        choice = load_choice(json.loads(path.read_text())["choice"], cls)
        log.info("kernel tables from %s (tuned before on this GPU kind, model shape and code)", path)
        return choice
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable or another layout: tune again
        log.warning("kernel tables in %s unreadable (%s): tuning again", path, str(exc)[:200])
    choice = tune()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # whole files only: another engine may read it now
        tmp.write_text(json.dumps({"facts": fields, "choice": dump(choice)}, default=str))
        tmp.replace(path)
        log.info("kernel tables stored in %s", path)
    except OSError as exc:  # a read-only folder: the next start tunes again
        log.warning("kernel tables not stored in %s (%s)", folder, exc)
    return choice
