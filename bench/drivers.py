"""The systems compared: HF generate, the engine in-process, the engine through Triton (gRPC)."""

from __future__ import annotations

import asyncio
import queue
import time

import torch

from tritonllm.client.llm_client import itl_from_chunks

from .host_cpu import HostCpu
from .measure import PowerSampler, RunResult


def run_hf(model, prompts: list[list[int]], out_len: int, static: bool, power: PowerSampler) -> RunResult:
    dev = next(model.parameters()).device
    ids = torch.tensor(prompts, device=dev)
    kw = dict(do_sample=False, max_new_tokens=out_len, min_new_tokens=out_len, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        model.generate(ids, **kw)  # warm-up
        sync()
        with power:
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            sync()
            wall = time.perf_counter() - t0
    n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    name = "HF generate" + (" (static cache)" if static else "")
    return RunResult(
        name, len(prompts), len(prompts), n, wall, mean_watts=power.mean_watts(), joules=power.joules(), gpu_mem_gib=mem
    )


class _StreamSink:
    """Responses of one benchmark stream's current request, tagged and put on the driver's queue."""

    def __init__(self, events: queue.SimpleQueue, stream: int):
        self.events, self.stream = events, stream

    def send(self, seq, ids, n_context, final):
        self.events.put((self.stream, len(ids) - n_context, final, time.perf_counter(), None))

    def send_error(self, seq, error):
        self.events.put((self.stream, 0, True, time.perf_counter(), error))

    def is_cancelled(self):
        return False


def run_inprocess(
    engine,
    prompts: list[list[int]],
    concurrency: int,
    out_len: int,
    power: PowerSampler,
    name="engine in-process",
    extra: dict | None = None,
    out_lens: list[int] | None = None,
) -> RunResult:
    """Closed loop per stream, as the Triton clients run: each of `concurrency` streams sends its
    next request when its previous one ends, so requests arrive spread out as they do through
    Triton (not in lock-step waves whose prefills always share one step). One driver thread.
    `out_lens`: each prompt's own output length (default: `out_len` for all)."""
    events: queue.SimpleQueue = queue.SimpleQueue()
    lengths = out_lens or [out_len] * len(prompts)
    shares = [list(zip(prompts, lengths))[i::concurrency] for i in range(concurrency)]
    nxt, started, last, ttft, itl, tokens = [0] * concurrency, [0.0] * concurrency, [None] * concurrency, [], [], 0

    def send_next(s: int) -> bool:
        if nxt[s] >= len(shares[s]):
            return False
        started[s], last[s] = time.perf_counter(), None
        prompt, length = shares[s][nxt[s]]
        engine.submit(
            prompt,
            sink=_StreamSink(events, s),
            max_tokens=length,
            temperature=0.0,
            ignore_eos=True,
            stream=True,
            **(extra or {}),
        )
        nxt[s] += 1
        return True

    with power:
        t0 = time.perf_counter()
        active = sum(send_next(s) for s in range(concurrency))
        while active:
            s, n, final, at, error = events.get(timeout=600)
            if error is not None:
                raise error
            if n:
                if last[s] is None:
                    ttft.append(at - started[s])
                else:
                    itl.extend([(at - last[s]) / n] * n)
                last[s], tokens = at, tokens + n
            if final and not send_next(s):
                active -= 1
        wall = time.perf_counter() - t0
    return RunResult(name, concurrency, len(prompts), tokens, wall, ttft, itl, power.mean_watts(), power.joules())


async def _triton_worker(client, prompts, out_len, ttft, itl, counts, extra):
    for text in prompts:
        t0 = time.perf_counter()
        times, cum = [], []
        async for chunk in client.stream(text, max_tokens=out_len, temperature=0.0, ignore_eos=True, **extra):
            if chunk.num_output_tokens and (not cum or chunk.num_output_tokens > cum[-1]):
                times.append(chunk.at)
                cum.append(chunk.num_output_tokens)
        ttft.append(times[0] - t0)
        itl.extend(itl_from_chunks(times, cum))
        counts.append(cum[-1])


def _client_process(url: str, model: str, shares: list[list[str]], out_len: int, ready, go, out, extra: dict):
    """One load-generating process: its streams (one client each) send their shares back to back."""
    from tritonllm.client import AsyncLLMClient

    async def main():
        clients = [AsyncLLMClient(url, model, timeout_s=600) for _ in shares]
        ttft, itl, counts = [], [], []
        ready.put(True)
        while not go.is_set():
            await asyncio.sleep(0.001)
        cpu0 = time.process_time()
        await asyncio.gather(
            *[_triton_worker(c, s, out_len, ttft, itl, counts, extra) for c, s in zip(clients, shares)]
        )
        cpu = time.process_time() - cpu0
        for c in clients:
            await c.close()
        return ttft, itl, counts, cpu

    try:
        out.put(asyncio.run(main()))
    except Exception as exc:  # the parent raises it at once instead of waiting for this process's result
        out.put(RuntimeError(f"client process failed: {exc!r}"))


def run_triton(
    url: str,
    model: str,
    texts: list[str],
    concurrency: int,
    out_len: int,
    power: PowerSampler,
    client_procs: int = 1,
    extra: dict | None = None,
) -> RunResult:
    """`concurrency` gRPC streams spread over `client_procs` processes (so the load generator is
    not the bottleneck), each stream sending its share of `texts` back to back. The note reports
    the busiest client process's CPU use: near 100% means the client, not the server, limited."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    shares = [texts[i::concurrency] for i in range(concurrency)]
    procs_n = max(1, min(client_procs, concurrency))
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_client_process, args=(url, model, shares[i::procs_n], out_len, ready, go, q, extra or {}))
        for i in range(procs_n)
    ]
    for p in procs:
        p.start()
    for _ in procs:  # every process imported and connected before the clock starts
        ready.get(timeout=300)
    with power, HostCpu() as cpu:
        start = time.time()
        go.set()
        outs = []
        for _ in procs:
            outs.append(q.get(timeout=900))
            if isinstance(outs[-1], Exception):
                for p in procs:
                    p.terminate()
                raise outs[-1]
        wall = time.time() - start
    for p in procs:
        p.join(30)
    ttft = [x for o in outs for x in o[0]]
    itl = [x for o in outs for x in o[1]]
    busiest = max(o[3] for o in outs) / wall
    return RunResult(
        "Triton ensemble gRPC stream",
        concurrency,
        len(texts),
        sum(sum(o[2]) for o in outs),
        wall,
        ttft,
        itl,
        power.mean_watts(),
        power.joules(),
        power.memory_used_bytes() and power.memory_used_bytes() / 2**30,
        note=f"{procs_n} client procs, busiest at {busiest:.0%} CPU; {cpu.note()}",
    )
