"""The ingest service: HTTP upload, ``DatasetSubmitted`` consumer and the periodic harvester,
wired to a :class:`~shared.service.ServiceRuntime`.

    python -m services.ingest.app      (HTTP port from INGEST_HTTP_PORT)
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from python_multipart.multipart import Field as FormField
from python_multipart.multipart import File as FormFile
from python_multipart.multipart import FormParser, parse_options_header

from services.ingest.handlers import (
    IngestRequest,
    harvest,
    ingest_with_retry,
    on_dataset_submitted,
)
from services.ingest.pipeline.chunks import ChunkJob, Rules, process_chunk
from services.ingest.pipeline.formats import FORMATS, SourceFile
from services.ingest.settings import IngestSettings
from shared.aio import cancel_and_wait
from shared.bus import Delivery
from shared.events import DatasetSubmitted, TrainingSpec
from shared.procs import steady_heap, worker_pool
from shared.service import ServiceRuntime, run_service
from shared.storage import LocalBackend

log = logging.getLogger(__name__)
# It logs every temporary file at INFO.
logging.getLogger("python_multipart").setLevel(logging.WARNING)
SERVICE = "ingest"
MAX_FORM_FIELD_BYTES = 64 * 1024
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def make_executor(settings: IngestSettings) -> Executor | None:
    """Worker processes for the per-record work, started and warmed (imports done) now
    rather than on the first upload; None = in-process (one CPU, or tests)."""
    # Chunks come and go as buffers of megabytes, here and in the workers: keep the freed
    # memory for the next one rather than faulting it in again (shared/procs.py).
    steady_heap()
    workers = settings.workers or (os.cpu_count() or 1)
    if workers <= 1:
        return None
    # forkserver: never fork a process that has an event loop and broker threads.
    pool = worker_pool(workers, "forkserver", steady=True)
    warm = ChunkJob(items=[], format=None, domain=None, source="", trusted=False, rules=Rules())
    for future in [pool.submit(process_chunk, warm) for _ in range(workers)]:
        future.result()
    return pool


def parse_training(raw: str | None) -> TrainingSpec | None:
    """The optional ``training`` field (JSON of a TrainingSpec); raises ValueError with a
    message fit for the caller when it is not one."""
    if raw is None or not raw.strip():
        return None
    try:
        return TrainingSpec.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'training'}: {e['msg']}"
            for e in exc.errors()[:10]
        )
        raise ValueError(f"invalid training spec: {problems}"[:2000]) from None


def valid_name(name: str) -> bool:
    return 0 < len(name) <= 200 and name[0].isalnum() and set(name) <= _NAME_OK


class UploadTooLarge(Exception):
    pass


class BadUpload(Exception):
    pass


async def receive_upload(
    request: Request, tmp: Path, limit: int
) -> tuple[dict[str, str], list[tuple[Path, str]]]:
    """Stream a multipart body to files under ``tmp``, counting bytes as they arrive.

    Raises :class:`UploadTooLarge` the moment the body passes ``limit`` (and before reading
    anything when Content-Length already says so)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise UploadTooLarge()
        except ValueError as exc:
            raise BadUpload("invalid Content-Length") from exc
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise BadUpload("expected multipart/form-data with a boundary")
    fields: dict[str, str] = {}
    files: list[tuple[Path, str]] = []

    def on_field(field: FormField) -> None:
        name = (field.field_name or b"").decode("utf-8", "replace")
        value = field.value or b""
        if len(value) > MAX_FORM_FIELD_BYTES:
            raise BadUpload(f"form field {name!r} is too large")
        fields[name] = value.decode("utf-8", "replace")

    def on_file(file: FormFile) -> None:
        file.flush_to_disk()
        file.file_object.close()
        display = (file.file_name or b"upload").decode("utf-8", "replace")
        display = Path(display.replace("\\", "/")).name[:200] or "upload"
        files.append((Path(os.fsdecode(file.actual_file_name or b"")), display))

    parser = FormParser(
        "multipart/form-data",
        on_field,
        on_file,
        boundary=params[b"boundary"],
        config={
            "UPLOAD_DIR": str(tmp),
            "UPLOAD_DELETE_TMP": False,
            "MAX_MEMORY_FILE_SIZE": 1024 * 1024,
            "MAX_BODY_SIZE": limit,
        },
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise UploadTooLarge()
            parser.write(chunk)
        parser.finalize()
    except (UploadTooLarge, BadUpload):
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise BadUpload(f"malformed multipart body: {exc}") from exc
    return fields, files


def add_routes(
    runtime: ServiceRuntime, settings: IngestSettings, executor: Executor | None
) -> None:
    @runtime.http.post("/v1/datasets")
    async def upload(request: Request) -> JSONResponse:
        """Upload corpus files (multipart ``file`` parts; fields ``name``, ``format``,
        ``domain``, ``dry_run``, ``training`` = JSON of a TrainingSpec). 201 = new version,
        202 = the same content as a version, announced again for a new training spec,
        200 = unchanged or dry run, 422 = nothing usable or bad fields, 413 = too large
        (nothing is kept)."""
        tmp = Path(tempfile.mkdtemp(prefix="ingest-upload-", dir=settings.work_dir or None))
        try:
            try:
                fields, files = await receive_upload(request, tmp, settings.max_upload_bytes)
            except UploadTooLarge:
                return JSONResponse(
                    {"detail": f"upload larger than {settings.max_upload_bytes} bytes"},
                    status_code=413,
                )
            except BadUpload as exc:
                return JSONResponse({"detail": str(exc)}, status_code=400)
            name = fields.get("name") or settings.default_dataset_name
            fmt = fields.get("format") or "auto"
            if not valid_name(name):
                return JSONResponse({"detail": "invalid dataset name"}, status_code=422)
            if fmt not in ("auto", *FORMATS):
                return JSONResponse({"detail": f"unknown format {fmt[:40]!r}"}, status_code=422)
            if not files:
                return JSONResponse({"detail": "no file parts in the upload"}, status_code=422)
            try:
                training = parse_training(fields.get("training"))
            except ValueError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=422)
            domain = (fields.get("domain") or "").strip()[:200] or None
            sources = [SourceFile(p, display, fmt, domain=domain) for p, display in files]  # type: ignore[arg-type]
            try:
                config = settings.processing.with_overrides(None)
            except ValidationError as exc:
                return JSONResponse({"detail": str(exc)}, status_code=422)
            outcome = await ingest_with_retry(
                IngestRequest(
                    files=sources,
                    dataset_name=name,
                    dry_run=fields.get("dry_run", "").lower() in ("1", "true", "yes"),
                    config=config,
                    training=training,
                ),
                ports=runtime,
                settings=settings,
                executor=executor,
                root_span=False,
            )
            status = {"created": 201, "retrain": 202, "rejected": 422}.get(outcome.status, 200)
            body: dict[str, Any] = outcome.summary()
            if outcome.status == "dry_run":
                body["report"] = outcome.report
            return JSONResponse(body, status_code=status)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @runtime.http.post("/v1/harvest")
    async def harvest_now() -> dict[str, Any]:
        """Run the harvester once, now."""
        result = await harvest(ports=runtime, settings=settings, executor=executor)
        return {
            "status": result.status,
            "eligible": result.eligible,
            "scanned": result.scanned,
            "dataset_id": result.ingest.dataset_id if result.ingest else None,
        }


def allowed_roots(runtime: ServiceRuntime, settings: IngestSettings) -> list[Path]:
    roots = [Path(d) for d in settings.import_dirs]
    if isinstance(runtime.store.backend, LocalBackend):
        roots.append(runtime.store.backend.root)
    return roots


def wire(runtime: ServiceRuntime, settings: IngestSettings, executor: Executor | None) -> None:
    """Subscribers and routes (before ``runtime.start()``)."""

    async def submitted(event: DatasetSubmitted, delivery: Delivery) -> None:
        await on_dataset_submitted(
            event,
            ports=runtime,
            settings=settings,
            executor=executor,
            allowed_roots=allowed_roots(runtime, settings),
        )

    # heartbeat: the bus keeps the message alive while a large corpus is processed.
    runtime.bus.subscribe(DatasetSubmitted, submitted, heartbeat=True)
    add_routes(runtime, settings, executor)


async def harvest_forever(
    runtime: ServiceRuntime, settings: IngestSettings, executor: Executor | None
) -> None:
    while True:
        await asyncio.sleep(settings.harvest_interval_s)
        try:
            result = await harvest(ports=runtime, settings=settings, executor=executor)
            log.info(
                "harvest: %s (%d eligible of %d)", result.status, result.eligible, result.scanned
            )
        except Exception:  # keep harvesting; the next round starts from the same cursor
            log.exception("harvest failed")


async def serve() -> None:
    settings = IngestSettings()
    runtime = ServiceRuntime(SERVICE)
    executor = await asyncio.to_thread(make_executor, settings)
    wire(runtime, settings, executor)
    task = (
        asyncio.create_task(harvest_forever(runtime, settings, executor))
        if settings.harvest_enabled
        else None
    )
    try:
        await run_service(runtime, host=settings.http_host, port=settings.http_port)
    finally:
        await cancel_and_wait(task)
        if executor:
            executor.shutdown(cancel_futures=True)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
