"""Tracing and logging for every service.

- One OpenTelemetry tracer provider per process, named after the service.
- OTLP/HTTP export when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; otherwise spans are appended
  as JSON lines to a local file (``TUNELOOP_SPAN_FILE``), so a run can be inspected with no
  collector (``tuneloop trace RUN_ID``).
- W3C trace context travels in NATS message headers (``traceparent``); the bus injects it on
  publish and extracts it on consume, so one run is one trace across services.
- Log records carry ``run_id`` and ``event_id`` from the current handler's context.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)
_event_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("event_id", default=None)
_configured_service: str | None = None


def default_span_file() -> Path:
    explicit = os.environ.get("TUNELOOP_SPAN_FILE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("TUNELOOP_HOME", ".tuneloop")) / "spans.jsonl"


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line (safe across processes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_to_dict(s), default=str) + "\n" for s in spans)
        data = lines.encode()
        with self._lock:
            # One O_APPEND write per batch: lines from several processes never interleave.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def span_to_dict(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    start = span.start_time or 0
    end = span.end_time or start
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "start": datetime.fromtimestamp(start / 1e9, UTC).isoformat(),
        "duration_ms": round((end - start) / 1e6, 3),
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def setup_telemetry(
    service: str,
    *,
    span_file: Path | None = None,
    otlp_endpoint: str | None = None,
    log_level: str | None = None,
) -> TracerProvider:
    """Configure tracing and logging for this process (idempotent per process)."""
    global _configured_service
    configure_logging(service, log_level or os.environ.get("TUNELOOP_LOG_LEVEL", "INFO"))
    current = trace.get_tracer_provider()
    if _configured_service is not None and isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces"))
        )
    else:
        # Simple (synchronous) processor: a span is on disk the moment it ends, so a
        # crashed or SIGKILLed service still leaves its finished spans behind.
        provider.add_span_processor(
            SimpleSpanProcessor(JsonLinesSpanExporter(span_file or default_span_file()))
        )
    trace.set_tracer_provider(provider)
    _configured_service = service
    return provider


def tracer(name: str = "tuneloop") -> trace.Tracer:
    return trace.get_tracer(name)


def inject_trace_headers(headers: dict[str, str], context: Context | None = None) -> dict[str, str]:
    """Write the current (or given) trace context into message headers."""
    propagate.inject(headers, context=context)
    return headers


def extract_trace_context(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str | None:
    """The current span as a W3C ``traceparent``: kept with state that outlives the handler,
    so work done later for the same run (:func:`resume_trace`) joins its trace."""
    return inject_trace_headers({}).get("traceparent")


@contextmanager
def resume_trace(
    traceparent: str | None, name: str, attributes: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Run the block in a span that continues the trace ``traceparent`` names (from
    :func:`current_traceparent`); without one, the block runs as it is."""
    if not traceparent:
        yield
        return
    parent = extract_trace_context({"traceparent": traceparent})
    with tracer("tuneloop").start_as_current_span(name, context=parent, attributes=attributes):
        yield


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


@contextmanager
def log_context(*, run_id: str | None = None, event_id: str | None = None) -> Iterator[None]:
    """Attach run and event ids to every log record emitted inside the block."""
    run_token = _run_id.set(run_id)
    event_token = _event_id.set(event_id)
    try:
        yield
    finally:
        _run_id.reset(run_token)
        _event_id.reset(event_token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = _run_id.get() or "-"
        record.event_id = _event_id.get() or "-"
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = f"{ctx.trace_id:032x}" if ctx.is_valid else "-"
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            "run_id": getattr(record, "run_id", "-"),
            "event_id": getattr(record, "event_id", "-"),
            "trace_id": getattr(record, "trace_id", "-"),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """JSON logs on stderr when ``TUNELOOP_LOG_FORMAT=json`` (the default under ``tuneloop up``),
    readable text otherwise; either way with run_id and event_id."""
    root = logging.getLogger()
    if any(getattr(h, "_tuneloop", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._tuneloop = True  # type: ignore[attr-defined]
    handler.addFilter(_ContextFilter())
    if os.environ.get("TUNELOOP_LOG_FORMAT", "text") == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s {service} %(name)s "
                "[run=%(run_id)s event=%(event_id)s] %(message)s"
            )
        )
    root.addHandler(handler)
    root.setLevel(level.upper())
