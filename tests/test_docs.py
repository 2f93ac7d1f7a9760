"""The design document is in the repository and linked from the README; measured timings live in
benchmarks/results, not in code comments."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "## Layers and data flow",
    "## One generation request",
    "## One training step",
    "## Backends and dispatch",
    "## How to add an op",
    "## How to add a model",
)
# A figure with a time or throughput unit, or a speed ratio: "32 ms", "1.4x faster", "0.8x eager", "9 GB/s".
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(ms|us|µs|ns)\b|\b\d+(\.\d+)?x\s(faster|slower|eager)\b|\d\s?[GMT]B/s\b|TFLOP/s")
SOURCES = ("*.py", "*.cpp", "*.h", "*.cu", "*.cuh", "*.inc")


def test_architecture_document_is_linked_and_complete():
    doc = ROOT / "docs" / "ARCHITECTURE.md"
    text = doc.read_text()
    missing = [s for s in SECTIONS if s not in text]
    assert not missing, f"docs/ARCHITECTURE.md lacks {missing}"
    assert "](docs/ARCHITECTURE.md)" in (ROOT / "README.md").read_text()
    assert (ROOT / "benchmarks" / "results" / "NOTES.md").is_file()


def test_no_measured_timings_in_code_comments():
    found = []
    for folder in ("plm_engine", "csrc"):
        for pattern in SOURCES:
            for path in (ROOT / folder).rglob(pattern):
                for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if TIMING.search(line):
                        found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "timings belong in benchmarks/results/NOTES.md:\n" + "\n".join(found)
