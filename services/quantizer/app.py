"""The quantizer service: wires the handler to the bus, the database and the store.

python -m services.quantizer.app        # HTTP port from QUANTIZER_HTTP_PORT
"""

from __future__ import annotations

import asyncio

from services.quantizer.handlers import Job, on_training_done
from services.quantizer.ledger import SqlLedger
from services.quantizer.quantization.pipeline import run_job
from services.quantizer.settings import QuantizerSettings
from shared.bus import Delivery
from shared.events import TrainingDone
from shared.service import ServiceRuntime, run_service

SERVICE = "quantizer"


def build(
    runtime: ServiceRuntime | None = None,
    settings: QuantizerSettings | None = None,
    *,
    job: Job = run_job,
) -> ServiceRuntime:
    runtime = runtime or ServiceRuntime(SERVICE)
    settings = settings or QuantizerSettings()
    ledger = SqlLedger(runtime.db, runtime.ns, on_commit=runtime.relay.notify)
    work_root = settings.work_dir or runtime.common.home / "quantizer-work"
    max_deliver = runtime.bus.settings.max_deliver

    async def handle(event: TrainingDone, delivery: Delivery) -> None:
        await on_training_done(
            event,
            store=runtime.store,
            ledger=ledger,
            settings=settings,
            work_root=work_root,
            job=job,
            final_attempt=delivery.attempt >= max_deliver,
        )

    # Quantizing takes minutes: heartbeat (every ack_wait/3) so the message stays ours.
    runtime.bus.subscribe(TrainingDone, handle, heartbeat=True, ack_wait_s=settings.ack_wait_s)
    return runtime


def main() -> None:
    settings = QuantizerSettings()
    asyncio.run(run_service(build(settings=settings), port=settings.http_port))


if __name__ == "__main__":
    main()
