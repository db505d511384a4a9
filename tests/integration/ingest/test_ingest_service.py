"""The ingest service for real: HTTP upload, DatasetSubmitted over NATS, the harvester;
SQLite with the local store and PostgreSQL with the GCS emulator."""

from __future__ import annotations

import asyncio
import gzip
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import orjson
import pytest

from services.ingest.handlers import harvest
from shared.events import ArtifactRef, DatasetReady, DatasetRejected, DatasetSubmitted
from shared.interactions import Interaction
from shared.storage import LocalBackend
from tests.unit.ingest.corpus import alpaca, records, sentence

pytestmark = pytest.mark.integration


def corpus_files() -> list[tuple[str, bytes, str]]:
    lines = [orjson.dumps(r) for r in records(40, seed=1, category="credit")]
    lines.insert(7, b'{"instruction": "broken')  # line 8
    lines.append(orjson.dumps(records(1, seed=1)[0]))  # an exact duplicate, line 42
    a = b"\n".join(lines) + b"\n"
    b = gzip.compress(orjson.dumps(records(20, seed=2, fmt="sharegpt", category="fx")))
    return [("file", a, "credit.jsonl"), ("file", b, "fx.json.gz")]


def multipart(files: list[tuple[str, bytes, str]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (name, data, "application/octet-stream")) for field, data, name in files]


def stored_files(store_url: str, svc) -> list[str]:
    backend = svc.runtime.store.backend
    if isinstance(backend, LocalBackend):
        return [str(p) for p in backend.root.rglob("*") if p.is_file()]
    return [b.name for b in backend.client.list_blobs(backend.bucket_name)]


async def test_upload_makes_one_version_and_one_dataset_ready(ingest_service, span_file):
    async with ingest_service() as svc:
        resp = await svc.client.post(
            "/v1/datasets", files=multipart(corpus_files()), data={"name": "finrisk"}
        )
        assert resp.status_code == 201, resp.text
        body = resp.json()
        assert body["status"] == "created"
        assert body["records"] == {
            "read": 62,
            "kept": 60,
            "new": 60,
            "from_previous_version": 0,
            "rejected": 2,
        }
        [msg] = await svc.wait_for(DatasetReady)
        [raw] = await svc.messages(DatasetReady)
        jsonschema.validate(orjson.loads(raw.data), DatasetReady.model_json_schema())
        assert (msg.dataset_id, msg.run_id) == (body["dataset_id"], body["run_id"])
        assert msg.origin == "upload" and msg.previous_dataset_id is None
        assert msg.counts.train + msg.counts.validation == 60
        assert msg.counts_by_category == {"credit": 40, "fx": 20}
        assert msg.counts_by_source == {"credit": 40, "fx": 20}

        # Every artifact exists with the sha256 the event names (get_bytes verifies it).
        train = (await svc.runtime.store.get_bytes(msg.train)).splitlines()
        val = (await svc.runtime.store.get_bytes(msg.validation)).splitlines()
        assert len(train) == msg.counts.train and len(val) == msg.counts.validation
        ids = {orjson.loads(line)["id"] for line in train}
        for phase in "ABC":
            manifest = orjson.loads(await svc.runtime.store.get_bytes(msg.curriculum[phase]))
            assert manifest["phase"] == phase and set(manifest["record_ids"]) <= ids
        report = orjson.loads(await svc.runtime.store.get_bytes(msg.report))
        broken = [e for e in report["rejected_examples"] if e["code"] == "parse"]
        assert broken[0]["file"] == "credit.jsonl" and broken[0]["line"] == 8
        assert report["dedupe"]["exact"] == 1
        rejected_ref = ArtifactRef(**report["artifacts"]["rejected"])
        assert len((await svc.runtime.store.get_bytes(rejected_ref)).splitlines()) == 2

        # The run's trace: the event carries the trace of the upload's ingest span.
        traceparent = raw.headers["traceparent"]
        spans = [orjson.loads(line) for line in span_file.read_bytes().splitlines()]
        ingest_spans = [
            s
            for s in spans
            if s["name"] == "ingest.dataset"
            and s["attributes"].get("tuneloop.run_id") == msg.run_id
        ]
        assert ingest_spans and ingest_spans[0]["trace_id"] in traceparent

        # The same content again: the same version, no second event.
        again = await svc.client.post(
            "/v1/datasets", files=multipart(corpus_files()), data={"name": "finrisk"}
        )
        assert again.status_code == 200 and again.json()["status"] == "unchanged"
        assert again.json()["dataset_id"] == msg.dataset_id
        await svc.runtime.relay.drain()
        assert len(await svc.events(DatasetReady)) == 1
        assert await svc.scalar("select count(*) from ingest_dataset_versions") == 1
        assert not any(svc.work_dir.iterdir())  # temporary files are gone


async def test_dry_run_reports_and_keeps_nothing(ingest_service, store_url):
    async with ingest_service() as svc:
        resp = await svc.client.post(
            "/v1/datasets", files=multipart(corpus_files()), data={"dry_run": "true"}
        )
        assert resp.status_code == 200 and resp.json()["status"] == "dry_run"
        assert resp.json()["report"]["records"]["kept"] == 60
        assert stored_files(store_url, svc) == []
        assert await svc.scalar("select count(*) from bus_outbox") == 0


async def _chunks(total: int) -> AsyncIterator[bytes]:
    boundary = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    yield boundary
    sent = 0
    while sent < total:
        yield b"x" * 4096
        sent += 4096


async def test_oversized_upload_is_refused_and_nothing_is_stored(ingest_service, store_url):
    async with ingest_service(max_upload_bytes=20_000) as svc:
        big = [("file", b"\n".join(orjson.dumps(r) for r in records(80, seed=3)), "big.jsonl")]
        resp = await svc.client.post("/v1/datasets", files=multipart(big))
        assert resp.status_code == 413
        # No Content-Length (chunked): refused while streaming, part of it never read.
        streamed = await svc.client.post(
            "/v1/datasets",
            content=_chunks(200_000),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert streamed.status_code == 413
        assert stored_files(store_url, svc) == []
        assert await svc.scalar("select count(*) from ingest_dataset_versions") == 0
        assert await svc.scalar("select count(*) from bus_outbox") == 0
        assert not any(svc.work_dir.iterdir())


async def test_malformed_and_hostile_uploads(ingest_service):
    async with ingest_service() as svc:
        post = svc.client.post
        assert (await post("/v1/datasets", json={"files": []})).status_code == 400
        assert (
            await post(
                "/v1/datasets", data={"name": "x"}, files=[("other", ("", b"", "text/plain"))]
            )
        ).status_code in (400, 422)
        garbage = await post(
            "/v1/datasets",
            content=b"--b\r\nnot headers\r\n\r\n\x00\xff",
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert garbage.status_code in (400, 422)
        files = multipart(corpus_files())
        for name in ("../etc", "", "a" * 300, "x/y", "-dash"):
            bad = await post("/v1/datasets", files=files, data={"name": name or " "})
            assert bad.status_code == 422, name
        assert (await post("/v1/datasets", files=files, data={"format": "csv"})).status_code == 422
        # A traversal file name is only a label: nothing lands outside the work dir.
        evil = [("file", files[0][1][1], "../../evil.jsonl")]
        ok = await post("/v1/datasets", files=multipart(evil), data={"name": "evil"})
        assert ok.status_code == 201
        assert not (svc.work_dir.parent / "evil.jsonl").exists()
        # Nothing usable at all: 422 and a DatasetRejected with the report.
        junk = [
            (
                "file",
                b"\n".join([b"{}", b"[]", b"nope", orjson.dumps(alpaca("hi", "yo"))]),
                "junk.jsonl",
            )
        ]
        rej = await post("/v1/datasets", files=multipart(junk), data={"name": "junk"})
        assert rej.status_code == 422 and rej.json()["status"] == "rejected"
        [event] = await svc.wait_for(DatasetRejected)
        assert event.dataset_name == "junk" and not event.retryable
        assert "input_too_short" in event.reason and event.report is not None
        report = orjson.loads(await svc.runtime.store.get_bytes(event.report))
        assert report["records"]["read"] == 4
        # Also on a line that has a version: nothing usable is a rejection, not "unchanged".
        again = await post("/v1/datasets", files=multipart(junk), data={"name": "evil"})
        assert again.status_code == 422
        assert len(await svc.wait_for(DatasetRejected, 2)) == 2


async def test_dataset_submitted_over_the_bus(ingest_service, tmp_path: Path):
    async with ingest_service() as svc:
        path = tmp_path / "corpus.jsonl"
        path.write_bytes(b"\n".join(orjson.dumps(r) for r in records(12, seed=4, fmt="sharegpt")))
        ref = await svc.runtime.store.put_file(path, kind="uploads")  # file:// or gs://
        submitted = DatasetSubmitted(
            run_id="run-submit",
            producer="test",
            dataset_name="sub",
            files=[ref.uri],
            domain="markets",
        )
        outside = DatasetSubmitted(
            run_id="run-outside", producer="test", dataset_name="sub", files=["file:///etc/passwd"]
        )
        await svc.bus.publish(submitted)
        await svc.bus.publish(outside)
        [ready] = await svc.wait_for(DatasetReady)
        [rejected] = await svc.wait_for(DatasetRejected)
        assert ready.causation_id == submitted.event_id
        assert ready.counts_by_category == {"markets": 12}
        assert rejected.causation_id == outside.event_id and "outside" in rejected.reason
        # Redelivery of the same command is harmless: same content, same version.
        await svc.bus.publish(submitted.model_copy(update={"event_id": uuid.uuid4()}))
        await asyncio.sleep(1.0)
        await svc.runtime.relay.drain()
        assert len(await svc.events(DatasetReady)) == 1


def interaction(
    i: int,
    *,
    quality: float | None,
    rating: int | None = None,
    status: int = 200,
    extra: str = "",
    at: datetime | None = None,
) -> Interaction:
    rng = random.Random(i)
    return Interaction(
        id=f"resp-{i:04d}",
        created_at=at or datetime.now(UTC) - timedelta(minutes=10) + timedelta(seconds=i),
        served_model_name="tuneloop",
        deployment_id="dep-1",
        request=orjson.dumps(
            {"messages": [{"role": "user", "content": sentence(rng, 80)}]}
        ).decode(),
        response_text=sentence(rng, 150) + extra,
        status_code=status,
        latency_ms=12.0,
        quality_score=quality,
        feedback_rating=rating,
    )


async def add(svc, *rows: Interaction) -> None:
    async with svc.runtime.db.session() as session:
        for row in rows:
            session.add(row)


async def test_harvest_threshold_cursor_and_merge(ingest_service):
    async with ingest_service(harvest_dataset_name="finrisk") as svc:
        up = await svc.client.post(
            "/v1/datasets", files=multipart(corpus_files()), data={"name": "finrisk"}
        )
        v1 = up.json()["dataset_id"]
        await add(
            svc,
            interaction(1, quality=0.95, extra=" Mail me at bob@example.com"),
            interaction(2, quality=0.91),
            interaction(3, quality=0.5),  # below DATA_COLLECTION_QUALITY
            interaction(4, quality=0.99, status=500),  # failed request
            interaction(5, quality=0.99, rating=-1),
        )  # the user disliked it
        first = await harvest(ports=svc.runtime, settings=svc.settings)
        assert (first.status, first.eligible) == ("not_enough", 2)  # MIN_EXAMPLES is 3
        await add(svc, interaction(6, quality=None, rating=1))  # positive feedback counts
        second = await harvest(ports=svc.runtime, settings=svc.settings)
        assert (second.status, second.eligible) == ("created", 3)
        ready = [e for e in await svc.wait_for(DatasetReady, 2) if e.origin == "harvest"]
        assert len(ready) == 1
        event = ready[0]
        assert event.previous_dataset_id == v1 and event.dataset_name == "finrisk"
        assert event.counts.train + event.counts.validation == 60 + 3  # merged with v1
        assert event.counts_by_category["production"] == 3
        rows = await svc.runtime.store.get_bytes(event.train) + await svc.runtime.store.get_bytes(
            event.validation
        )
        assert b"bob@example.com" not in rows and b"[EMAIL]" in rows
        # The cursor moved: nothing new to harvest.
        third = await harvest(ports=svc.runtime, settings=svc.settings)
        assert (third.status, third.scanned) == ("not_enough", 0)
        # Over HTTP too (what `tuneloop harvest` and operators use).
        resp = await svc.client.post("/v1/harvest")
        assert resp.json()["status"] == "not_enough"
        # Positive feedback that arrives after the cursor passed still counts (once).
        async with svc.runtime.db.session() as session:
            for rid in ("resp-0003", "resp-0002"):  # 3 was below quality; 2 is harvested
                row = await session.get(Interaction, rid)
                row.feedback_rating, row.feedback_at = 1, datetime.now(UTC)
                session.add(row)
        one = svc.settings.model_copy(update={"harvest_min_examples": 1})
        late = await harvest(ports=svc.runtime, settings=one)
        assert (late.status, late.eligible) == ("created", 2)
        assert late.ingest is not None
        assert late.ingest.report["records"]["new"] == 1  # 2 was a duplicate of v2
        assert late.ingest.report["dedupe"]["exact"] == 1
        again = await harvest(ports=svc.runtime, settings=one)
        assert (again.status, again.scanned) == ("not_enough", 0)


async def test_two_harvesters_at_once_make_one_version(ingest_service):
    async with ingest_service() as svc:
        await add(svc, *(interaction(i, quality=0.95) for i in range(10, 16)))
        results = await asyncio.gather(
            harvest(ports=svc.runtime, settings=svc.settings),
            harvest(ports=svc.runtime, settings=svc.settings),
        )
        statuses = sorted(r.status for r in results)
        assert statuses.count("created") == 1, statuses
        await svc.runtime.relay.drain()
        assert len(await svc.wait_for(DatasetReady)) == 1
        assert await svc.scalar("select count(*) from ingest_dataset_versions") == 1
        after = await harvest(ports=svc.runtime, settings=svc.settings)
        assert after.status == "not_enough" and after.scanned == 0


async def test_a_dead_worker_pool_does_not_fail_the_ingest(ingest_service, tmp_path: Path):
    import os
    import signal
    from concurrent.futures import ProcessPoolExecutor

    from services.ingest.handlers import IngestRequest, ingest
    from services.ingest.pipeline.formats import SourceFile

    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(r) for r in records(10, seed=9)))
    pool = ProcessPoolExecutor(1)
    pid = pool.submit(os.getpid).result()
    os.kill(pid, signal.SIGKILL)  # as the OOM killer would
    try:
        async with ingest_service() as svc:
            outcome = await ingest(
                IngestRequest(files=[SourceFile(path, "c.jsonl")], dataset_name="pool"),
                ports=svc.runtime,
                settings=svc.settings,
                executor=pool,
            )
            assert outcome.status == "created" and outcome.report["records"]["kept"] == 10
    finally:
        pool.shutdown()
