"""Triton glue: the python-backend adapters (`models/`, copied into each repository as model.py),
their request/response I/O (`backend_io`, `senders`), the engine's metrics on Triton's /metrics
(`metrics`), and the harness that starts a `tritonserver` process (`server_process`, `serve`)."""
