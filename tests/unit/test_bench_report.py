"""docs/benchmarks.md's tables are the results files' figures, not figures copied by hand (hack/bench_report.py)."""

from __future__ import annotations

import json
from pathlib import Path

import bench_report
import results


def test_the_docs_tables_are_made_from_the_results_files() -> None:
    files = results.load()
    assert any(document["tool"] == "bench" for _, document in files), "docs/results has no bench run"
    assert any(document["tool"] == "throughput" for _, document in files), "docs/results has no throughput run"
    texts = [doc.read_text() for doc in bench_report.DOCS]
    for doc, text in zip(bench_report.DOCS, texts, strict=True):
        assert bench_report.render(text, files) == text, f"{doc.name}: run .venv/bin/python hack/bench_report.py"
    for path, _ in files:  # every file is named in the tables it feeds
        assert any(f"results/{path.name}" in text for text in texts), path.name


def test_a_table_shows_the_newest_run_of_each_scenario_and_names_it(tmp_path: Path) -> None:
    machine = {"cpus": 2, "etcd": "3.4.23"}
    for stamp, p99 in (("20260101T000000Z", 30.0), ("20260102T000000Z", 12.5)):
        line = {"scenario": "join", "nodes": 100, "p50_ms": 5.0, "p99_ms": p99, "floor_p99_ms": 10.0}
        document = {"tool": "bench", "command": "hack/bench.py", "machine": machine, "results": [line]}
        (tmp_path / f"{stamp}-bench.json").write_text(json.dumps(document))
    doc = "before\n<!-- results: control -->\nold table\n<!-- /results -->\nafter\n"
    made = bench_report.render(doc, results.load(tmp_path))
    assert made.startswith("before\n<!-- results: control -->\n| scenario |")
    assert made.endswith("<!-- /results -->\nafter\n")
    assert "p99_ms 12.5" in made and "p99_ms 30.0" not in made and "old table" not in made
    assert "(results/20260102T000000Z-bench.json)" in made
