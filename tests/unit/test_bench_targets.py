"""The benchmark's target verdicts are computed from one run's rows."""

from bench.targets import render, target_lines

FACTS = {
    "gpu": "G",
    "roofline_batch1_tokens_per_s": 1000.0,
    "weight_bytes": 2e9,
    "copy_bandwidth_TBps": 4.0,
    "decode_step_gpu_ms": {"batch1_ctx256": 1.0},
}


def row(system, conc, rate, note=""):
    return {"system": system, "concurrency": conc, "tokens_per_s": rate, "note": note}


ROWS = [
    row("HF generate (static cache)", 1, 300),
    row("HF generate (static cache)", 64, 10000),
    row("engine in-process", 1, 700, "loop ms/step launch 0.5 / wait 0.5 / complete 0.1"),
    row("engine in-process", 64, 40000),
    row("Triton ensemble gRPC stream", 1, 650),
    row("Triton ensemble gRPC stream", 64, 31000),
]


def test_verdicts_say_met_or_by_how_much_missed():
    lines = target_lines(FACTS, ROWS)
    assert "share of the roofline: 65.0% (target >= 60.0%): met" in lines[0]
    assert "concurrency 64, x HF generate (static cache): 3.10x (target >= 3.00x): met" in lines[1]
    assert "concurrency 1, share of the in-process engine: 92.9% (target >= 90.0%): met" in lines[2]
    assert "concurrency 64, share of the in-process engine: 77.5% (target >= 90.0%): missed by 12.5%" in lines[3]
    assert lines[-1].startswith("- engine in-process, concurrency 64") and lines[-1].endswith("met")


def test_a_variant_of_other_weights_is_compared_with_the_bench_engine_through_triton():
    fp8 = "Triton ensemble gRPC stream fp8 {'quantization': 'fp8', 'quantize_lm_head': True}"
    rows = [
        {**row("engine in-process", 1, 180), "tokens_per_joule": 0.3},
        {**row("Triton ensemble gRPC stream", 1, 170), "tokens_per_joule": 0.3},
        {**row(fp8, 1, 280), "tokens_per_joule": 0.6},
        {**row("Triton ensemble gRPC stream", 256, 10000), "tokens_per_joule": 20.0},
        {**row(fp8, 256, 20000), "tokens_per_joule": 28.0},
    ]
    lines = [line for line in target_lines(FACTS, rows) if line.startswith(f"- {fp8}")]
    assert lines == [
        f"- {fp8}, concurrency 1, x Triton ensemble gRPC stream: 1.65x (target >= 1.60x): met",
        f"- {fp8}, concurrency 1, tokens/J x Triton ensemble gRPC stream: 2.00x (target >= 1.50x): met",
        f"- {fp8}, concurrency 256, tokens/J x Triton ensemble gRPC stream: 1.40x (target >= 1.50x): missed by 0.10x",
    ]  # never against the bf16 in-process engine or the bf16 roofline


def test_cpu_target_is_against_hf_at_batch_1_and_the_file_says_where_time_goes():
    cpu_rows = [
        row("HF generate", 1, 10.0),
        row("engine in-process", 1, 20.0),
        row("Triton ensemble gRPC stream", 1, 19.0),
    ]
    assert (
        "concurrency 1, x HF generate: 1.90x (target >= 2.00x): missed by 0.10x"
        in target_lines({"gpu": None}, cpu_rows)[0]
    )
    md = render("bench-gpu", FACTS, ROWS)
    assert "weight-read floor 0.500 ms" in md and "launch 0.5 / wait 0.5" in md


def test_engine_note_reads_the_engines_counters_off_metrics_text():
    from bench.triton_runs import engine_counters, engine_note

    class Server:
        text = ""

        def metrics(self):
            return self.text

    def metrics(scale):
        m = 'model="m_engine"'
        return "\n".join(
            [
                f"tritonllm_time_to_first_token_seconds_sum{{{m}}} {0.5 * scale}",
                f"tritonllm_time_to_first_token_seconds_count{{{m}}} {10 * scale}",
                'tritonllm_time_to_first_token_seconds_count{model="other_engine"} 999',
                f"tritonllm_loop_steps_total{{{m}}} {100 * scale}",
                f"tritonllm_prefill_steps_total{{{m}}} {4 * scale}",
                f"tritonllm_prefilled_sequences_total{{{m}}} {10 * scale}",
                f"tritonllm_gpu_idle_seconds_total{{{m}}} {0.03 * scale}",
                f"tritonllm_prefill_tokens_total{{{m}}} {1000 * scale}",
                f"tritonllm_prefill_computed_tokens_total{{{m}}} {1250 * scale}",
                f"tritonllm_kernel_compiles_total{{{m}}} {scale}",
                *(
                    f'tritonllm_loop_seconds_total{{{m},phase="{p}"}} {t * scale}'
                    for p, t in (("launch", 0.05), ("wait", 0.1), ("complete", 0.02))
                ),
            ]
        )

    srv = Server()
    srv.text = metrics(1)
    before = engine_counters(srv, "m")
    srv.text = metrics(3)
    note = engine_note(before, engine_counters(srv, "m"), [0.06] * 20)
    assert note == (
        "; 2 kernel compiles during the row; TTFT mean client 60.0 ms, in engine 50.0 ms; "
        "loop ms/step launch 0.50 / wait 1.00 / "
        "complete 0.20; GPU idle between steps 0.30 ms/step; 2.5 prefills/step in 8 of 200 steps; "
        "prefill computed 1.25x its prompt tokens (padding)"
    )
