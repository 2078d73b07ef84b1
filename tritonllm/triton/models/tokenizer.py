"""Triton adapter: text -> token ids (chat template optional), stop/bad words -> id lists."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tritonllm.text import TokenizerFiles, encode_prompt, encode_words, flatten_id_lists
from tritonllm.triton.backend_io import RequestReader, model_parameters, respond_each, tensor


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(json.loads(args["model_config"]))
        self.max_context = int(params["max_context"])
        self.tok = TokenizerFiles(Path(__file__).parent / "tokenizer")

    def execute(self, requests):
        return respond_each(pb_utils, requests, self._one)

    def _one(self, request):
        read = RequestReader(request)
        text = read.scalar("text_input", str) or ""
        ids = encode_prompt(self.tok, text, read.scalar("apply_chat_template", bool, False), self.max_context)
        stop = flatten_id_lists(encode_words(self.tok, read.strings("stop_words"), "stop_words"))
        bad = flatten_id_lists(encode_words(self.tok, read.strings("bad_words"), "bad_words"))
        return pb_utils.InferenceResponse(
            [
                tensor(pb_utils, "input_ids", ids, np.int32),
                tensor(pb_utils, "stop_ids", stop or [-1], np.int32),
                tensor(pb_utils, "bad_ids", bad or [-1], np.int32),
            ]
        )
