"""The start-up kernel tables kept on disk: tuning an 8B fp8 engine compiles and times thousands
of kernel candidates, and every start of the same engine on the same kind of GPU would choose the
same. A file per key in a cache folder (`EngineConfig.tuning_cache`), the key
a hash of everything the choice depends on: the GPU model, torch / Triton / CUDA versions, the
model's weight shapes and types, the cache's, the batch buckets and context, and the source of the
kernels and of the tuner themselves (a code change tunes again). The file is written after each
stage of the tuning, so a start stopped part-way resumes. A file that cannot be read is tuned
again and rewritten; a folder that cannot be written only costs the next start its tuning."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)
VERSION = 2  # of the file's layout


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


def facts(
    model, cache, batch_buckets: list[int], max_context: int, piece_tokens: int, pdl: bool, deterministic: bool = False
) -> dict:
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
        "deterministic": deterministic,  # (its tuning leaves kernels out)
        "gemv_env": os.environ.get("TRITONLLM_GEMV"),
        "sources": _sources(),
    }


def key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


REPORTS = ("gemv_report", "attention_report", "quant_report", "piece_report", "rope_report")


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
        "rope_batches": sorted(choice.rope_batches),
        "reports": {n: getattr(choice, n) for n in REPORTS},
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
        rope_batches=set(data["rope_batches"]),
        **data["reports"],
    )


def cached(folder: Path | None, fields: dict, start, stages: Sequence[tuple[str, Callable]], cls):
    """The choice stored under `fields`' key in `folder`, tuned by running each of `stages`
    (name, fn(choice) filling its part) on `start` that the stored file has not recorded as done;
    the file is rewritten after every stage, so a start stopped mid-tuning (a probe's deadline, a
    preemption) resumes where it was. `folder` None: every stage runs, nothing is stored."""
    if folder is None:
        for _, run in stages:
            run(start)
        return start
    path = folder / f"{key(fields)}.json"
    choice, done = _read(path, start, cls)
    todo = [(name, run) for name, run in stages if name not in done]
    if not todo:
        log.info("kernel tables from %s (tuned before on this GPU kind, model shape and code)", path)
        return choice
    if done:
        log.info("kernel tables in %s: resuming the tuning at %s", path, todo[0][0])
    for name, run in todo:
        run(choice)
        done.append(name)
        _write(folder, path, {"facts": fields, "done": done, "choice": dump(choice)})
    return choice


def _read(path: Path, start, cls) -> tuple[object, list[str]]:
    """The stored choice and the stages it holds, or (`start`, []) where there is none to read."""
    try:
        data = json.loads(path.read_text())
        return load_choice(data["choice"], cls), list(data["done"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable or another layout: tune again
        log.warning("kernel tables in %s unreadable (%s): tuning again", path, str(exc)[:200])
    return start, []


def _write(folder: Path, path: Path, data: dict) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # whole files only: another engine may read it now
        tmp.write_text(json.dumps(data, default=str))
        tmp.replace(path)
        log.info("kernel tables stored in %s (%s done)", path, data["done"][-1])
    except OSError as exc:  # a read-only folder: the next start tunes again
        log.warning("kernel tables not stored in %s (%s)", folder, exc)
