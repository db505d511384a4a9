"""The hot path: a plain ASGI app for ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/models`` (everything else goes to the FastAPI side: health, metrics, admin, feedback).

Per request: authenticate (in memory), rate-limit, read the body under a size limit, parse and
check it, choose the deployment (sticky), forward through that upstream's pooled aiohttp
session, pass the answer back (SSE chunk by chunk), and queue the interaction for capture.
Failover: a failure before the first byte reaches the client is retried once on the stable
deployment; after it, a stream ends with an error event. A client that disconnects cancels
the upstream request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp
import orjson
from prometheus_client import Counter, Histogram

from services.gateway.capture import CaptureRecord
from services.gateway.control import GatewayState
from services.gateway.inputs import (
    RequestError,
    emit_span,
    error_body,
    prompt_chars,
    trace_id_of,
    traceparent,
    validate,
)
from services.gateway.keys import KeyInfo
from services.gateway.routing.table import Choice, Upstream, choose, user_hash
from shared.aio import wait_set

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUESTS = Counter(
    "gateway_requests_total", "Requests answered by the gateway", ["deployment", "status"]
)
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_seconds",
    "Upstream time to first byte (streams) or to the whole answer",
    ["deployment"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FAILOVERS = Counter("gateway_failovers_total", "Retries on stable before the first byte")

JSON = b"application/json"
H_DEPLOYMENT = b"x-tuneloop-deployment"
H_TRACE = b"x-tuneloop-trace-id"
H_MODEL = b"x-tuneloop-model-id"
NO_DEPLOYMENT = b"none"
STREAM_DONE = b"data: [DONE]"  # an OpenAI-style stream's last event
PATHS = {b"/v1/chat/completions": "chat", b"/v1/completions": "completions"}
SUFFIX = {"chat": "/chat/completions", "completions": "/completions"}


class UpstreamFailed(Exception):
    """This attempt failed before anything reached the client (retry may help)."""


class UpstreamTimeout(Exception):
    """The deadline passed before the upstream answered."""


class ProxyApp:
    """The ASGI entry point; ``fallback`` serves every other path."""

    def __init__(self, state: GatewayState, fallback: ASGIApp) -> None:
        self.state = state
        self.settings = state.settings
        self.fallback = fallback
        s = state.settings
        self._timeout_stream = aiohttp.ClientTimeout(
            total=None, connect=s.upstream_connect_timeout_s, sock_read=s.stream_idle_timeout_s
        )
        self._counters: dict[tuple[str, int], Any] = {}
        self._histograms: dict[str, Any] = {}
        # Shutdown: once closing, model requests are refused; those in flight are tracked so
        # the service can let them finish (and be captured) before it stops capture.
        self.closing = False
        self._active: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/"):
                endpoint = PATHS.get(path.encode())
                if endpoint is not None:
                    await self._completion(endpoint, scope, receive, send)
                    return
                if path == "/v1/models":
                    await self._models(scope, send)
                    return
        await self._other(scope, receive, send)

    async def _other(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Health, metrics, admin and feedback (FastAPI), with the same trace header and body
        limit as the model API."""
        if scope["type"] != "http":
            await self.fallback(scope, receive, send)
            return
        trace = trace_id_of(scope["headers"]).encode()
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                status = 413 if value.isdigit() else 400
                await self._send_error(
                    send, RequestError(status, "invalid or oversized body"), trace
                )
                return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body past the limit: treat as gone
                return {"type": "http.disconnect"}
            return message

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (H_DEPLOYMENT, NO_DEPLOYMENT),
                    (H_TRACE, trace),
                ]
            await send(message)

        await self.fallback(scope, limited_receive, traced_send)

    # ------------------------------------------------------------------ helpers

    def _count(self, deployment: str, status: int) -> None:
        key = (deployment, status)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = REQUESTS.labels(deployment, str(status))
        child.inc()

    def _observe(self, deployment: str, seconds: float) -> None:
        child = self._histograms.get(deployment)
        if child is None:
            child = self._histograms[deployment] = UPSTREAM_SECONDS.labels(deployment)
        child.observe(seconds)

    async def _send_error(
        self,
        send: Send,
        err: RequestError,
        trace: bytes,
        deployment: bytes = NO_DEPLOYMENT,
        *,
        close: bool = False,
    ) -> None:
        body = error_body(err.message, err.kind, err.code)
        headers = [
            (b"content-type", JSON),
            (b"content-length", str(len(body)).encode()),
            (H_DEPLOYMENT, deployment),
            (H_TRACE, trace),
        ]
        if close:  # shutting down: the client reconnects (to another replica)
            headers.append((b"connection", b"close"))
        if err.retry_after is not None:
            headers.append((b"retry-after", str(err.retry_after).encode()))
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self._count(deployment.decode(), err.status)

    def _authenticate(self, scope: Scope) -> KeyInfo:
        auth = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        key = self.state.keys.authenticate(auth)
        if key is None:
            raise RequestError(
                401,
                "missing, invalid or revoked API key",
                kind="authentication_error",
                code="invalid_api_key",
            )
        return key

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.settings.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise RequestError(400, "invalid Content-Length") from None
                if declared > limit:
                    raise RequestError(413, f"request body over {limit} bytes", code="too_large")
                break
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"request body over {limit} bytes", code="too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ------------------------------------------------------------------ /v1/models

    async def _models(self, scope: Scope, send: Send) -> None:
        trace = trace_id_of(scope["headers"]).encode()
        try:
            key = self._authenticate(scope)
        except RequestError as err:
            await self._send_error(send, err, trace)
            return
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "tuneloop"}
            for name, route in sorted(self.state.routes.items())
            if (route.stable or route.canary or route.pinned) and key.allows_model(name)
        ]
        body = orjson.dumps({"object": "list", "data": data})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", JSON),
                    (b"content-length", str(len(body)).encode()),
                    (H_DEPLOYMENT, NO_DEPLOYMENT),
                    (H_TRACE, trace),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    # ------------------------------------------------------------------ completions

    async def drain(self, grace_s: float) -> int:
        """Refuse new model requests (503), give those in flight up to ``grace_s`` to finish,
        then cancel the rest. Returns how many were cancelled."""
        self.closing = True
        if self._active:
            await wait_set(self._idle, grace_s)
        late = list(self._active)
        for task in late:
            task.cancel()
        if late:
            log.warning(
                "shutdown: %d request(s) still running after %.0f s cancelled", len(late), grace_s
            )
            await asyncio.gather(*late, return_exceptions=True)
        return len(late)

    async def _completion(self, endpoint: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.closing:
            err = RequestError(
                503,
                "the gateway is shutting down; retry",
                kind="service_unavailable",
                retry_after=self.settings.retry_after_s,
            )
            await self._send_error(send, err, trace_id_of(scope["headers"]).encode(), close=True)
            return
        task = asyncio.current_task()
        assert task is not None
        self._active.add(task)
        self._idle.clear()
        try:
            await self._completion_traced(endpoint, scope, receive, send)
        finally:
            self._active.discard(task)
            if not self._active:
                self._idle.set()

    async def _completion_traced(
        self, endpoint: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        ratio = self.settings.trace_sample_ratio
        if ratio <= 0 or random.random() >= ratio:
            await self._completion_inner(endpoint, scope, receive, send)
            return
        start_ns = time.time_ns()
        seen: dict[str, Any] = {}
        inner_send = send

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                for name, value in message["headers"]:
                    if name == H_DEPLOYMENT:
                        seen["deployment"] = value.decode("latin-1")
            await inner_send(message)

        try:
            await self._completion_inner(endpoint, scope, receive, watched_send)
        finally:
            trace_id, parent = traceparent(scope["headers"])
            emit_span(scope["path"], trace_id, parent, start_ns, seen)

    async def _completion_inner(
        self, endpoint: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = time.perf_counter()
        trace_id = trace_id_of(scope["headers"])
        trace = trace_id.encode()
        state = self.state
        try:
            if scope["method"] != "POST":
                raise RequestError(405, "use POST", code="method_not_allowed")
            key = self._authenticate(scope)
            if "client" not in key.scopes:
                raise RequestError(
                    403, "this key may not call the model API", kind="permission_error"
                )
            retry_after = state.limiter.check(key)
            if retry_after is not None:
                raise RequestError(
                    429,
                    "rate limit exceeded for this key",
                    kind="rate_limit_error",
                    code="rate_limit_exceeded",
                    retry_after=retry_after,
                )
            raw = await self._read_body(scope, receive)
            if raw is None:
                return  # the client left while sending
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
            body = validate(endpoint, parsed, max_depth=self.settings.max_json_depth)
            model: str = body["model"]
            if not key.allows_model(model):
                raise RequestError(
                    403,
                    f"this key may not use model {model!r}",
                    kind="permission_error",
                    code="model_not_allowed",
                )
            route = state.routes.get(model)
            if route is None:
                raise RequestError(
                    404, f"the model {model!r} does not exist", code="model_not_found"
                )
            user = body.get("user")
            user_key = f"{key.key_id}\x00{user}" if user else key.key_id
            choice = choose(route, user_key)
            if choice is None:
                raise RequestError(
                    503,
                    f"no healthy deployment serves {model!r} right now",
                    kind="service_unavailable",
                    retry_after=self.settings.retry_after_s,
                )
            self._check_context(endpoint, body, choice.primary)
        except RequestError as err:
            await self._send_error(send, err, trace)
            return

        task = asyncio.current_task()
        assert task is not None
        finished = False
        client_gone = False

        async def watch_disconnect() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        client_gone = True
                        task.cancel()
                    return

        async def send_tracking_the_end(message: Message) -> None:
            # Once the whole answer is on its way (the last body message, or a stream's
            # "data: [DONE]" event), a client that hangs up has everything: its disconnect
            # must not cancel the rest (the outcome, the capture), only an early one does.
            nonlocal finished
            if message["type"] == "http.response.body" and (
                not message.get("more_body", False)
                or message.get("body", b"")[-32:].rstrip().endswith(STREAM_DONE)
            ):
                finished = True
            await send(message)

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await self._forward(
                endpoint, body, raw, choice, key, user_key, trace_id, send_tracking_the_end, started
            )
            finished = True
        except asyncio.CancelledError:
            if client_gone:
                task.uncancel()  # our own cancel: the client went away; nothing to answer
                self._count(choice.primary.deployment_id, 499)
                return
            raise
        finally:
            finished = True
            watcher.cancel()

    def _check_context(self, endpoint: str, body: dict[str, Any], upstream: Upstream) -> None:
        limit = upstream.max_context_tokens or self.settings.default_max_context_tokens
        if not limit:
            return
        at_least = int(prompt_chars(endpoint, body) / self.settings.chars_per_token_bound)
        wanted = body.get("max_tokens") or body.get("max_completion_tokens") or 0
        if at_least + wanted > limit:
            raise RequestError(
                400,
                f"this model's maximum context length is {limit} tokens; the prompt is at least "
                f"{at_least} tokens" + (f" plus {wanted} requested" if wanted else ""),
                code="context_length_exceeded",
            )

    def _upstream_body(self, body: dict[str, Any], raw: bytes, upstream: Upstream) -> bytes:
        target = upstream.upstream_model
        if target and target != body["model"]:
            return orjson.dumps({**body, "model": target})
        return raw

    async def _forward(
        self,
        endpoint: str,
        body: dict[str, Any],
        raw: bytes,
        choice: Choice,
        key: KeyInfo,
        user_key: str,
        trace_id: str,
        send: Send,
        started: float,
    ) -> None:
        stream: bool = body.get("stream", False)
        trace = trace_id.encode()
        deadline = started + self.settings.upstream_timeout_s
        attempts: list[tuple[Upstream, bool]] = [(choice.primary, choice.is_canary)]
        if choice.fallback is not None:
            attempts.append((choice.fallback, False))
        last_error: RequestError | None = None
        for index, (upstream, is_canary) in enumerate(attempts):
            if index > 0:
                if not upstream.breaker.allows():
                    break
                FAILOVERS.inc()
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                last_error = RequestError(504, "upstream deadline exceeded", kind="timeout")
                break
            step = choice.step if is_canary else -1
            try:
                captured = await self._attempt(
                    endpoint,
                    body,
                    raw,
                    upstream,
                    stream,
                    remaining,
                    trace,
                    send,
                    started,
                    step,
                    key,
                    user_key,
                    trace_id,
                )
            except UpstreamTimeout:
                last_error = RequestError(
                    504,
                    "the upstream did not answer before the deadline",
                    kind="timeout",
                    code="upstream_timeout",
                )
                self._outcome(upstream, step, ok=False, latency_ms=None)
                break
            except UpstreamFailed as exc:
                log.debug("upstream %s failed before first byte: %s", upstream.deployment_id, exc)
                self._outcome(upstream, step, ok=False, latency_ms=None)
                last_error = RequestError(
                    503,
                    "no deployment could answer; retry later",
                    kind="service_unavailable",
                    retry_after=self.settings.retry_after_s,
                )
                continue
            if captured is not None:
                self.state.capture_offer(captured)
            return
        assert last_error is not None
        await self._send_error(send, last_error, trace)

    def _outcome(
        self, upstream: Upstream, step: int, *, ok: bool, latency_ms: float | None
    ) -> None:
        if ok:
            upstream.breaker.success()
        else:
            upstream.breaker.failure()
        self.state.record_outcome(upstream.deployment_id, step, ok, latency_ms)

    async def _attempt(
        self,
        endpoint: str,
        body: dict[str, Any],
        raw: bytes,
        upstream: Upstream,
        stream: bool,
        remaining: float,
        trace: bytes,
        send: Send,
        started: float,
        step: int,
        key: KeyInfo,
        user_key: str,
        trace_id: str,
    ) -> CaptureRecord | None:
        """One upstream call. Raises UpstreamFailed/UpstreamTimeout only before the first byte
        was sent to the client; from then on, this attempt owns the response."""
        url = upstream.base_url + SUFFIX[endpoint]
        headers = {
            "Content-Type": "application/json",
            "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01",
        }
        timeout = (
            self._timeout_stream
            if stream
            else aiohttp.ClientTimeout(
                total=remaining, connect=self.settings.upstream_connect_timeout_s
            )
        )
        t0 = time.perf_counter()
        try:
            resp = await upstream.session.post(
                url,
                data=self._upstream_body(body, raw, upstream),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,  # a proxy passes redirects on, it never follows them
            )
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamFailed(f"connect timeout: {exc!r}") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(repr(exc)) from exc
        try:
            if resp.status >= 500:
                await _drain(resp)
                raise UpstreamFailed(f"HTTP {resp.status}")
            if not stream or resp.status != 200:
                try:
                    data = await resp.read()
                except TimeoutError as exc:
                    raise UpstreamTimeout() from exc
                except (aiohttp.ClientError, OSError) as exc:
                    raise UpstreamFailed(repr(exc)) from exc
                latency_ms = (time.perf_counter() - t0) * 1000.0
                self._outcome(upstream, step, ok=True, latency_ms=latency_ms)
                self._observe(upstream.deployment_id, latency_ms / 1000.0)
                await send(
                    {
                        "type": "http.response.start",
                        "status": resp.status,
                        "headers": [
                            (
                                b"content-type",
                                resp.headers.get("Content-Type", "").encode() or JSON,
                            ),
                            (b"content-length", str(len(data)).encode()),
                            (H_DEPLOYMENT, upstream.deployment_id_header),
                            (H_MODEL, upstream.model_id.encode()),
                            (H_TRACE, trace),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": data})
                self._count(upstream.deployment_id, resp.status)
                if resp.status != 200:
                    return None
                return self._record(
                    endpoint, body, data, False, upstream, key, user_key, 200, started, trace_id
                )
            return await self._stream(
                endpoint,
                body,
                resp,
                upstream,
                step,
                t0,
                trace,
                send,
                started,
                key,
                user_key,
                trace_id,
            )
        finally:
            # A fully read answer gives its connection back to the pool; anything cut short
            # (client gone, mid-stream failure) closes it, which aborts the upstream request.
            if resp.content.at_eof():
                resp.release()
            else:
                resp.close()

    async def _stream(
        self,
        endpoint: str,
        body: dict[str, Any],
        resp: aiohttp.ClientResponse,
        upstream: Upstream,
        step: int,
        t0: float,
        trace: bytes,
        send: Send,
        started: float,
        key: KeyInfo,
        user_key: str,
        trace_id: str,
    ) -> CaptureRecord | None:
        content = resp.content
        try:
            first = await content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeout() from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamFailed(repr(exc)) from exc
        if not first:
            raise UpstreamFailed("the stream ended before its first byte")
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self._observe(upstream.deployment_id, latency_ms / 1000.0)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (
                        b"content-type",
                        resp.headers.get("Content-Type", "text/event-stream").encode(),
                    ),
                    (b"cache-control", b"no-cache"),
                    (H_DEPLOYMENT, upstream.deployment_id_header),
                    (H_MODEL, upstream.model_id.encode()),
                    (H_TRACE, trace),
                ],
            }
        )
        # From here on the client has bytes: no retry, only an error event on failure.
        chunks = [first]
        size = len(first)
        keep = self.settings.capture_max_text_chars * 8
        await send({"type": "http.response.body", "body": first, "more_body": True})
        status = 200
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                if size < keep:
                    chunks.append(chunk)
                    size += len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status = 502
            message = (
                "the upstream stopped sending (idle timeout)"
                if isinstance(exc, TimeoutError)
                else "the upstream failed mid-stream"
            )
            log.warning("stream from %s broke: %r", upstream.deployment_id, exc)
            event = (
                b"data: " + error_body(message, "upstream_error", "stream_interrupted") + b"\n\n"
            )
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        self._outcome(upstream, step, ok=status == 200, latency_ms=latency_ms)
        self._count(upstream.deployment_id, status)
        return self._record(
            endpoint, body, chunks, True, upstream, key, user_key, status, started, trace_id
        )

    def _record(
        self,
        endpoint: str,
        body: dict[str, Any],
        data: bytes | list[bytes],
        stream: bool,
        upstream: Upstream,
        key: KeyInfo,
        user_key: str,
        status: int,
        started: float,
        trace_id: str,
    ) -> CaptureRecord | None:
        if not self.state.wants_capture(key):
            return None
        return CaptureRecord(
            endpoint=endpoint,
            request=body,
            body=data,
            stream=stream,
            served_model_name=body["model"],
            deployment_id=upstream.deployment_id,
            model_id=upstream.model_id,
            key_id=key.key_id,
            key_tpm=key.tpm,
            user_hash=user_hash(user_key),
            status_code=status,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            trace_id=trace_id,
        )


async def _drain(resp: aiohttp.ClientResponse) -> None:
    try:
        await resp.read()
    except Exception:
        resp.close()
