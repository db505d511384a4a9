"""The event bus: faststream's NatsBroker over JetStream, with delivery guarantees made explicit.

Publishing
    Always to the pipeline stream, PubAck checked, ``Nats-Msg-Id`` = event id, so a retried
    publish of the same event is dropped by the server inside the stream's duplicate window
    (set explicitly, see :class:`BusSettings`).

Consuming
    Durable pull consumers with manual acknowledgement (faststream's NATS default *terminates*
    a message whose handler raised; we never want that):

    - success → ``ack``;
    - :class:`PermanentError` or a payload that fails schema validation → dead letter at once;
    - any other exception → ``nak`` with a growing delay, until ``max_deliver`` attempts, then
      dead letter. A consumer killed mid-work leaves the message un-acked; the server
      redelivers it after ``ack_wait`` to whichever consumer pulls next.

    A dead letter keeps the original payload byte for byte and says why in its headers.

Long handlers heartbeat (``in_progress``) well inside ``ack_wait`` so they are not redelivered
while still working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from uuid import UUID

from faststream import AckPolicy
from faststream.nats import (
    ConsumerConfig,
    JStream,
    NatsBroker,
    NatsMessage,
    PubAck,
    PullSub,
    StreamConfig,
)
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from pydantic import ValidationError

from shared import failpoints
from shared.aio import cancel_and_wait
from shared.events import Event
from shared.subjects import Namespace
from shared.telemetry import extract_trace_context, inject_trace_headers, log_context, tracer

log = logging.getLogger(__name__)


def trace_of_event(payload: bytes) -> Context:
    """The trace for a message that came without one (published by a plain NATS client): its
    trace id is the event id, so every delivery of that event, redeliveries after a crash
    included, joins one trace. The parent is a remote span that only names the trace."""
    try:
        event_id = UUID(str(json.loads(payload)["event_id"]))
    except (ValueError, KeyError, TypeError):
        return Context()
    low = event_id.int & 0xFFFF_FFFF_FFFF_FFFF
    parent = SpanContext(
        trace_id=event_id.int,
        span_id=low or 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


E = TypeVar("E", bound=Event)

MSG_ID_HEADER = "Nats-Msg-Id"
EVENT_TYPE_HEADER = "Tuneloop-Event"
DLQ_REASON_HEADER = "Tuneloop-Dead-Letter-Reason"
DLQ_SUBJECT_HEADER = "Tuneloop-Original-Subject"
DLQ_CONSUMER_HEADER = "Tuneloop-Consumer"
DLQ_DELIVERIES_HEADER = "Tuneloop-Deliveries"
DLQ_ERROR_HEADER = "Tuneloop-Error-Type"


class PermanentError(Exception):
    """Raised by a handler when retrying cannot help (bad input, forbidden method...).

    The message goes to the dead letters at once, with this error's text as the reason.
    """


class PublishError(RuntimeError):
    """The broker did not confirm a publish (no PubAck, wrong stream, timeout)."""


@dataclass(frozen=True)
class BusSettings:
    """How a service talks to NATS. Defaults suit the embedded mode."""

    nats_url: str = "nats://127.0.0.1:4222"
    prefix: str = "tuneloop"
    # Server-side dedupe of Nats-Msg-Id. Outbox relays republish after a crash, so the
    # window must cover a relay's restart; the inbox catches anything older.
    duplicate_window_s: float = 3600.0
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    # Delay before redelivery after attempt 1, 2, 3...; the last value repeats.
    backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0, 60.0)
    publish_timeout_s: float = 5.0
    # Stream retention: pipeline events are small; keep a month of history for replays.
    max_age_s: float = 30 * 24 * 3600.0
    file_storage: bool = True
    # 3 on a NATS cluster (k8s): the stream survives the loss of one server.
    stream_replicas: int = 1


@dataclass
class Delivery:
    """What a handler may want to know about the message it is handling."""

    message: NatsMessage
    subject: str
    attempt: int
    ack_wait_s: float
    event_id: str
    headers: Mapping[str, str] = field(default_factory=dict)
    # "<service>.<Event>": the prefix of this delivery's failpoints (shared.failpoints).
    failpoint: str = ""

    async def heartbeat(self) -> None:
        """Tell the server we are still working (resets its ack timer)."""
        await self.message.in_progress()

    @asynccontextmanager
    async def keep_alive(self, interval_s: float | None = None) -> AsyncIterator[None]:
        """Heartbeat in the background while the block runs."""
        period = interval_s or max(self.ack_wait_s / 3.0, 0.1)
        task = asyncio.create_task(self._beat(period), name=f"heartbeat-{self.event_id}")
        try:
            yield
        finally:
            await cancel_and_wait(task)

    async def _beat(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self.failpoint:
                failpoints.hit(f"{self.failpoint}.working")
            try:
                await self.heartbeat()
            except Exception as exc:  # a lost heartbeat is logged; the work goes on
                log.warning("heartbeat failed: %s", exc)


Handler = Callable[[E, Delivery], Awaitable[None]]


@dataclass
class Subscription(Generic[E]):
    event_type: type[E]
    durable: str
    handler: Handler[E]
    ack_wait_s: float
    max_deliver: int
    backoff_s: tuple[float, ...]
    heartbeat: bool


class EventBus:
    """One service's connection to the pipeline stream."""

    def __init__(
        self,
        settings: BusSettings,
        *,
        service: str,
        broker: NatsBroker | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.ns = Namespace(settings.prefix)
        self.broker = broker or NatsBroker(
            settings.nats_url,
            # Keep trying forever: a broker restart must not need a service restart.
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            allow_reconnect=True,
            connect_timeout=5,
            # faststream's own access log goes through our logging setup (stderr, with ids).
            logger=logging.getLogger("faststream"),
            log_level=logging.DEBUG,
        )
        self._stream = JStream(self.ns.stream, declare=False)
        self.subscriptions: list[Subscription[Any]] = []
        self._started = False
        # Deliveries that failed because a dependency was down, per (consumer, stream seq):
        # they do not count against max_deliver (this process's view; a restart forgets).
        self._excused: dict[tuple[str, int], int] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect, make sure both streams exist, start consuming."""
        await self.broker.connect()
        await self.ensure_streams()
        await self.broker.start()
        self._started = True

    async def close(self) -> None:
        await self.broker.stop()
        self._started = False

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def ensure_streams(self) -> None:
        """Create or update the pipeline stream and the dead-letter stream."""
        js = self.broker.connection.jetstream()
        storage = "file" if self.settings.file_storage else "memory"
        for name, subjects in (
            (self.ns.stream, [self.ns.all_subjects]),
            (self.ns.dead_letter_stream, [self.ns.all_dead_letters]),
        ):
            config = StreamConfig(
                name=name,
                subjects=subjects,
                duplicate_window=self.settings.duplicate_window_s,
                max_age=self.settings.max_age_s,
                storage=storage,  # type: ignore[arg-type]
                num_replicas=self.settings.stream_replicas,
            )
            try:
                await js.stream_info(name)
            except NotFoundError:
                await js.add_stream(config)
            else:
                await js.update_stream(config)

    async def ready(self) -> bool:
        """Readiness: connected to the broker right now."""
        try:
            return bool(self.broker.connection.is_connected)
        except Exception:
            return False

    # ----------------------------------------------------------------- publish

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> PubAck:
        """Publish one event to the stream and wait for the server's acknowledgement."""
        subject = self.ns.subject(event.subject)
        with tracer("tuneloop.bus").start_as_current_span(
            f"publish {event.subject}",
            kind=SpanKind.PRODUCER,
            attributes=_event_attributes(event, subject),
        ):
            hdrs = inject_trace_headers(dict(headers or {}))
            return await self.publish_raw(
                subject,
                event.model_dump_json().encode(),
                msg_id=event.msg_id,
                headers={**hdrs, EVENT_TYPE_HEADER: type(event).__name__},
            )

    async def publish_raw(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str,
        headers: Mapping[str, str] | None = None,
        stream: str | None = None,
    ) -> PubAck:
        """Confirmed publish of bytes that are already serialised (used by the outbox relay)."""
        stream = stream or self.ns.stream
        try:
            ack = await self.broker.publish(
                payload,
                subject,
                headers={**(headers or {}), MSG_ID_HEADER: msg_id},
                stream=stream,
                timeout=self.settings.publish_timeout_s,
            )
        except Exception as exc:
            raise PublishError(f"publish to {subject} was not confirmed: {exc!r}") from exc
        if ack is None or ack.stream != stream:
            raise PublishError(f"publish to {subject} got no PubAck from stream {stream}: {ack!r}")
        return ack

    # ----------------------------------------------------------------- subscribe

    def subscribe(
        self,
        event_type: type[E],
        handler: Handler[E],
        *,
        durable: str | None = None,
        ack_wait_s: float | None = None,
        max_deliver: int | None = None,
        backoff_s: tuple[float, ...] | None = None,
        heartbeat: bool = False,
        deliver_new_only: bool = False,
    ) -> Subscription[E]:
        """Register ``handler`` for ``event_type`` on a durable pull consumer.

        Call before :meth:`start`. ``durable`` defaults to ``<service>-<subject>``: every
        replica of a service shares it, so each event is handled by one replica.
        """
        sub = Subscription(
            event_type=event_type,
            durable=durable or f"{self.service}-{event_type.subject}".replace(".", "-"),
            handler=handler,
            ack_wait_s=ack_wait_s or self.settings.ack_wait_s,
            max_deliver=max_deliver or self.settings.max_deliver,
            backoff_s=backoff_s or self.settings.backoff_s,
            heartbeat=heartbeat,
        )
        subject = self.ns.subject(event_type.subject)

        async def consume(msg: NatsMessage) -> None:
            await self._dispatch(sub, subject, msg)

        self.broker.subscriber(
            subject,
            stream=self._stream,
            durable=sub.durable,
            pull_sub=PullSub(batch_size=1, timeout=5.0),
            config=ConsumerConfig(
                durable_name=sub.durable,
                ack_wait=sub.ack_wait_s,
                # Unlimited on the server: we count deliveries ourselves and dead-letter,
                # so a message is never silently parked by the server.
                max_deliver=-1,
                deliver_policy=DeliverPolicy.NEW if deliver_new_only else DeliverPolicy.ALL,
                max_ack_pending=1000,
            ),
            ack_policy=AckPolicy.MANUAL,
            decoder=_raw_body,
            title=f"{sub.durable}:{subject}",
            description=event_type.__doc__,
        )(consume)
        self.subscriptions.append(sub)
        return sub

    async def _dispatch(self, sub: Subscription[E], subject: str, msg: NatsMessage) -> None:
        raw = msg.raw_message
        headers: dict[str, str] = dict(raw.headers or {})
        attempt = int(raw.metadata.num_delivered or 1)
        payload: bytes = raw.data
        parent = extract_trace_context(headers)
        if not trace.get_current_span(parent).get_span_context().is_valid:
            parent = trace_of_event(payload)
        span_name = f"consume {sub.event_type.subject}"
        with tracer("tuneloop.bus").start_as_current_span(
            span_name, context=parent, kind=SpanKind.CONSUMER
        ) as span:
            span.set_attribute("messaging.consumer", sub.durable)
            span.set_attribute("messaging.delivery_attempt", attempt)
            try:
                event = sub.event_type.model_validate_json(payload)
            except ValidationError as exc:
                span.set_status(Status(StatusCode.ERROR, "schema validation failed"))
                await self._dead_letter(
                    sub, subject, msg, headers, f"schema validation failed: {exc}", exc, attempt
                )
                return
            for key, value in _event_attributes(event, subject).items():
                span.set_attribute(key, value)
            seq_key = (sub.durable, raw.metadata.sequence.stream if raw.metadata.sequence else 0)
            counted = attempt - self._excused.get(seq_key, 0)
            if counted > sub.max_deliver:
                # Earlier deliveries died without an answer (a crashing consumer).
                await self._dead_letter(
                    sub,
                    subject,
                    msg,
                    headers,
                    f"delivered {attempt} times without completing (max_deliver={sub.max_deliver})",
                    None,
                    attempt,
                )
                return
            delivery = Delivery(
                message=msg,
                subject=subject,
                attempt=attempt,
                ack_wait_s=sub.ack_wait_s,
                event_id=str(event.event_id),
                headers=headers,
                failpoint=f"{self.service}.{sub.event_type.__name__}",
            )
            with log_context(run_id=event.run_id, event_id=str(event.event_id)):
                started = time.perf_counter()
                try:
                    if sub.heartbeat:
                        async with delivery.keep_alive():
                            await sub.handler(event, delivery)
                    else:
                        await sub.handler(event, delivery)
                except PermanentError as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    await self._dead_letter(sub, subject, msg, headers, str(exc), exc, attempt)
                    return
                except Exception as exc:
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, repr(exc)))
                    if is_infrastructure_outage(exc):
                        # The database or a peer is unreachable: the message is not at fault,
                        # so an outage longer than the retry budget must not dead-letter it.
                        excused = self._excused[seq_key] = self._excused.get(seq_key, 0) + 1
                        delay = sub.backoff_s[min(excused - 1, len(sub.backoff_s) - 1)]
                        log.warning(
                            "dependency unavailable (delivery %d, not counted), retrying in "
                            "%.1fs: %r",
                            attempt,
                            delay,
                            exc,
                        )
                        await msg.nack(delay=delay)
                        return
                    if counted >= sub.max_deliver:
                        log.error("giving up after %d attempts: %r", attempt, exc)
                        await self._dead_letter(
                            sub,
                            subject,
                            msg,
                            headers,
                            f"failed {attempt} times; last error: {exc!r}",
                            exc,
                            attempt,
                        )
                        return
                    delay = sub.backoff_s[min(counted - 1, len(sub.backoff_s) - 1)]
                    log.warning(
                        "handler failed (attempt %d/%d), retrying in %.1fs: %r",
                        counted,
                        sub.max_deliver,
                        delay,
                        exc,
                    )
                    await msg.nack(delay=delay)
                    return
                self._excused.pop(seq_key, None)
                failpoints.hit(f"{delivery.failpoint}.handled")
                await msg.ack()
                log.debug(
                    "handled %s in %.3fs", sub.event_type.__name__, time.perf_counter() - started
                )

    async def _dead_letter(
        self,
        sub: Subscription[Any],
        subject: str,
        msg: NatsMessage,
        headers: Mapping[str, str],
        reason: str,
        exc: BaseException | None,
        attempt: int,
    ) -> None:
        """Move a message to the dead letters, then terminate it. If the dead-letter publish
        itself fails, the message is nak'ed instead, so nothing is lost."""
        raw = msg.raw_message
        seq = raw.metadata.sequence.stream if raw.metadata.sequence else 0
        self._excused.pop((sub.durable, seq), None)
        dlq_headers = {
            k: v for k, v in headers.items() if k != MSG_ID_HEADER and not k.startswith("Nats-")
        }
        dlq_headers.update(
            {
                DLQ_REASON_HEADER: _header_safe(reason)[:4000],
                DLQ_SUBJECT_HEADER: subject,
                DLQ_CONSUMER_HEADER: sub.durable,
                DLQ_DELIVERIES_HEADER: str(attempt),
                DLQ_ERROR_HEADER: type(exc).__name__ if exc else "none",
            }
        )
        suffix = subject.removeprefix(self.ns.prefix + ".")
        try:
            await self.publish_raw(
                self.ns.dead_letter(suffix),
                raw.data,
                msg_id=f"{sub.durable}:{seq}",
                headers=dlq_headers,
                stream=self.ns.dead_letter_stream,
            )
        except PublishError as err:
            log.error("dead-letter publish failed, will retry: %s", err)
            await msg.nack(delay=sub.backoff_s[0])
            return
        log.error("dead-lettered message %s from %s: %s", seq, subject, reason)
        await msg.reject()
        trace.get_current_span().add_event("dead-lettered", {"reason": reason[:500]})


def is_infrastructure_outage(exc: BaseException) -> bool:
    """A connection-level failure of a dependency (database, broker, store, peer): retrying
    later can help and the message is not to blame."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | InterfaceError | OperationalError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        current = current.__cause__ or current.__context__
    return False


def _raw_body(msg: Any) -> Any:
    """Decoder: hand the handler the message itself; we validate the payload ourselves."""
    return None


def _header_safe(text: str) -> str:
    return " ".join(text.split())


def _event_attributes(event: Event, subject: str) -> dict[str, str]:
    return {
        "messaging.system": "nats",
        "messaging.destination.name": subject,
        "tuneloop.run_id": event.run_id,
        "tuneloop.event_id": str(event.event_id),
        "tuneloop.event_type": type(event).__name__,
    }
