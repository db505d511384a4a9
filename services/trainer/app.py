"""The trainer service: DatasetReady → adapter → TrainingDone, wired to the runtime.

python -m services.trainer.app        (HTTP port from TRAINER_HTTP_PORT)
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import Header, HTTPException
from fastapi import Path as PathParam

from services.trainer.handlers import on_dataset_ready
from services.trainer.jobs import SqlJobs, job_view
from services.trainer.settings import TrainerSettings
from shared.bus import Delivery
from shared.events import DatasetReady
from shared.service import ServiceRuntime, run_service
from shared.settings import CommonSettings

log = logging.getLogger(__name__)

AdapterId = Annotated[str, PathParam(pattern=r"^adp-[0-9a-f]{20}$")]


def build(
    settings: TrainerSettings | None = None, common: CommonSettings | None = None
) -> tuple[ServiceRuntime, TrainerSettings]:
    settings = settings or TrainerSettings()
    runtime = ServiceRuntime("trainer", common)
    jobs = SqlJobs(runtime)
    work_root: Path = settings.resolved_work_dir(runtime.common.home)

    async def handle(event: DatasetReady, delivery: Delivery) -> None:
        await on_dataset_ready(
            event, store=runtime.store, jobs=jobs, settings=settings, work_root=work_root
        )

    runtime.bus.subscribe(
        DatasetReady,
        handle,
        ack_wait_s=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        heartbeat=True,
    )
    admin_key = runtime.common.admin_key.get_secret_value()

    @runtime.http.get("/jobs")
    async def list_jobs() -> list[dict[str, Any]]:
        return [job_view(j) for j in await jobs.list()]

    @runtime.http.get("/jobs/{adapter_id}")
    async def get_job(adapter_id: AdapterId) -> dict[str, Any]:
        job = await jobs.get(adapter_id)
        if job is None:
            raise HTTPException(404, f"no training job {adapter_id}")
        return job_view(job)

    @runtime.http.post("/jobs/{adapter_id}/cancel", status_code=202)
    async def cancel_job(
        adapter_id: AdapterId,
        x_admin_key: Annotated[str | None, Header(max_length=500)] = None,
    ) -> dict[str, Any]:
        if x_admin_key != admin_key:
            raise HTTPException(401, "admin key required (X-Admin-Key)")
        if not await jobs.request_cancel(adapter_id):
            raise HTTPException(409, f"{adapter_id} is not running")
        return {"adapter_id": adapter_id, "cancel_requested": True}

    return runtime, settings


async def serve() -> None:
    runtime, settings = build()
    await run_service(runtime, port=settings.http_port)


def main() -> None:
    asyncio.run(serve())


if __name__ == "__main__":
    main()
