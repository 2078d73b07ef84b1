"""Diagnose BYTES inputs in python-backend stubs on a host: start the server with a one-model
repository whose model echoes a STRING input and logs its numpy / Python, then send one request
over gRPC and one over HTTP, with the stubs' default environment and with --stub-pythonpath first."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from bench.provenance import DEFAULT_OUT, run_facts, write_json
from tritonllm.build.pbtxt import Enum, render
from tritonllm.triton.server_process import TritonServer

log = logging.getLogger(__name__)
MODEL = """
import sys, numpy as np, triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        facts = (np.__version__, sys.version.split()[0], sys.path[:4])
        pb_utils.Logger.log_info("ECHO numpy=%s python=%s path=%s" % facts)
    def execute(self, requests):
        out = []
        for r in requests:
            t = pb_utils.get_input_tensor_by_name(r, "text").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("echo", t)]))
        return out
"""


def repo(root: Path) -> Path:
    (root / "echo" / "1").mkdir(parents=True)
    (root / "echo" / "1" / "model.py").write_text(MODEL)
    io = lambda n: {"name": n, "data_type": Enum("TYPE_STRING"), "dims": [1]}
    (root / "echo" / "config.pbtxt").write_text(
        render(
            {"name": "echo", "backend": "python", "max_batch_size": 8, "input": [io("text")], "output": [io("echo")]}
        )
    )
    return root


def probe(server: TritonServer, text: bytes) -> dict:
    import tritonclient.grpc as g

    out = {}
    try:
        c = g.InferenceServerClient(server.grpc_url)
        i = g.InferInput("text", [1, 1], "BYTES")
        i.set_data_from_numpy(np.array([[text]], dtype=object))
        out["grpc"] = repr(c.infer("echo", [i]).as_numpy("echo"))[:80]
    except Exception as e:
        out["grpc"] = f"ERROR {e}"[:300]
    body = json.dumps({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": [text.decode()]}]})
    try:
        req = urllib.request.Request(f"http://{server.http_url}/v2/models/echo/infer", data=body.encode())
        out["http"] = urllib.request.urlopen(req, timeout=30).read()[:120].decode()
    except Exception as e:
        out["http"] = f"ERROR {e}"[:300]
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stub-pythonpath", default="")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT))
    a = p.parse_args()
    report = run_facts(client_numpy=np.__version__)
    variants = {"default": {}}
    if a.stub_pythonpath:
        variants["stub_pythonpath"] = {"PYTHONPATH": a.stub_pythonpath}
    for name, env in variants.items():
        with tempfile.TemporaryDirectory() as d:
            server = TritonServer(repo(Path(d) / "repo"), log_dir=Path(d), env=env)
            try:
                server.start()
                report[name] = probe(server, b"hello " * 150)
            except Exception as e:
                report[name] = {"start": f"ERROR {e}"[:500]}
            finally:
                report[name + "_log"] = [
                    line for line in server.log_tail(400).splitlines() if "ECHO" in line or "what()" in line
                ][:4]
                server.stop()
    log.info("%s: %s", write_json(a.out, "stub-strings", report), json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
