"""Host cost of the engine loop per step with the device's work taken out: N streams of `--tokens`
tokens each through the in-process engine (scheduler, stop checks, response windows, the sinks'
queue puts). On a GPU this cost overlaps the device's step; where it is longer than the step it
sets the inter-token latency, and under Triton it competes for the engine process's GIL.

  --runtime instant   a runtime that launches and collects instantly (the loop alone)
  --runtime torch     the torch-cuda runtime's own host path too (step inputs, positions, sampling
                      plan, launch/collect), run on the CPU with the model's forward stubbed out
                      (fixed logits over a 1024-id vocabulary): what the loop thread does per step
                      on a GPU host, less the CUDA calls themselves

  --runtime gpu       the torch-cuda runtime on the GPU over the Llama-3.2-1B shape (random bf16
                      weights): the loop thread as served in-process, CUDA calls included
  --cprofile N        also the loop thread's N most expensive functions (own time per step) under
                      cProfile, whose overhead inflates Python-heavy parts: read shares, not ms
  --sink outbox       responses as the engine process sends them (one pickled message a loop pass
                      over a pipe another process drains, as Triton's I/O side does) instead of
                      in-process queues
  --churn R           closed-loop streams as the benchmark runs them: each stream's final response
                      submits its next request (R requests a stream, `--prompt` distinct random ids
                      each), so steps mix prompts with decodes as they do under load; without it
                      the whole batch is queued at once and only the first step prefills

  python -m bench.profile_loop --batch 1 8 64 --runtime torch [--steps-per-launch 4] [--heap frozen plain]
      [--cprofile 30] [--out results]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import multiprocessing
import pstats
import time

import numpy as np

from bench.provenance import run_facts, write_json
from tritonllm.config import EngineConfig
from tritonllm.engine.core_process import _Outbox
from tritonllm.engine.heap import frozen_heap
from tritonllm.engine.inprocess import QueueSink
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.request import DictReader, build_sequence
from tritonllm.model.shape import ModelShape
from tritonllm.runtimes.base import Runtime, RuntimeCapabilities

VOCAB = 1024


class InstantRuntime(Runtime):
    """launch/collect with no device: every row gets token 7 (never a stop id here)."""

    capabilities = RuntimeCapabilities(overlap=True)

    def __init__(self, slots: int):
        self.max_slots, self.max_context = slots, 512
        self.shape = ModelShape(
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=64,
            hidden_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            eos_token_ids=(2,),
            bos_token_id=None,
            pad_token_id=None,
        )

    def describe(self) -> dict:
        return {"runtime": "instant"}

    def step(self, inputs):
        raise NotImplementedError("launch/collect only")

    def launch(self, inputs, seqs, steps=1):
        return [7] * len(inputs)

    def collect(self, handle):
        return handle


def stubbed_torch_runtime(cfg: EngineConfig):
    """TorchCudaRuntime on the CPU over a one-layer random model whose forward passes return fixed
    logits: every host-side line of a step runs, no model arithmetic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tritonllm.model.modeling import CausalLM
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    tiny = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
            eos_token_id=2,
            bos_token_id=1,
        )
    )
    runtime = TorchCudaRuntime(None, cfg, model=CausalLM(tiny.eval()), device="cpu")
    logits = torch.zeros((cfg.max_slots, VOCAB))
    logits[:, 7] = 1.0
    runtime.forward.decode = lambda b, c: logits[:b]
    runtime.forward.prefill = lambda ids, slots, last: logits[: ids.shape[0]]
    return runtime


def gpu_runtime(cfg: EngineConfig):
    """TorchCudaRuntime on the GPU over a random Llama-3.2-1B-shaped model."""
    from bench.families import SMALL, random_model
    from tritonllm.model.modeling import CausalLM
    from tritonllm.runtimes.torch_cuda import TorchCudaRuntime

    return TorchCudaRuntime(None, cfg, model=CausalLM(random_model("llama", SMALL)))


class ProfiledLoop(EngineLoop):
    """The engine loop with its thread under `profile` (None: not profiled)."""

    profile: cProfile.Profile | None = None

    def _run(self) -> None:
        if self.profile is None:
            return super()._run()
        self.profile.enable()
        try:
            return super()._run()
        finally:
            self.profile.disable()


def own_time(profile: cProfile.Profile, steps: int, n: int) -> list[dict]:
    """The `n` functions with the most own time (excluding callees), in ms per engine step."""
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [
        {
            "function": f"{path.rsplit('/', 2)[-1]}:{line}({name})",
            "calls_per_step": round(calls / steps, 1),
            "own_ms_per_step": round(1e3 * own / steps, 4),
            "cumulative_ms_per_step": round(1e3 * cum / steps, 4),
        }
        for (path, line, name), (_, calls, own, cum, _) in rows
    ]


class QueueSinks:
    """In-process sinks: a queue per request, as InProcessEngine's."""

    def __init__(self):
        self.sinks: list[QueueSink] = []
        self.after_step = None

    def new(self) -> QueueSink:
        self.sinks.append(QueueSink())
        return self.sinks[-1]

    def wait(self, loop: EngineLoop, n: int) -> None:
        for s in self.sinks:
            s.wait(120)
        wait_finished(loop, n)

    def close(self) -> None:
        pass


def wait_finished(loop: EngineLoop, n: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(loop.stats.requests_finished.values()) < n and time.monotonic() < deadline:
        time.sleep(0.005)


def _drain(conn) -> None:
    while conn.recv()[0] != "bye":
        pass


class OutboxSinks:
    """The engine process's sink (`_Outbox`): each loop pass's responses pickled into one message
    on a pipe that another process reads, as the I/O side under Triton does."""

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.reader = ctx.Process(target=_drain, args=(theirs,), daemon=True)
        self.reader.start()
        self.outbox = _Outbox(self.conn)
        self.after_step = self.outbox.flush

    def new(self) -> _Outbox:
        return self.outbox

    def wait(self, loop: EngineLoop, n: int) -> None:
        wait_finished(loop, n)

    def close(self) -> None:
        self.conn.send(("bye",))
        self.reader.join(10)


class Resubmit:
    """One closed-loop stream: forwards responses to the sinks' sink and, on a final one, submits
    the stream's next request (from the loop's thread, as a client's next request arrives)."""

    def __init__(self, inner, make, loop: EngineLoop, left: int):
        self.inner, self.make, self.loop, self.left = inner, make, loop, left

    def send(self, seq, ids, n_context, final):
        self.inner.send(seq, ids, n_context, final)
        if final and self.left > 0:
            self.left -= 1
            self.loop.submit(self.make(self))

    def send_error(self, seq, error):
        self.inner.send_error(seq, error)

    def is_cancelled(self):
        return False


def make_runtime(kind: str, cfg: EngineConfig):
    if kind == "instant":
        return InstantRuntime(cfg.max_slots)
    return stubbed_torch_runtime(cfg) if kind == "torch" else gpu_runtime(cfg)


def host_ms_per_step(
    runtime_kind: str,
    batch: int,
    tokens: int,
    steps_per_launch: int,
    freeze: bool = True,
    cprofile: int = 0,
    sink: str = "queue",
    responses_per_s: float = EngineConfig.max_responses_per_s,
    churn: int = 0,
    prompt: int = 16,
) -> dict:
    """One warm-up wave, then one measured wave of `batch` requests, each wave queued before its
    loop starts so every step holds the whole batch (submitted to a running loop, a fast runtime
    steps before the last requests arrive and the batch is never full). `freeze`: the objects alive
    before the loop starts are frozen out of the garbage collector's passes, as a served engine's are."""
    fields = dict(runtime="torch-cuda", dtype="bfloat16") if runtime_kind == "gpu" else {}
    cfg = EngineConfig(
        max_slots=batch,
        max_context=max(512, prompt + tokens),
        max_tokens_limit=tokens,
        default_max_tokens=tokens,
        steps_per_launch=steps_per_launch,
        max_responses_per_s=responses_per_s,
        **fields,
    )
    runtime = make_runtime(runtime_kind, cfg)
    with frozen_heap() if freeze else contextlib.nullcontext():
        return _measure(runtime, cfg, batch, tokens, cprofile, sink, churn, prompt)


def _measure(
    runtime,
    cfg: EngineConfig,
    batch: int,
    tokens: int,
    cprofile: int = 0,
    sink: str = "queue",
    churn: int = 0,
    prompt: int = 16,
) -> dict:
    rng = np.random.default_rng(0)

    def request(sink_of_stream):
        ids = [1] * prompt if not churn else rng.integers(3, VOCAB, prompt).tolist()  # churn: no prefix hits
        fields = {"input_ids": ids, "max_tokens": tokens, "ignore_eos": True, "temperature": 0.0, "stream": True}
        seq = build_sequence(DictReader(fields), cfg, runtime.shape)
        seq.sink = sink_of_stream
        return seq

    for warm in (True, False):
        sinks = OutboxSinks() if sink == "outbox" else QueueSinks()
        loop = ProfiledLoop(runtime, cfg, after_step=sinks.after_step)
        loop.profile = cProfile.Profile() if cprofile and not warm else None
        for _ in range(batch):
            stream = Resubmit(sinks.new(), request, loop, churn - 1) if churn else sinks.new()
            loop.submit(request(stream))
        t0, c0 = time.perf_counter(), time.process_time()
        loop.start()
        sinks.wait(loop, batch * max(churn, 1))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        loop.stop()
        sinks.close()
    st = loop.stats
    steps = max(st.steps, 1)
    return {
        "batch": batch,
        "churn": churn,
        "prompt": prompt,
        "steps": st.steps,
        "prefill_steps": st.prefill_steps,
        "wall_ms_per_step": round(1e3 * elapsed / steps, 3),
        "cpu_ms_per_step": round(1e3 * cpu / steps, 3),  # this process's CPU time: less noisy on a shared machine
        "launch_ms_per_step": round(1e3 * st.launch_s / steps, 3),
        "complete_ms_per_step": round(1e3 * st.complete_s / steps, 3),
        "gpu_idle_ms_per_step": round(1e3 * st.gpu_idle_s / steps, 3),
    } | ({"loop_functions": own_time(loop.profile, steps, cprofile)} if loop.profile else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--runtime", choices=["instant", "torch", "gpu"], default="instant")
    p.add_argument("--cprofile", type=int, default=0, help="N: the loop thread's N costliest functions")
    p.add_argument("--sink", choices=["queue", "outbox"], default="queue", help="in-process or engine-process sinks")
    p.add_argument(
        "--max-responses-per-s",
        type=float,
        default=EngineConfig.max_responses_per_s,
        help="the engine's response budget (0: every token its own response, as the GPU benches stream)",
    )
    p.add_argument("--churn", type=int, default=0, help="R: closed-loop streams of R requests each (0: one wave)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens a request")
    p.add_argument("--steps-per-launch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="runs per batch and heap; the median-CPU run is reported")
    p.add_argument(
        "--heap",
        nargs="+",
        choices=["frozen", "plain"],
        default=["frozen"],
        help="frozen: startup objects frozen out of the garbage collector (as served); plain: not; both "
        "are run in turns when listed together",
    )
    p.add_argument("--out", help="write profile-loop-<runtime>[-steps<n>].json here")
    a = p.parse_args()
    rows = []
    for b in a.batch:
        runs: dict[str, list[dict]] = {h: [] for h in a.heap}
        for _ in range(a.repeat):  # in turns, so a drift of this machine hits every setting alike
            for h in a.heap:
                runs[h].append(
                    host_ms_per_step(
                        a.runtime,
                        b,
                        a.tokens,
                        a.steps_per_launch,
                        h == "frozen",
                        a.cprofile,
                        a.sink,
                        a.max_responses_per_s,
                        a.churn,
                        a.prompt,
                    )
                )
        for h, rs in runs.items():
            r = sorted(rs, key=lambda r: r["cpu_ms_per_step"])[len(rs) // 2] | {"heap": h}
            rows.append(r)
            print(
                f"batch {b:4d}, heap {h:6s}: {r['cpu_ms_per_step']:.3f} ms CPU per step, {r['wall_ms_per_step']:.3f} "
                f"wall (launch {r['launch_ms_per_step']:.3f}, complete {r['complete_ms_per_step']:.3f})"
            )
            for f in r.get("loop_functions", []):
                own, cum = f["own_ms_per_step"], f["cumulative_ms_per_step"]
                print(f"  {own:8.4f} own / {cum:8.4f} cumulative ms per step  {f['function']}")
    if a.out:
        steps = "" if a.steps_per_launch == 1 else f"-steps{a.steps_per_launch}"
        sink = "" if a.sink == "queue" else f"-{a.sink}"
        churn = f"-churn{a.churn}" if a.churn else ""
        write_json(a.out, f"profile-loop-{a.runtime}{steps}{sink}{churn}", run_facts(rows=rows, repeat=a.repeat))


if __name__ == "__main__":
    main()
