"""Triton adapter: engine responses (new ids + a few context ids) -> text deltas, stateless and
UTF-8 safe; stop strings are cut from the text. Passes the engine's counters through."""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from tritonllm.text import TokenizerFiles, text_delta  # noqa: E402
from tritonllm.triton_io import RequestReader, respond_each, tensor  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        self.tok = TokenizerFiles(Path(__file__).parent / "tokenizer")

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one)

    def _one(self, request):
        read = RequestReader(pb_utils, request)
        ids = read.ints("output_ids")
        final = read.scalar("is_final", bool, True)
        delta = text_delta(self.tok, ids, read.scalar("num_context_ids", int, 0), final, read.strings("stop_words"))
        outputs = [tensor(pb_utils, "text_output", [delta], object)]
        for name, dtype in (("finish_reason", object), ("num_input_tokens", np.int32), ("num_output_tokens", np.int32)):
            arr = read.array(name)  # passed through from the engine
            outputs.append(pb_utils.Tensor(name, arr.reshape(1, -1) if arr is not None else
                                           np.array([[b"" if dtype is object else 0]], dtype=dtype)))
        return pb_utils.InferenceResponse(outputs)
