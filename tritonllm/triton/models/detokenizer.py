"""Triton adapter: engine responses (new ids + a few context ids) -> text deltas, stateless and
UTF-8 safe; stop strings are cut from the text. The engine's counters (`response_info`) become
the ensemble's finish_reason / token count outputs."""

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonllm.tensors import LogProbs, ResponseInfo
from tritonllm.text import TokenizerFiles, text_delta
from tritonllm.triton.backend_io import RequestReader, logprob_tensors, respond_each, tensor


class TritonPythonModel:
    def initialize(self, args):
        self.tok = TokenizerFiles(Path(__file__).parent / "tokenizer")

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one)

    def _one(self, request):
        read = RequestReader(request)
        info = ResponseInfo.unpack(read.ints("response_info"))
        delta = text_delta(
            self.tok, read.ints("output_ids"), info.num_context_ids, info.is_final, read.strings("stop_words")
        )
        outputs = [
            tensor(pb_utils, "text_output", [delta], object),
            tensor(pb_utils, "finish_reason", [info.finish_reason], object),
            tensor(pb_utils, "num_input_tokens", [info.num_input_tokens], np.int32),
            tensor(pb_utils, "num_output_tokens", [info.num_output_tokens], np.int32),
            tensor(pb_utils, "num_reused_tokens", [info.num_reused_tokens], np.int32),
        ]
        if "log_probs" in read.inputs:  # where the request asked for them: unpacked into the ensemble's outputs
            outputs += logprob_tensors(pb_utils, LogProbs.unpack(read.array("log_probs").reshape(-1).tolist()))
        return pb_utils.InferenceResponse(outputs)
