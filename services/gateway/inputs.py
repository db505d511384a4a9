"""What a request to the model API must look like, and the gateway's own answers to one
that does not: body validation (shape, nesting depth), the context-length lower bound, trace
ids from ``traceparent``, OpenAI-style error bodies, sampled server spans."""

from __future__ import annotations

import os
from typing import Any

import orjson
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from shared.telemetry import tracer


class RequestError(Exception):
    """An answer the gateway gives itself (never reaches an upstream)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.retry_after = retry_after


def error_body(message: str, kind: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def traceparent(headers: list[tuple[bytes, bytes]]) -> tuple[str, str | None]:
    """(trace id, parent span id) from a W3C ``traceparent``, or a fresh trace id."""
    for name, value in headers:
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
                try:
                    if int(parts[1], 16) and int(parts[2], 16):
                        return parts[1].decode(), parts[2].decode()
                except ValueError:
                    pass
            break
    return os.urandom(16).hex(), None


def trace_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    return traceparent(headers)[0]


def emit_span(
    path: str, trace_id: str, parent_span_id: str | None, start_ns: int, seen: dict[str, Any]
) -> None:
    """A server span for a sampled request, recorded after the fact (off the latency path)."""
    parent = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(parent_span_id, 16) if parent_span_id else int.from_bytes(os.urandom(8)) | 1,
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )
    span = tracer("tuneloop.gateway").start_span(
        f"POST {path}",
        context=otel_trace.set_span_in_context(NonRecordingSpan(parent)),
        kind=SpanKind.SERVER,
        start_time=start_ns,
        attributes={
            "http.route": path,
            "http.response.status_code": int(seen.get("status", 0)),
            "tuneloop.deployment_id": str(seen.get("deployment", "none")),
        },
    )
    span.end()


def depth_ok(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return True


def prompt_chars(endpoint: str, body: dict[str, Any]) -> int:
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return len(prompt)
        if isinstance(prompt, list):
            return sum(len(p) if isinstance(p, str) else 1 for p in prompt)
        return 0
    total = 0
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
    return total


def validate(endpoint: str, body: Any, *, max_depth: int) -> dict[str, Any]:
    """The request's shape; anything else is a 400 with a clear message."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if not depth_ok(body, max_depth):
        raise RequestError(400, f"the request JSON is nested deeper than {max_depth} levels")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 200:
        raise RequestError(400, "'model' must be a non-empty string", code="invalid_model")
    if endpoint == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(400, "each message must be an object with a string 'role'")
            content = m.get("content")
            if content is not None and not isinstance(content, str | list):
                raise RequestError(400, "a message's 'content' must be a string or a list")
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list) or (isinstance(prompt, list) and not prompt):
            raise RequestError(400, "'prompt' must be a string or a non-empty list")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be a boolean")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        raise RequestError(400, "'max_tokens' must be a positive integer")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise RequestError(400, "'user' must be a string of at most 256 characters")
    return body
