"""Interaction capture, off the hot path: the proxy drops a record into a bounded queue
(never waiting: when it is full the record is dropped, the request is not); a background
worker parses the response, charges the key's tokens, scrubs PII and writes batches of
``gateway_interactions`` rows, then applies feedback that arrived before its interaction.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from prometheus_client import Counter
from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from services.gateway.models import GatewayFeedback
from services.gateway.pii import scrub
from shared.aio import cancel_and_wait
from shared.db import Database, utcnow
from shared.interactions import Interaction

log = logging.getLogger(__name__)

CAPTURED = Counter("gateway_capture_written_total", "Interactions written to the DB")
DROPPED = Counter("gateway_capture_dropped_total", "Interactions dropped", ["reason"])
DROPPED_FULL = DROPPED.labels("queue_full")
DROPPED_DB = DROPPED.labels("db_error")
DROPPED_LATE = DROPPED.labels("after_stop")


@dataclass(slots=True)
class CaptureRecord:
    endpoint: str  # "chat" | "completions"
    request: dict[str, Any]
    body: bytes | list[bytes]  # a JSON body, or the SSE chunks of a stream
    stream: bool
    served_model_name: str
    deployment_id: str
    model_id: str | None
    key_id: str | None
    key_tpm: int | None
    user_hash: str | None
    status_code: int
    latency_ms: float
    trace_id: str | None
    created_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Parsed:
    response_id: str | None
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None


def _choice_text(choice: dict[str, Any], stream: bool) -> str:
    if "text" in choice and isinstance(choice["text"], str):
        return choice["text"]
    part = choice.get("delta" if stream else "message") or {}
    content = part.get("content") if isinstance(part, dict) else None
    return content if isinstance(content, str) else ""


def parse_response(body: bytes | list[bytes], stream: bool) -> Parsed:
    """The response id, text (first choice) and token usage of a JSON or SSE body."""
    if not stream:
        assert isinstance(body, bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return Parsed(None, "", None, None)
        if not isinstance(doc, dict):
            return Parsed(None, "", None, None)
        choices = doc.get("choices") or [{}]
        usage = doc.get("usage") or {}
        return Parsed(
            doc.get("id") if isinstance(doc.get("id"), str) else None,
            _choice_text(choices[0], False) if isinstance(choices[0], dict) else "",
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
        )
    data = b"".join(body) if isinstance(body, list) else body
    response_id: str | None = None
    parts: list[str] = []
    chunks = 0
    prompt_tokens = completion_tokens = None
    for line in data.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            continue
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        if response_id is None and isinstance(doc.get("id"), str):
            response_id = doc["id"]
        for choice in doc.get("choices") or []:
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                text = _choice_text(choice, True)
                if text:
                    parts.append(text)
                    chunks += 1
        usage = doc.get("usage")
        if isinstance(usage, dict):
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
    if completion_tokens is None and chunks:
        completion_tokens = chunks  # the engine streams about one token per chunk
    return Parsed(response_id, "".join(parts), prompt_tokens, completion_tokens)


def _scrub_content(content: Any) -> Any:
    if isinstance(content, str):
        return scrub(content)
    if isinstance(content, list):  # content parts
        return [
            {**p, "text": scrub(p["text"])}
            if isinstance(p, dict) and isinstance(p.get("text"), str)
            else p
            for p in content
        ]
    return content


def scrubbed_request(endpoint: str, request: dict[str, Any]) -> str:
    if endpoint == "chat":
        messages = [
            {"role": m.get("role"), "content": _scrub_content(m.get("content"))}
            for m in request.get("messages") or []
            if isinstance(m, dict)
        ]
        return orjson.dumps({"messages": messages}).decode()
    prompt = request.get("prompt")
    if isinstance(prompt, list):
        prompt = [scrub(p) if isinstance(p, str) else p for p in prompt]
    elif isinstance(prompt, str):
        prompt = scrub(prompt)
    return orjson.dumps({"prompt": prompt}).decode()


TokenCharger = Callable[[str, int | None, int], None]


class CaptureSink:
    """The bounded queue and its writer task."""

    def __init__(
        self,
        db: Database,
        *,
        enabled: bool,
        queue_size: int,
        batch_size: int,
        flush_s: float,
        max_text_chars: int,
        charge_tokens: TokenCharger | None = None,
    ) -> None:
        self.db = db
        self.enabled = enabled
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.max_text_chars = max_text_chars
        self.charge_tokens = charge_tokens
        self.queue: asyncio.Queue[CaptureRecord] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[CaptureRecord] = []
        self._writing: asyncio.Future[None] | None = None
        self.stopped = False
        self.written = 0
        self.dropped = 0

    def offer(self, record: CaptureRecord) -> None:
        """Never blocks: a full queue drops the record (and counts it)."""
        if self.stopped:
            # The service drains requests before it stops capture, so nothing completes after
            # this; counted (and logged) should it ever happen.
            self.dropped += 1
            DROPPED_LATE.inc()
            log.warning("capture: a record offered after capture stopped was dropped")
            return
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            DROPPED_FULL.inc()

    def start(self) -> None:
        self.stopped = False
        self._task = asyncio.create_task(self._run(), name="gateway-capture")

    async def stop(self) -> None:
        """Write what is queued (bounded by the queue), then stop. A batch being written is
        finished, never cut off mid-transaction (it would be written and charged twice)."""
        if self._task is None:
            return
        self.stopped = True
        await cancel_and_wait(self._task)
        self._task = None
        if self._writing is not None:
            await self._writing  # the batch in flight completes (its errors are logged)
            self._writing = None
            self._inflight = []
        rest, self._inflight = self._inflight, []  # taken from the queue, not yet written
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        for i in range(0, len(rest), self.batch_size):
            try:
                await self._write(rest[i : i + self.batch_size])
            except Exception:
                log.exception("capture: %d records lost at shutdown", len(rest) - i)
                break

    async def flush(self) -> None:
        """Write everything queued now (tests, shutdown)."""
        batch: list[CaptureRecord] = []
        while not self.queue.empty():
            batch.append(self.queue.get_nowait())
        if batch:
            await self._write(batch)

    async def _run(self) -> None:
        queue = self.queue
        while True:
            batch = self._inflight = [await queue.get()]
            if queue.qsize() < self.batch_size - 1:
                await asyncio.sleep(self.flush_s)  # let a batch gather (the queue is bounded)
            while len(batch) < self.batch_size and not queue.empty():
                batch.append(queue.get_nowait())
            # Shielded: stop() cancels this loop but lets the batch finish.
            self._writing = asyncio.ensure_future(self._write_logged(batch))
            await asyncio.shield(self._writing)
            self._writing = None
            self._inflight = []

    async def _write_logged(self, batch: list[CaptureRecord]) -> None:
        try:
            await self._write(batch)
        except Exception:
            log.exception("capture batch of %d failed", len(batch))

    def _row(self, rec: CaptureRecord, parsed: Parsed) -> dict[str, Any]:
        cut = self.max_text_chars
        return {
            "id": (parsed.response_id or f"gw-{uuid.uuid4().hex}")[:64],
            "created_at": rec.created_at,
            "served_model_name": rec.served_model_name[:200],
            "deployment_id": rec.deployment_id,
            "model_id": rec.model_id,
            "api_key_id": rec.key_id,
            "user_hash": rec.user_hash,
            "endpoint": rec.endpoint,
            "request": scrubbed_request(rec.endpoint, rec.request)[: cut * 2],
            "response_text": scrub(parsed.text[:cut]),
            "status_code": rec.status_code,
            "latency_ms": round(rec.latency_ms, 3),
            "prompt_tokens": parsed.prompt_tokens,
            "completion_tokens": parsed.completion_tokens,
            "trace_id": rec.trace_id,
        }

    async def _write(self, batch: list[CaptureRecord]) -> None:
        rows: list[dict[str, Any]] = []
        for i, rec in enumerate(batch):
            if i % 16 == 15:
                await asyncio.sleep(0)  # parsing and scrubbing: let requests through between
            parsed = parse_response(rec.body, rec.stream)
            if self.charge_tokens is not None and rec.key_id:
                used = (parsed.prompt_tokens or 0) + (parsed.completion_tokens or 0)
                self.charge_tokens(rec.key_id, rec.key_tpm, used)
            if self.enabled:
                rows.append(self._row(rec, parsed))
        if not rows:
            return
        table = Interaction.__table__  # type: ignore[attr-defined]
        try:
            async with self.db.session() as session:
                await session.exec(insert(table), params=rows)
        except IntegrityError:  # a duplicate response id: write the others one by one
            kept: list[dict[str, Any]] = []
            for row in rows:
                try:
                    async with self.db.session() as session:
                        await session.exec(insert(table), params=[row])
                    kept.append(row)
                except IntegrityError:
                    DROPPED.labels("duplicate").inc()
            rows = kept
        except Exception:
            self.dropped += len(rows)
            DROPPED_DB.inc(len(rows))
            raise
        self.written += len(rows)
        CAPTURED.inc(len(rows))


def quality_score(rating: int, correction: str | None) -> float:
    """What the harvester filters on: a liked answer 1.0, a disliked or corrected one 0.0."""
    if correction or rating < 0:
        return 0.0
    return 1.0 if rating > 0 else 0.5


async def apply_feedback(session: Any, fb: GatewayFeedback) -> bool:
    """Set the interaction's rating, comment and quality score, if it exists and was made with
    the same key (nobody rates another key's answers)."""
    result = await session.exec(
        update(Interaction)
        .where(
            col(Interaction.id) == fb.response_id,
            col(Interaction.api_key_id) == fb.api_key_id,
        )
        .values(
            feedback_rating=fb.rating,
            feedback_comment=(fb.comment or fb.correction),
            feedback_at=fb.created_at,
            quality_score=quality_score(fb.rating, fb.correction),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:
        fb.applied = True
        session.add(fb)
        return True
    return False
