"""Timing-reference model: the ensemble's tensor names, known delays. First token after
FIRST_TOKEN_S, then one every INTER_TOKEN_S, max_tokens tokens, streamed (decoupled)."""

import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FIRST_TOKEN_S = 0.050
INTER_TOKEN_S = 0.020


def _out(text, n, final):
    return pb_utils.InferenceResponse(
        [
            pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=object)),
            pb_utils.Tensor("num_output_tokens", np.array([[n]], dtype=np.int32)),
            pb_utils.Tensor("finish_reason", np.array([[b"length" if final else b""]], dtype=object)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args):
        self.threads = []

    def execute(self, requests):
        for r in requests:
            t = pb_utils.get_input_tensor_by_name(r, "max_tokens")
            n = int(t.as_numpy().reshape(-1)[0]) if t is not None else 16
            th = threading.Thread(
                target=self._stream, args=(r.get_response_sender(), n, time.perf_counter()), daemon=True
            )
            th.start()
        return None

    def _stream(self, sender, n, t0):
        for i in range(n):  # absolute schedule: delays do not accumulate
            due = t0 + FIRST_TOKEN_S + i * INTER_TOKEN_S
            time.sleep(max(0.0, due - time.perf_counter()))
            final = i == n - 1
            sender.send(
                _out(f"t{i} ", i + 1, final), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            )
