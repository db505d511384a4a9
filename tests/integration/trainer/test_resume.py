"""Preemption: the trainer process is SIGKILLed mid-training; the redelivered DatasetReady is
picked up by a new process on a "new machine" (empty work directory), which restores the
last checkpoint from the artifact store and resumes: no step is trained twice, and exactly
one TrainingDone comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from services.trainer.training.worker import read_steps
from shared.bus import EventBus
from shared.db import Database
from shared.events import TrainingDone
from shared.storage import ArtifactStore
from tests.integration.streams import eventually
from tests.integration.trainer.dataset import json_task, publishable_dataset
from tests.integration.trainer.service import events_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[3]
STEPS = 9
EVERY = 3


def start_trainer(
    bus_settings, database_url: str, store_url: str, home: Path, work: Path, log: Path
):
    env = {
        **os.environ,
        "TUNELOOP_HOME": str(home),
        "TUNELOOP_NATS_URL": bus_settings.nats_url,
        "TUNELOOP_SUBJECT_PREFIX": bus_settings.prefix,
        "DATABASE_URL": database_url,
        "TUNELOOP_ARTIFACT_STORE_URL": store_url,
        "TRAINER_HTTP_PORT": "-1",
        "TRAINER_PROFILE": "cpu-tiny",
        "TRAINER_BASE_MODEL": "tiny",
        "TRAINER_OVERRIDES": json.dumps({"max_steps_per_phase": STEPS}),
        "TRAINER_CHECKPOINT_EVERY_STEPS": str(EVERY),
        "TRAINER_ACK_WAIT_S": "3",
        "TRAINER_PROMPTS": json.dumps(["remind me to pay rent"]),
        "TRAINER_MAX_NEW_TOKENS": "4",
        # Slow the steps down so the kill lands mid-training, not after it.
        "TRAINER_STEP_DELAY_S": "0.4",
        "TRAINER_WORK_DIR": str(work),
        "TRAINER_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.trainer.app"],
        cwd=ROOT,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def steps_of(work: Path) -> list[dict]:
    return [row for path in work.glob("*/steps.jsonl") for row in read_steps(path)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


# PostgreSQL only: the job bookkeeping runs on both databases in test_service.py; this test's
# cost is two training processes, paid once.
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_sigkill_mid_training_resumes_from_checkpoint_on_redelivery(
    bus_settings, database_url: str, tmp_path: Path, models_dir: Path
) -> None:
    store_url = (tmp_path / "store").as_uri()
    store = ArtifactStore.from_url(store_url, cache_dir=tmp_path / "cache")
    event = await publishable_dataset(store, json_task(64), json_task(4, prefix="v"))
    db = Database(database_url)
    await db.migrate()
    async with EventBus(bus_settings, service="test-ingest") as producer:
        await producer.publish(event)

    async def checkpoint_step() -> int:
        async with db.engine.connect() as conn:
            row = (await conn.execute(text("SELECT checkpoint_step FROM trainer_jobs"))).first()
        return int(row[0]) if row and row[0] else 0

    first_work, second_work = tmp_path / "machine1", tmp_path / "machine2"
    first = start_trainer(
        bus_settings, database_url, store_url, tmp_path / "h1", first_work, tmp_path / "t1.log"
    )
    second = None
    try:
        await eventually(checkpoint_step, timeout_s=180, interval_s=0.1, what="first checkpoint")
        first.kill()  # SIGKILL: no cleanup, no ack, the worker loses its parent
        first.wait()
        before = steps_of(first_work)
        worker_pids = {r["pid"] for r in before}
        assert len(worker_pids) == 1
        assert max(r["step"] for r in before) < STEPS, "the kill landed after training ended"
        # The training worker died with its parent (no orphan training on the machine).
        await eventually(lambda: not any(alive(p) for p in worker_pids), what="worker gone")
        saved = await checkpoint_step()

        second = start_trainer(
            bus_settings, database_url, store_url, tmp_path / "h2", second_work, tmp_path / "t2.log"
        )
        done = await eventually(
            lambda: events_of(bus_settings, TrainingDone), timeout_s=240, what="TrainingDone"
        )
    finally:
        for proc in (first, second):
            if proc and proc.poll() is None:
                proc.kill()
                proc.wait()
        await db.dispose()

    assert len(done) == 1
    assert len(await events_of(bus_settings, TrainingDone)) == 1
    adapter = await store.fetch_dir(done[0].adapter)
    meta = json.loads((adapter / "training_metadata.json").read_text())
    assert meta["resumed_from"] == [{"phase": "all", "checkpoint": f"checkpoint-{saved}"}]
    curve = json.loads((adapter / "loss_curve.json").read_text())
    # Every step once, in order: the ones before the checkpoint by the first worker, the
    # rest by the second, which started right after the checkpoint.
    assert [r["step"] for r in curve] == list(range(1, STEPS + 1))
    resumed = [r["step"] for r in curve if r["pid"] not in worker_pids]
    assert resumed == list(range(saved + 1, STEPS + 1))
    assert done[0].phases[0].steps == STEPS
    check = Database(database_url)
    async with check.engine.connect() as conn:
        attempts = (await conn.execute(text("SELECT attempts, status FROM trainer_jobs"))).one()
    await check.dispose()
    assert tuple(attempts) == (2, "done")
