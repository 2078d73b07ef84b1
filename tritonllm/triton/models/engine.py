"""Triton adapter for the decoupled engine: execute() validates and enqueues; the engine loop's
background thread generates with in-flight batching and streams responses through the sink."""

import json
import os
import sys
from pathlib import Path

if "TRITONLLM_ENGINE_CUDA_VISIBLE_DEVICES" in os.environ:  # the server core may be run without GPUs
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["TRITONLLM_ENGINE_CUDA_VISIBLE_DEVICES"]

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonllm.config import EngineConfig
from tritonllm.engine.core_process import EngineCoreClient
from tritonllm.engine.heap import freeze_heap
from tritonllm.engine.loop import EngineLoop
from tritonllm.engine.request import build_sequence
from tritonllm.engine.response_pump import ResponsePump
from tritonllm.runtimes import load_runtime
from tritonllm.tensors import LogProbs, ResponseInfo
from tritonllm.text import TokenizerFiles, text_delta
from tritonllm.triton.backend_io import (
    RequestReader,
    error_response,
    logprob_tensors,
    model_parameters,
    strings_tensor,
    tensor,
)
from tritonllm.triton.metrics import EngineMetrics
from tritonllm.triton.senders import GuardedSender

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonSink:
    """One request's responses (the last one carries the FINAL flag). The engine loop only puts
    them into the response pump; the pump's threads call `deliver`, so the loop never waits for
    Triton's core to take a response."""

    def __init__(self, request, pump: ResponsePump, outputs, logprob_outputs):
        self.sender = GuardedSender(request.get_response_sender())
        self.pump, self.outputs, self.logprob_outputs = pump, outputs, logprob_outputs
        self.failed = False  # a send raised: the client is gone, the engine ends the sequence

    def send(self, seq, ids, n_context, final):
        self.pump.put(seq, ids, n_context, final)

    def send_counted(self, seq, ids, n_context, final, n_output, logprobs_from):
        self.pump.put_counted(seq, ids, n_context, final, n_output, logprobs_from)

    def send_error(self, seq, error):
        if seq is None:  # rejected in execute(), before the engine saw it
            self.deliver_error(seq, error)
        else:
            self.pump.put_error(seq, error)

    def deliver(self, seq, ids, n_context, final, n_output, logprobs_from):
        tensors = self.outputs(seq, ids, n_context, final, n_output)
        if seq.params.logprobs:
            tensors += self.logprob_outputs(seq, logprobs_from, n_output)
        self.sender.send(pb_utils.InferenceResponse(tensors), final, FINAL if final else 0)

    def deliver_error(self, seq, error):
        self.sender.send(error_response(pb_utils, error), True, FINAL)

    def is_cancelled(self):
        return self.failed or self.sender.is_cancelled()


def _mark_failed(seq, exc):
    seq.sink.failed = True


def _counters(seq, final, n_output):
    return [
        tensor(pb_utils, "finish_reason", [seq.finish_reason or ""] if final else [""], object),
        tensor(pb_utils, "num_input_tokens", [len(seq.prompt_ids)], np.int32),
        tensor(pb_utils, "num_output_tokens", [n_output], np.int32),
        tensor(pb_utils, "num_reused_tokens", [seq.reused_tokens], np.int32),
    ]


def logprobs_of(seq, start: int, end: int) -> LogProbs:
    """The log-probabilities of output ids start..end-1 and their running sum."""
    top = [list(zip(ids, vals)) for ids, vals in seq.top_logprobs[start:end]] if seq.params.top_logprobs else []
    return LogProbs(seq.logprobs[start:end], top, sum(seq.logprobs[:end]))


def packed_logprobs(seq, start: int, end: int) -> list:
    return [tensor(pb_utils, "log_probs", logprobs_of(seq, start, end).pack(), np.float32)]


def logprob_outputs(seq, start: int, end: int) -> list:
    """The ensemble's log-probability outputs (an engine that answers with text)."""
    return logprob_tensors(pb_utils, logprobs_of(seq, start, end))


def id_outputs(seq, ids, n_context, final, n_output):
    """For the detokenizer stage: new ids after n_context ids already sent, the response's numbers
    in one tensor, and the stop words."""
    reason = (seq.finish_reason or "") if final else ""
    info = ResponseInfo(n_context, final, len(seq.prompt_ids), n_output, reason, seq.reused_tokens)
    return [
        tensor(pb_utils, "output_ids", ids, np.int32),
        tensor(pb_utils, "response_info", info.pack(), np.int32),
        strings_tensor(pb_utils, "stop_words", tuple(seq.params.stop_strings) or ("",)),
    ]


def instance_count(model_config: dict) -> int:
    """Engine instances Triton runs for this model (a GPU group: one per listed GPU per count)."""
    return sum(g.get("count", 1) * max(1, len(g.get("gpus", []))) for g in model_config.get("instance_group", []))


def instance_device(args) -> str:
    """The device of this model instance: an instance group of kind GPU places one engine on each
    listed GPU (`tritonllm-build --gpus 0,1`); a CPU-kind engine takes the first visible GPU."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args['model_instance_device_id'])}"
    return "cuda"


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        here = Path(__file__).parent
        self.cfg = EngineConfig.from_parameters(model_parameters(model_config))
        # the loop thread waits on the GPU and re-takes the GIL from the sender threads: with
        # Python's 5 ms default switch interval each re-take can cost up to a decode step or more
        sys.setswitchinterval(self.cfg.switch_interval_ms / 1000.0)
        tok = TokenizerFiles(here / "tokenizer")
        self.pump = ResponsePump(
            lambda seq, *a: seq.sink.deliver(seq, *a),
            lambda seq, exc: seq.sink.deliver_error(seq, exc),
            _mark_failed,
            workers=self.cfg.response_threads,
            ends_first=self.cfg.response_order == "ends-first",
        )
        self.outputs, self.logprob_outputs = id_outputs, packed_logprobs
        if self.cfg.emit_text:  # the ensemble has no detokenizer stage: text leaves the engine

            def text_outputs(seq, ids, n_context, final, n_output):
                delta = text_delta(tok, ids, n_context, final, seq.params.stop_strings)
                return [tensor(pb_utils, "text_output", [delta], object), *_counters(seq, final, n_output)]

            self.outputs, self.logprob_outputs = text_outputs, logprob_outputs
        device, engine_wide = instance_device(args), True
        if self.cfg.separate_process:  # the loop gets a GIL of its own; this process keeps the I/O
            # with I/O processes, the instances on one device (the server's, by its pid) share one engine
            share = f"{os.getppid()}/{args['model_name']}/{device}" if self.cfg.io_instances > 1 else None
            self.loop = EngineCoreClient(self.cfg, here / "engine", here / "tokenizer", device, share=share)
            engine_wide = self.loop.owner
        else:
            runtime = load_runtime(self.cfg, here / "engine", device)
            self.loop = EngineLoop(runtime, self.cfg, decode=tok.decode)
        # with several engines a full one holds new requests briefly, so Triton hands the next ones
        # to a free instance (it routes each request to an instance whose execute() is idle)
        engines = instance_count(model_config) // self.cfg.io_instances
        self.balance_s = self.cfg.instance_balance_ms / 1000.0 if engines > 1 else 0.0
        self.metrics = EngineMetrics(
            pb_utils, self.loop, args["model_name"], args["model_instance_name"], engine_wide=engine_wide
        )
        self.loop.on_finish = self.metrics.observe_finished
        freeze_heap()  # this stub serves one model instance until it exits
        self.loop.start()
        pb_utils.Logger.log_info(f"tritonllm engine ready: {json.dumps(self.loop.describe())}")

    def execute(self, requests):
        for request in requests:
            sink = TritonSink(request, self.pump, self.outputs, self.logprob_outputs)
            try:
                seq = build_sequence(RequestReader(request), self.cfg, self.loop.shape)
                seq.sink = sink
                if self.balance_s:
                    self.loop.wait_for_capacity(self.balance_s)
                self.loop.submit(seq)
            except Exception as exc:  # validation or a full queue: this request only, before any token
                sink.send_error(None, exc)
        return None

    def finalize(self):
        self.loop.stop()
        self.pump.close()
        self.metrics.close()
