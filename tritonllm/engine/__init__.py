"""The engine, Triton-free: requests become `Sequence`s (`request`), the `Scheduler` plans each
step (in-flight batching, prefill budget, prompt pieces), one background `EngineLoop` runs the
steps on a runtime and streams responses through each sequence's sink (`response_pump` off the
loop's thread), `sampling` is the host sampler, `inprocess` drives it all without Triton."""
