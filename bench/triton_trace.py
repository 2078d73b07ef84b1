"""Where a request's first token spends its time inside Triton, from Triton's own trace.

`tritonserver --trace-config level=TIMESTAMPS` records, for a sampled ensemble request, the
ensemble's gRPC read and each gRPC send, and for each stage request the ensemble made (tokenizer,
engine, one detokenizer request per engine response) its REQUEST_START / QUEUE_START /
COMPUTE_START / COMPUTE_END. The timestamps are CLOCK_MONOTONIC nanoseconds, the clock of Python's
`time.monotonic_ns()`, so a bench run's window selects its own requests. With `log-frequency=1`
Triton writes each sampled request (with its stage requests) to its own file, `<file>.<n>`, as soon
as it ends, so a row's traces can be read right after the row.

The first token's way, per sampled request (ms):
  to_tokenizer  gRPC read done -> the tokenizer's execute() starts (ensemble + tokenizer queue)
  tokenizer     the tokenizer's execute()
  to_engine     tokenizer done -> the engine's execute() starts (ensemble + engine queue)
  engine        the engine's execute() starts -> its first response reaches Triton (validation,
                the engine process, prefill, the first step, the response's way back through the
                engine's stub); compare with the engine's own TTFT (from its arrival in the stub
                to the token) to split the engine from the stub's way out
  detokenizer   -> its detokenizer request's response reaches the ensemble (0 with emit_text)
  to_grpc       -> the ensemble starts sending it on the client's gRPC stream
  grpc_send     that send
"""

from __future__ import annotations

import glob
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

HOPS = ("to_tokenizer", "tokenizer", "to_engine", "engine", "detokenizer", "to_grpc", "grpc_send")


def trace_args(path: Path, rate: int) -> list[str]:
    """tritonserver flags tracing every `rate`-th request into `<path>.<n>`, one file a request."""
    if rate < 1:
        raise ValueError(f"trace rate {rate}: use 1 or more (every n-th request is traced)")
    return [
        "--trace-config", f"triton,file={path}",
        "--trace-config", "triton,log-frequency=1",
        "--trace-config", f"rate={rate}",
        "--trace-config", "level=TIMESTAMPS",
        "--trace-config", "count=-1",
    ]  # fmt: skip


@dataclass
class Trace:
    id: int
    model: str = ""
    parent: int | None = None
    request_id: str = ""
    stamps: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))

    def first(self, name: str) -> int | None:
        got = self.stamps.get(name)
        return min(got) if got else None


def load(path: Path) -> dict[int, Trace]:
    """Every trace in `<path>*`, merged by id (Triton writes a trace's name and each timestamp as
    separate entries)."""
    traces: dict[int, Trace] = {}
    for f in sorted(glob.glob(f"{path}*")):
        try:
            entries = json.loads(Path(f).read_text())
        except json.JSONDecodeError:  # a file Triton is still writing: the next read gets it
            continue
        for e in entries:
            t = traces.setdefault(e["id"], Trace(e["id"]))
            t.model = e.get("model_name", t.model)
            t.parent = e.get("parent_id", t.parent)
            t.request_id = e.get("request_id", t.request_id)
            for s in e.get("timestamps", ()):
                t.stamps[s["name"]].append(s["ns"])
    return traces


def first_token_hops(traces: dict[int, Trace], ensemble: str, start_ns: int = 0, end_ns: int = 2**63) -> list[dict]:
    """The hops (ms) of each sampled request to `ensemble` read in [start_ns, end_ns] that got a
    response; requests whose stages were not all recorded are left out."""
    children: dict[int, list[Trace]] = defaultdict(list)
    for t in traces.values():
        if t.parent is not None:
            children[t.parent].append(t)
    out = []
    for t in traces.values():
        read, sent = t.first("GRPC_WAITREAD_END"), t.first("GRPC_SEND_START")
        if t.model != ensemble or t.parent is not None or read is None or sent is None:
            continue
        if not start_ns <= read <= end_ns:
            continue
        stages = {c.model.removeprefix(f"{ensemble}_"): c for c in children[t.id]}
        detoks = [c for c in children[t.id] if c.model == f"{ensemble}_detokenizer"]
        hops = _hops(t, stages, detoks)
        if hops is not None:
            out.append(hops)
    return out


def _hops(ens: Trace, stages: dict[str, Trace], detoks: list[Trace]) -> dict | None:
    tok, eng = stages.get("tokenizer"), stages.get("engine")
    if tok is None or eng is None or tok.first("COMPUTE_END") is None or eng.first("COMPUTE_START") is None:
        return None
    first_detok = min(detoks, key=lambda d: d.first("REQUEST_START")) if detoks else None
    answered = ens.first("INFER_RESPONSE_COMPLETE")  # the ensemble has its first response
    # with emit_text the engine's response is the ensemble's own
    reached = first_detok.first("REQUEST_START") if first_detok else answered
    if reached is None or answered is None:
        return None
    send0 = ens.first("GRPC_SEND_START")
    send_end = min((e for e in ens.stamps.get("GRPC_SEND_END", ()) if e >= send0), default=send0)
    ns = {
        "to_tokenizer": tok.first("COMPUTE_START") - ens.first("GRPC_WAITREAD_END"),
        "tokenizer": tok.first("COMPUTE_END") - tok.first("COMPUTE_START"),
        "to_engine": eng.first("COMPUTE_START") - tok.first("COMPUTE_END"),
        "engine": reached - eng.first("COMPUTE_START"),
        "detokenizer": answered - reached,
        "to_grpc": send0 - answered,
        "grpc_send": send_end - send0,
    }
    return {k: v / 1e6 for k, v in ns.items()} | {"total": (send_end - ens.first("GRPC_WAITREAD_END")) / 1e6}


def summary(hops: list[dict]) -> dict:
    """Mean and p90 of each hop over the sampled requests."""
    if not hops:
        return {"requests": 0}
    out: dict = {"requests": len(hops)}
    for k in (*HOPS, "total"):
        vals = sorted(h[k] for h in hops)
        out[k] = {"mean": statistics.fmean(vals), "p90": vals[min(len(vals) - 1, int(0.9 * len(vals)))]}
    return out


def describe(s: dict) -> str:
    """One line for a bench row's note: mean ms of each hop of the first token inside Triton."""
    if not s.get("requests"):
        return "Triton trace: no sampled request in the row"
    parts = ", ".join(f"{k} {s[k]['mean']:.1f}" for k in HOPS)
    total = s["total"]["mean"]
    return f"first token in Triton (trace of {s['requests']} requests, mean ms): {parts}; total {total:.1f}"
