"""``tuneloop eval`` without a bus: dry run, refusing a bad benchmark, an unreachable server."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from services.evaluator.settings import BENCHMARKS_DIR
from shared.cli import app
from shared.embedded import free_port


def test_dry_run_validates_and_sends_nothing():
    result = CliRunner().invoke(
        app, ["eval", "--dry-run", "--benchmark", str(BENCHMARKS_DIR / "finance.json")]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["items"] == 30 and info["categories"]["tax"] == 6
    assert set(info["scorers"]) >= {"numeric", "regex", "contains_all"}


def test_a_malformed_benchmark_exits_2(tmp_path: Path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x", "items": [{"id": "a"}]}')
    result = CliRunner().invoke(app, ["eval", "--dry-run", "--benchmark", str(bad)])
    assert result.exit_code == 2 and "cannot use benchmark" in result.output
    missing = CliRunner().invoke(app, ["eval", "--benchmark", str(tmp_path / "nope.json")])
    assert missing.exit_code == 2


def test_an_unreachable_endpoint_exits_3_with_a_report(tmp_path: Path):
    report = tmp_path / "out.json"
    result = CliRunner().invoke(
        app,
        ["eval", "--endpoint", f"http://127.0.0.1:{free_port()}", "--max-items", "5",
         "--retries", "0", "--output", str(report)],
    )  # fmt: skip
    assert result.exit_code == 3, result.output
    data = json.loads(report.read_text())
    assert "never answered" in data["failure"] and data["gate"] is None
    assert len(data["results"]) == 5
