"""The documents point at files that exist: every `results/...` path in README.md and docs/, and
every file results/README.md indexes (and every results file is indexed there). Run logs are kept
compressed in results/logs.tar.xz (text logs shrink ~15x, and the GPU host's 64 MiB carry holds
the whole working tree): a name inside it counts as a file of results/."""

import re
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
LOGS = RESULTS / "logs.tar.xz"


def _archived_logs() -> set[str]:
    with tarfile.open(LOGS) as tar:
        return {m.name for m in tar.getmembers() if m.isfile()}


def test_results_paths_in_the_documents_exist():
    archived = _archived_logs()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"results/[\w./-]+\.(?:md|json|log)", doc.read_text()):
            inside = path.removeprefix("results/") in archived
            assert inside or (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_results_index_lists_every_file_and_only_existing_ones():
    index = (RESULTS / "README.md").read_text()
    named = set(re.findall(r"`((?:archive/)?\d{4}-\d{2}-\d{2}-[\w.-]+)`", index))
    on_disk = {str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file()}
    on_disk = (on_disk - {"README.md", LOGS.name}) | _archived_logs()
    assert named - on_disk == set(), f"indexed but missing: {sorted(named - on_disk)}"
    assert on_disk - named == set(), f"not indexed: {sorted(on_disk - named)}"


def test_archived_logs_are_logs_and_not_also_loose():
    archived = _archived_logs()
    assert archived and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}-[\w.-]+\.log", n) for n in archived)
    assert not {n for n in archived if (RESULTS / n).exists()}, "a log both loose and in logs.tar.xz"
