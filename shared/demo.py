"""``tuneloop demo``: the whole loop on this machine, proving fine-tuning helps (or that the gate
refuses a model that does not).

1. generate the demo task (:mod:`shared.demotask`): a train corpus and a disjoint benchmark;
2. upload the corpus to ingest (HTTP) → a new run;
3. while the run travels (DatasetReady → TrainingDone → AdapterQuantized → ModelDeployed →
   EvaluationCompleted → canary), send production-like traffic through the gateway with the
   official ``openai`` client, with feedback on each answer (material for the harvester);
4. print every stage as it happens, then the base model's score beside the fine-tuned one's,
   and what the gate and the canary decided, and why.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from shared.aio import wait_set
from shared.events import (
    AdapterQuantized,
    DatasetReady,
    DatasetRejected,
    EvaluationCompleted,
    Event,
    ModelDeployed,
    RolloutChanged,
    StageFailed,
    TrainingDone,
)
from shared.runs import parse_stream_message
from shared.subjects import Namespace
from shared.supervisor import Embedded

# Per base model: the environment that makes the services do the demo's work at demo scale.
BASE_ENV: dict[str, dict[str, str]] = {
    "tiny": {
        "TRAINER_BASE_MODEL": "tiny",
        "TRAINER_PROFILE": "cpu-tiny",
        # The recipe that taught the tiny model the JSON format (DESIGN.md): ~300 steps of 16.
        # Padded beats packed on this CPU for the tiny model (bench/trainer.py).
        "TRAINER_OVERRIDES": '{"max_steps_per_phase": 100, "batch_size": 16, "packing": false}',
        # One torch thread: two spin against the engine on 2 cores (20 steps: 1.4 s vs 46 s).
        "TRAINER_THREADS": "1",
        "INFERENCE_BASELINE_MODEL": "tiny",
    },
    "smollm2": {
        "TRAINER_BASE_MODEL": "smollm2-135m-instruct",
        "TRAINER_PROFILE": "cpu-smol",
        "INFERENCE_BASELINE_MODEL": "smollm2-135m-instruct",
    },
}
COMMON_ENV = {
    # The demo task's requests and answers are short: loosen ingest's length bounds.
    "INGEST_PROCESSING__MIN_INPUT_CHARS": "5",
    "INGEST_PROCESSING__MIN_OUTPUT_CHARS": "10",
    # The exact-duplicate check stays; near-dup would fold templated requests together.
    "INGEST_PROCESSING__NEAR_DEDUPE": "false",
    # This machine's CPU vLLM cannot serve W4A16: serve the merged model.
    "QUANTIZER_DEFAULT_TARGETS": '["bf16-merged"]',
    # Canary steps sized for a minute or two of demo traffic. Two engines share 2 cores here,
    # so latency swings: judge p95 on 20+ samples, with slack for a cold engine's first calls.
    "GATEWAY_CANARY_STEPS": "0.25,0.5,1.0",
    "GATEWAY_STEP_MIN_REQUESTS": "20",
    "GATEWAY_STEP_MIN_SECONDS": "5",
    "GATEWAY_SLO_MIN_SAMPLES": "20",
    "GATEWAY_SLO_P95_SLACK_MS": "3000",
    "GATEWAY_CONTROL_INTERVAL_S": "0.5",
    "GATEWAY_SYNC_INTERVAL_S": "0.5",
    "EVALUATOR_GATE_MIN_OVERALL": "0.5",
    "EVALUATOR_GATE_MIN_CATEGORY": "0.3",
    "EVALUATOR_GATE_MAX_MEAN_LATENCY_MS": "5000",
}


def demo_env(base: str) -> dict[str, str]:
    if base not in BASE_ENV:
        raise ValueError(f"unknown demo base model {base!r}; choose from {sorted(BASE_ENV)}")
    return {**COMMON_ENV, **BASE_ENV[base]}


@dataclass
class DemoResult:
    run_id: str
    events: list[Event] = field(default_factory=list)
    outcome: str = "timeout"
    requests_sent: int = 0
    request_errors: int = 0
    answered_by: dict[str, int] = field(default_factory=dict)
    client_key: str = ""
    gateway_url: str = ""
    # Seconds since the run was started (upload or publish) at which each event was seen.
    seen_at: list[float] = field(default_factory=list)
    supervisor_notes: list[str] = field(default_factory=list)

    def first(self, kind: type[Event]) -> Any:
        return next((e for e in self.events if isinstance(e, kind)), None)

    def last(self, kind: type[Event]) -> Any:
        return next((e for e in reversed(self.events) if isinstance(e, kind)), None)


def describe(event: Event) -> str:
    """One line a person reads as the run moves."""
    if isinstance(event, DatasetReady):
        return (
            f"ingest     DatasetReady      {event.counts.train} train / "
            f"{event.counts.validation} validation records, dataset {event.dataset_id}"
        )
    if isinstance(event, TrainingDone):
        phases = ", ".join(
            f"{p.phase}: loss {p.final_loss:.3f}" if p.final_loss is not None else p.phase
            for p in event.phases
        )
        return f"trainer    TrainingDone      {event.method} adapter {event.adapter_id} ({phases})"
    if isinstance(event, AdapterQuantized):
        ppl = ""
        if event.perplexity_before is not None and event.perplexity_after is not None:
            ppl = f", perplexity {event.perplexity_before:.2f} → {event.perplexity_after:.2f}"
        return f"quantizer  AdapterQuantized  {event.format} {event.model_id}{ppl}"
    if isinstance(event, ModelDeployed):
        return (
            f"inference  ModelDeployed     {event.role} {event.deployment_id} on "
            f"{event.engine} at {event.endpoint}"
        )
    if isinstance(event, EvaluationCompleted):
        verdict = "PASSED" if event.passed else "REFUSED"
        return (
            f"evaluator  EvaluationCompleted {verdict} score {event.overall_score:.3f}, "
            f"p95 {event.latency.p95_ms:.0f} ms"
        )
    if isinstance(event, RolloutChanged):
        return (
            f"gateway    RolloutChanged    {event.action} {event.deployment_id} at "
            f"{event.weight:.0%} {event.reason}"
        )
    if isinstance(event, StageFailed):
        return f"{event.stage:<10} {type(event).__name__:<17} {event.reason}"
    return f"{event.stage:<10} {type(event).__name__}"


async def upload_corpus(ingest_url: str, corpus: Path, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=300) as client:
        with corpus.open("rb") as fh:
            response = await client.post(
                f"{ingest_url}/v1/datasets",
                data={"name": name, "format": "openai"},
                files={"file": (corpus.name, fh, "application/jsonl")},
            )
    if response.status_code not in (200, 201):
        raise RuntimeError(f"ingest refused the corpus ({response.status_code}): {response.text}")
    body: dict[str, Any] = response.json()
    return body


async def create_client_key(gateway_url: str, admin_key: str) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{gateway_url}/admin/keys",
            json={"name": "demo-traffic", "scopes": ["client"]},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
    response.raise_for_status()
    return str(response.json()["key"])


async def send_traffic(
    gateway_url: str,
    key: str,
    prompts: list[str],
    result: DemoResult,
    stop: asyncio.Event,
    *,
    model: str = "tuneloop",
    concurrency: int = 2,
    pause_s: float = 0.05,
    idle_pause_s: float = 2.0,
    system_prompt: str | None = None,
) -> None:
    """Production-like traffic through the gateway: many users, feedback on each answer."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0, timeout=60)
    rng = random.Random(7)

    async def one_user(worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            messages: list[dict[str, str]] = []
            if system_prompt:
                messages.append({"role": "system", "content": system_prompt})
            messages.append({"role": "user", "content": rng.choice(prompts)})
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=48,
                    temperature=0,
                    user=f"demo-user-{worker}-{n % 50}",
                )
                completion = raw.parse()
                deployment = raw.headers.get("x-tuneloop-deployment", "?")
                result.answered_by[deployment] = result.answered_by.get(deployment, 0) + 1
                text = completion.choices[0].message.content or ""
                rating = 1 if _is_json_object(text) else -1
                await client.post(
                    "/feedback",
                    cast_to=object,
                    body={"response_id": completion.id, "rating": rating},
                )
            except Exception:
                result.request_errors += 1
                await asyncio.sleep(0.5)
            result.requests_sent += 1
            # Until a candidate is in canary, a trickle: on a small machine the engine shares
            # the CPU with training. Then enough traffic for the canary steps to be decided.
            canary = any(isinstance(e, EvaluationCompleted) and e.passed for e in result.events)
            await asyncio.sleep(pause_s if canary else idle_pause_s)

    await asyncio.gather(*(one_user(i) for i in range(concurrency)))
    await client.close()


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


async def watch_run(
    nats_url: str,
    prefix: str,
    result: DemoResult,
    *,
    timeout_s: float,
    on_event: Callable[[Event], None],
    is_run: Callable[[Event], bool],
) -> None:
    """Follow the pipeline stream until the run is promoted, refused, rolled back or failed."""
    ns = Namespace(prefix)
    nc = await nats.connect(nats_url, connect_timeout=10, error_cb=_quiet)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(
            ns.all_subjects,
            stream=ns.stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=60),
        )
        deadline = time.monotonic() + timeout_s
        candidates: set[str] = set()
        while time.monotonic() < deadline:
            try:
                batch = await sub.fetch(50, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            for msg in batch:
                await msg.ack()
                event = parse_stream_message(msg.subject, msg.data, prefix)
                if event is None or not is_run(event):
                    continue
                result.events.append(event)
                on_event(event)
                if isinstance(event, ModelDeployed) and event.role == "candidate":
                    candidates.add(event.deployment_id)
                if isinstance(event, StageFailed | DatasetRejected):
                    result.outcome = f"failed at {event.stage}"
                    return
                if isinstance(event, EvaluationCompleted) and not event.passed:
                    result.outcome = "refused by the evaluation gate"
                    return
                if isinstance(event, RolloutChanged) and event.deployment_id in candidates:
                    if event.action == "promoted":
                        result.outcome = "promoted"
                        return
                    if event.action in ("rolled_back", "refused"):
                        result.outcome = event.action.replace("_", " ")
                        return
    finally:
        await nc.close()


async def _quiet(exc: Exception) -> None:
    """Reconnects are retried by the client; no traceback on the user's terminal."""


def scoreboard(result: DemoResult) -> list[str]:
    evaluation: EvaluationCompleted | None = result.last(EvaluationCompleted)
    lines = []
    if evaluation is None:
        return ["no evaluation happened: see the stage that failed above."]
    base = evaluation.baseline
    cats = sorted(set(evaluation.category_scores) | set(base.category_scores if base else {}))
    lines.append(f"{'':<22}{'base model':>12}{'fine-tuned':>12}")
    base_overall = f"{base.overall_score:.3f}" if base else "n/a"
    lines.append(f"{'overall':<22}{base_overall:>12}{evaluation.overall_score:>12.3f}")
    for cat in cats:
        b = f"{base.category_scores.get(cat, 0):.3f}" if base else "n/a"
        lines.append(f"{cat:<22}{b:>12}{evaluation.category_scores.get(cat, 0):>12.3f}")
    if base and base.latency:
        lines.append(
            f"{'p95 latency (ms)':<22}{base.latency.p95_ms:>12.0f}"
            f"{evaluation.latency.p95_ms:>12.0f}"
        )
    lines.append("")
    lines.append(
        f"gate: {'PASSED' if evaluation.passed else 'REFUSED'} — "
        + "; ".join(evaluation.reasons[:6])
    )
    return lines


StartRun = Callable[[Path], Awaitable[str]]


async def supervise(
    embedded: Embedded, stop: asyncio.Event, notes: list[str], say: Callable[[str], None]
) -> None:
    """Restart crashed services (with backoff) for as long as a run is being driven."""
    while not stop.is_set():
        for note in await asyncio.to_thread(embedded.supervise_once):
            notes.append(note)
            say(f"supervisor: {note}")
        await wait_set(stop, 0.5)


def remote_state(*, gateway_url: str, ingest_url: str, nats_url: str, home: Path) -> dict[str, Any]:
    """The demo's view of a system it did not start (``docker compose up``, a cluster)."""
    return {
        "home": str(home),
        "nats_url": nats_url,
        "urls": {"gateway": gateway_url.rstrip("/"), "ingest": ingest_url.rstrip("/")},
    }


def service_urls(state: dict[str, Any]) -> tuple[str, str]:
    """Ingest's and the gateway's base URLs, from ``Embedded.state()`` or :func:`remote_state`."""
    if "urls" in state:
        return state["urls"]["ingest"], state["urls"]["gateway"]
    services = state["services"]
    for needed in ("ingest", "gateway"):
        if needed not in services:
            raise RuntimeError(f"the demo needs the {needed} service")
    return (
        f"http://127.0.0.1:{services['ingest']['http_port']}",
        f"http://127.0.0.1:{services['gateway']['http_port']}",
    )


async def run_demo(
    state: dict[str, Any],
    embedded: Embedded | None,
    *,
    train_records: int = 600,
    timeout_s: float = 1800,
    say: Callable[[str], None] = print,
    admin_key: str | None = None,
    prefix: str = "tuneloop",
    start: StartRun | None = None,
    observe: Callable[[Event], Coroutine[Any, Any, None]] | None = None,
) -> DemoResult:
    """Drive one demo run on a started :class:`Embedded` system; returns what happened.

    ``start`` begins the run from the generated corpus's path and returns its run id (default:
    upload it to ingest over HTTP); ``observe`` is awaited with each event of the run as it is
    seen (fault-injection tests act on it). Crashed services are restarted meanwhile.
    """
    from shared import demotask
    from shared.settings import DEV_ADMIN_KEY

    ingest_url, gateway_url = service_urls(state)
    admin_key = admin_key or os.environ.get("TUNELOOP_ADMIN_KEY", DEV_ADMIN_KEY)
    corpus, _bench = demotask.write(Path(state["home"]) / "demo", n_train=train_records)
    # Production-like traffic from the train distribution (another seed): never the held-out
    # benchmark's prompts, which the harvester would otherwise feed into the next round.
    prompts = [
        next(m["content"] for m in r["messages"] if m["role"] == "user")
        for r in demotask.train_records(seed=99, n=200)
    ]
    started = time.monotonic()

    def stamp() -> str:
        return f"[{time.monotonic() - started:6.1f}s]"

    say(f"{stamp()} waiting for the base model to be served (vLLM start-up)...")
    key = await create_client_key(gateway_url, admin_key)
    await wait_for_stable(gateway_url, key, embedded, say=say, timeout_s=600)
    stop = asyncio.Event()
    notes: list[str] = []
    supervisor = asyncio.create_task(
        supervise(embedded, stop, notes, say) if embedded is not None else stop.wait()
    )
    try:
        if start is None:
            say(f"{stamp()} base model is serving; uploading {corpus.name}")
            upload = await upload_corpus(ingest_url, corpus, "demo")
            run_id = str(upload["run_id"])
            say(f"{stamp()} run {run_id}: {upload.get('records', {})}")
        else:
            say(f"{stamp()} base model is serving; starting the run")
            run_id = await start(corpus)
            say(f"{stamp()} run {run_id}")
    except BaseException:
        stop.set()
        await supervisor
        raise
    run_started = time.monotonic()
    result = DemoResult(run_id=run_id, supervisor_notes=notes)
    result.client_key = key
    result.gateway_url = gateway_url
    traffic = asyncio.create_task(
        send_traffic(gateway_url, key, prompts, result, stop, system_prompt=demotask.SYSTEM_PROMPT)
    )
    pending: set[asyncio.Task[None]] = set()

    def on_event(event: Event) -> None:
        result.seen_at.append(time.monotonic() - run_started)
        say(f"{stamp()} {describe(event)}")
        if observe is not None:
            task = asyncio.create_task(observe(event))
            pending.add(task)
            task.add_done_callback(pending.discard)

    try:
        await watch_run(
            state["nats_url"],
            prefix,
            result,
            timeout_s=timeout_s,
            on_event=on_event,
            is_run=lambda e: e.run_id == result.run_id,
        )
    finally:
        stop.set()
        await asyncio.wait_for(traffic, 120)
        await supervisor
        if pending:
            await asyncio.wait(pending, timeout=60)
    say("")
    say(
        f"outcome: {result.outcome} after {time.monotonic() - started:.0f}s; "
        f"{result.requests_sent} requests through the gateway ({result.request_errors} errors), "
        f"answered by {result.answered_by}"
    )
    return result


async def wait_for_stable(
    gateway_url: str,
    key: str,
    embedded: Embedded | None,
    *,
    say: Callable[[str], None],
    timeout_s: float,
) -> None:
    """Until the gateway answers a chat request (the base model is deployed and routed)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < deadline:
            for note in embedded.supervise_once() if embedded is not None else []:
                say(note)
            try:
                response = await client.post(
                    f"{gateway_url}/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}"},
                    json={
                        "model": "tuneloop",
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(2)
    raise TimeoutError(
        "the base model was not served through the gateway in time; "
        "see the inference and gateway logs under the run directory"
    )
