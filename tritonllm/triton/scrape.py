"""Reading a Prometheus text page (Triton's /metrics) as samples, with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the page as (name, labels, value), in page order; histogram samples keep
    their `_bucket` / `_sum` / `_count` names, counters their `_total`."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]
