"""The documents point at files that exist: every `results/...` path in README.md and docs/, and
every file results/README.md indexes (and every results file is indexed there)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def test_results_paths_in_the_documents_exist():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"results/[\w./-]+\.(?:md|json|log)", doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_results_index_lists_every_file_and_only_existing_ones():
    index = (RESULTS / "README.md").read_text()
    named = set(re.findall(r"`((?:archive/)?\d{4}-\d{2}-\d{2}-[\w.-]+)`", index))
    on_disk = {str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file() and p.name != "README.md"}
    assert named - on_disk == set(), f"indexed but missing: {sorted(named - on_disk)}"
    assert on_disk - named == set(), f"not indexed: {sorted(on_disk - named)}"
