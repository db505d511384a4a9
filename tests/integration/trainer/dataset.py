"""Datasets for the trainer's tests: the JSON task (informal request → JSON), written to an
artifact store in the form ingest publishes (chat-record JSONL + curriculum manifests)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from shared.events import DatasetReady, SplitCounts, new_run_id
from shared.storage import ArtifactStore

TASKS = ["call mom", "buy groceries", "pay rent", "water the plants", "send the report"]
WHENS = ["tomorrow 9am", "friday", "tonight", "next monday", "at noon"]
SYSTEM = "Reply with JSON only."


def json_task(n: int, *, seed: int = 0, prefix: str = "r") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task, when = rng.choice(TASKS), rng.choice(WHENS)
        answer = json.dumps({"intent": "reminder", "task": task, "when": when})
        out.append(
            {
                "id": f"{prefix}{i}",
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"remind me to {task} {when}"},
                    {"role": "assistant", "content": answer},
                ],
                "category": "reminder",
                "source": "test",
            }
        )
    return out


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


async def publishable_dataset(
    store: ArtifactStore,
    train: list[dict[str, Any]] | bytes,
    validation: list[dict[str, Any]],
    *,
    curriculum: dict[str, list[str]] | None = None,
    dataset_id: str = "ds-test",
    manifests_raw: dict[str, bytes] | None = None,
) -> DatasetReady:
    train_bytes = train if isinstance(train, bytes) else jsonl(train)
    train_ref = await store.put_bytes(train_bytes, kind="dataset", name="train.jsonl")
    val_ref = await store.put_bytes(jsonl(validation), kind="dataset", name="validation.jsonl")
    report = await store.put_bytes(b"{}", kind="dataset", name="report.json")
    manifests = {}
    for phase, ids in (curriculum or {}).items():
        blob = json.dumps(
            {"phase": phase, "description": f"phase {phase}", "seed": 1, "record_ids": ids}
        ).encode()
        manifests[phase] = await store.put_bytes(blob, kind="curriculum", name=f"{phase}.json")
    for phase, blob in (manifests_raw or {}).items():
        manifests[phase] = await store.put_bytes(blob, kind="curriculum", name=f"{phase}.json")
    return DatasetReady(
        run_id=new_run_id(),
        producer="test-ingest",
        dataset_id=dataset_id,
        dataset_name="json-task",
        train=train_ref,
        validation=val_ref,
        report=report,
        curriculum=manifests,
        counts=SplitCounts(train=train_bytes.count(b"\n"), validation=len(validation)),
    )


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
