"""The demo's remote mode (the path after `docker compose up`): a system that is not there
gets a clear error and a non-zero exit, not a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from shared.cli import app
from shared.demo import remote_state, service_urls


def test_demo_against_a_gateway_that_is_not_running_says_what_to_check(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--gateway",
            "http://127.0.0.1:9",
            "--ingest",
            "http://127.0.0.1:9",
            "--nats-url",
            "nats://127.0.0.1:9",
            "--home",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "could not drive the system at http://127.0.0.1:9" in result.output
    assert "docker compose" in result.output
    assert "Traceback" not in result.output


def test_remote_state_gives_the_urls_the_demo_drives(tmp_path: Path) -> None:
    state = remote_state(
        gateway_url="http://gw:8080/",
        ingest_url="http://ingest:8081",
        nats_url="nats://n:4222",
        home=tmp_path,
    )
    assert service_urls(state) == ("http://ingest:8081", "http://gw:8080")
    embedded = {"services": {"ingest": {"http_port": 1}, "gateway": {"http_port": 2}}}
    assert service_urls(embedded) == ("http://127.0.0.1:1", "http://127.0.0.1:2")
