"""A training spec travels from the request (HTTP field, DatasetSubmitted, CLI option) to the
DatasetReady; the same content with another spec is the same version, announced again."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from shared.events import DatasetReady, DatasetSubmitted
from tests.integration.ingest.test_ingest_service import corpus_files, multipart, stored_files
from tests.unit.ingest.corpus import records

pytestmark = pytest.mark.integration

LORA = {"method": "lora", "overrides": {"learning_rate": 0.001, "lora_r": 8}}


async def test_upload_spec_reaches_dataset_ready_and_a_new_spec_is_a_retrain(ingest_service):
    async with ingest_service() as svc:

        async def upload(training: object | None):
            data = {"name": "finrisk"}
            if training is not None:
                data["training"] = json.dumps(training)
            return await svc.client.post("/v1/datasets", files=multipart(corpus_files()), data=data)

        first = await upload(LORA)
        assert first.status_code == 201, first.text
        assert first.json()["training"]["method"] == "lora"
        [ready] = await svc.wait_for(DatasetReady)
        assert ready.training is not None
        assert ready.training.method == "lora" and ready.training.overrides == LORA["overrides"]

        # Identical content and spec (keys in another order): idempotent.
        same = await upload({"overrides": {"lora_r": 8, "learning_rate": 0.001}, "method": "lora"})
        assert same.status_code == 200 and same.json()["status"] == "unchanged"
        assert same.json()["run_id"] == ready.run_id

        # The same content with another spec: one version, a second DatasetReady (a retrain).
        other = await upload({"method": "dora"})
        assert other.status_code == 202, other.text
        assert other.json()["status"] == "retrain"
        assert other.json()["dataset_id"] == ready.dataset_id
        _, retrain = await svc.wait_for(DatasetReady, 2)
        assert retrain.dataset_id == ready.dataset_id and retrain.run_id != ready.run_id
        assert retrain.training is not None and retrain.training.method == "dora"
        assert (retrain.train, retrain.validation) == (ready.train, ready.validation)
        assert retrain.curriculum == ready.curriculum and retrain.counts == ready.counts
        assert retrain.previous_dataset_id == ready.previous_dataset_id
        assert await svc.runtime.store.get_bytes(retrain.train)  # it exists, sha256 verified

        # Each spec is announced once: repeating either, or "no spec", twice, adds one event.
        assert (await upload({"method": "dora"})).json()["status"] == "unchanged"
        assert (await upload(LORA)).json()["status"] == "unchanged"
        assert (await upload(None)).status_code == 202
        assert (await upload({})).json()["status"] == "unchanged"  # {} means no spec too
        await svc.runtime.relay.drain()
        events = await svc.events(DatasetReady)
        assert [e.training.method if e.training else None for e in events] == [
            "lora",
            "dora",
            None,
        ]
        assert await svc.scalar("select count(*) from ingest_dataset_versions") == 1
        assert await svc.scalar("select count(*) from ingest_dataset_runs") == 3


@pytest.mark.parametrize(
    "bad",
    [
        "{oops",
        '{"method": "sgd"}',
        '{"profile": "a/../../b"}',
        '{"surprise": true}',
        json.dumps({"overrides": {f"k{i}": i for i in range(100)}}),
        "x" * 70_000,  # past the form field limit
    ],
)
async def test_an_invalid_spec_is_refused_and_nothing_is_stored(ingest_service, store_url, bad):
    async with ingest_service() as svc:
        resp = await svc.client.post(
            "/v1/datasets", files=multipart(corpus_files()), data={"training": bad}
        )
        assert resp.status_code in (400, 422), resp.text
        assert "training" in resp.json()["detail"]
        assert stored_files(store_url, svc) == []
        assert await svc.scalar("select count(*) from ingest_dataset_versions") == 0
        assert await svc.scalar("select count(*) from bus_outbox") == 0
        assert not any(svc.work_dir.iterdir())


async def test_dataset_submitted_passes_its_spec_on(ingest_service, tmp_path: Path):
    async with ingest_service() as svc:
        path = tmp_path / "corpus.jsonl"
        path.write_bytes(b"\n".join(orjson.dumps(r) for r in records(12, seed=5)))
        ref = await svc.runtime.store.put_file(path, kind="uploads")
        submitted = DatasetSubmitted.model_validate(
            {
                "run_id": "run-spec",
                "producer": "test",
                "dataset_name": "sub",
                "files": [ref.uri],
                "training": {"profile": "cpu-tiny", "base_model": "tiny"},
            }
        )
        await svc.bus.publish(submitted)
        [ready] = await svc.wait_for(DatasetReady)
        assert ready.causation_id == submitted.event_id
        assert ready.training == submitted.training


def test_cli_ingest_takes_a_training_spec(
    tmp_path: Path, bus_settings, sqlite_db, monkeypatch: pytest.MonkeyPatch
):
    """On SQLite only: the CLI path is the same on both databases."""
    from shared.cli import app

    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records(10, seed=6)))
    env = {
        "TUNELOOP_NATS_URL": bus_settings.nats_url,
        "TUNELOOP_SUBJECT_PREFIX": bus_settings.prefix,
        "DATABASE_URL": sqlite_db.url,
        "TUNELOOP_ARTIFACT_STORE_URL": (tmp_path / "store").as_uri(),
        "TUNELOOP_HOME": str(tmp_path / "home"),
        "INGEST_WORKERS": "1",
        "INGEST_WORK_DIR": str(tmp_path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    bad = runner.invoke(app, ["ingest", str(path), "--training", '{"method": "sgd"}'])
    assert bad.exit_code != 0 and "invalid training spec" in bad.output
    spec = json.dumps(LORA)
    ok = runner.invoke(app, ["ingest", str(path), "--name", "cli", "--training", spec])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout[ok.stdout.index("{") :])
    assert summary["status"] == "created" and summary["training"]["method"] == "lora"
    again = runner.invoke(app, ["ingest", str(path), "--name", "cli", "--training", spec])
    assert json.loads(again.stdout[again.stdout.index("{") :])["status"] == "unchanged"
    retrain = runner.invoke(app, ["ingest", str(path), "--name", "cli"])
    assert json.loads(retrain.stdout[retrain.stdout.index("{") :])["status"] == "retrain"
