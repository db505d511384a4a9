"""Reading what ingest wrote: chat-record JSONL splits and curriculum manifests.

Everything here distrusts its input (it comes from another service, maybe from a hostile
upload): bounded line sizes and counts, exact roles, ids that must exist. A bad dataset is a
:class:`DataError`, which the handler turns into a ``TrainingFailed`` and a dead letter.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = frozenset({"system", "user", "assistant"})
MAX_LINE_BYTES = 1_000_000
MAX_RECORDS = 5_000_000
MAX_MESSAGES = 256
MAX_MANIFEST_BYTES = 200_000_000
MAX_ID_LENGTH = 200
PHASE_ORDER = ("A", "B", "C")


class DataError(ValueError):
    """The dataset cannot be trained on as it is (retrying cannot help)."""


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: its records in training order."""

    name: str
    records: list[dict[str, Any]] = field(repr=False)
    description: str = ""
    sequential: bool = False


def _check_record(obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a record must be a JSON object")
    rid = obj.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID_LENGTH:
        raise DataError(f"{where}: 'id' must be a string of 1-{MAX_ID_LENGTH} characters")
    messages = obj.get("messages")
    if not isinstance(messages, list) or not 0 < len(messages) <= MAX_MESSAGES:
        raise DataError(f"{where}: 'messages' must be a list of 1-{MAX_MESSAGES} messages")
    clean = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: message {i} must be an object")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise DataError(
                f"{where}: message {i} has role {role!r}; expected one of {sorted(ROLES)}"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be a string")
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        raise DataError(f"{where}: no assistant message (nothing to learn)")
    return {"id": rid, "messages": clean}


def parse_records(lines: Iterable[bytes], *, source: str = "split") -> list[dict[str, Any]]:
    """Validate chat records, one JSON object a line (blank lines skipped)."""
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        where = f"{source} line {number}"
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{where}: longer than {MAX_LINE_BYTES} bytes")
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: not valid JSON ({exc})") from None
        records.append(_check_record(obj, where))
        if len(records) > MAX_RECORDS:
            raise DataError(f"{source}: more than {MAX_RECORDS} records")
    if not records:
        raise DataError(f"{source}: no records")
    return records


def read_records(path: Path, *, source: str = "split") -> list[dict[str, Any]]:
    with path.open("rb") as fh:
        # Read at most one byte past the limit per line, so a giant line cannot fill memory.
        def lines() -> Iterable[bytes]:
            while raw := fh.readline(MAX_LINE_BYTES + 1):
                yield raw

        return parse_records(lines(), source=source)


def parse_manifest(blob: bytes, phase: str) -> tuple[str, list[str]]:
    """A curriculum manifest: ``{"phase", "description", "seed", "record_ids"}``."""
    if len(blob) > MAX_MANIFEST_BYTES:
        raise DataError(f"curriculum manifest {phase}: too large")
    try:
        obj = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"curriculum manifest {phase}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise DataError(f"curriculum manifest {phase}: must be a JSON object")
    if obj.get("phase") != phase:
        raise DataError(f"curriculum manifest {phase}: says it is phase {obj.get('phase')!r}")
    ids = obj.get("record_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise DataError(
            f"curriculum manifest {phase}: 'record_ids' must be a non-empty list of ids"
        )
    description = obj.get("description", "")
    return (description if isinstance(description, str) else "")[:500], ids


def plan_phases(
    records: list[dict[str, Any]],
    manifests: dict[str, bytes],
    wanted: list[str] | None = None,
) -> list[Phase]:
    """The phases to train, in order. No manifests: one phase ``all`` over the split."""
    if not manifests:
        if wanted and wanted != ["all"]:
            raise DataError(f"phases {wanted} requested but the dataset has no curriculum")
        return [Phase(name="all", records=records)]
    unknown = sorted(set(manifests) - set(PHASE_ORDER))
    if unknown:
        raise DataError(f"unknown curriculum phases {unknown}; expected {list(PHASE_ORDER)}")
    names = [p for p in PHASE_ORDER if p in manifests]
    if wanted:
        missing = [p for p in wanted if p not in manifests]
        if missing:
            raise DataError(f"phases {missing} requested but the dataset has only {names}")
        names = [p for p in names if p in wanted]
    by_id = {r["id"]: r for r in records}
    phases = []
    for name in names:
        description, ids = parse_manifest(manifests[name], name)
        missing_ids = [i for i in ids if i not in by_id]
        if missing_ids:
            raise DataError(
                f"curriculum manifest {name}: {len(missing_ids)} record ids are not in the train "
                f"split (first: {missing_ids[0][:100]!r})"
            )
        phases.append(
            Phase(
                name=name,
                records=[by_id[i] for i in ids],
                description=description,
                sequential=True,
            )
        )
    return phases
