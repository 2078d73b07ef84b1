"""Reading a Prometheus text page (Triton's /metrics) as samples, with prometheus_client's parser."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_NAME = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)")


def metric_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the page as (name, labels, value), in page order, named as the page names
    it: the parser renames a counter sample without `_total` (all of Triton's `nv_*` counters) to
    end in `_total`, which no caller looking for Triton's names would find."""
    on_page = {m.group(1) for line in text.splitlines() if not line.startswith("#") and (m := _NAME.match(line))}
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name
            if name not in on_page and name.endswith("_total") and name[: -len("_total")] in on_page:
                name = name[: -len("_total")]
            out.append((name, dict(s.labels), float(s.value)))
    return out
