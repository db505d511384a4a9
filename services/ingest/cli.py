"""``tuneloop ingest`` and ``tuneloop harvest``: the ingest service's work from a shell.

Both record the version and its event in the database (outbox) exactly as the service
does, then publish through the broker if it is reachable; if it is not, the running ingest
service's relay publishes the event later.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from shared.service import ServiceRuntime


async def _start(runtime: ServiceRuntime, console: Any) -> bool:
    await runtime.db.migrate()
    try:
        await asyncio.wait_for(runtime.bus.start(), timeout=10)
    except Exception as exc:
        console.print(
            f"[yellow]broker not reachable ({exc!r}); the event stays in the outbox and the "
            "ingest service will publish it[/yellow]"
        )
        return False
    return True


async def _finish(runtime: ServiceRuntime, connected: bool) -> None:
    if connected:
        await runtime.relay.drain()
        await runtime.bus.close()
    await runtime.db.dispose()


def register(app: typer.Typer) -> None:
    @app.command()
    def ingest(
        paths: Annotated[list[Path], typer.Argument(help="Corpus files (JSONL or JSON, .gz ok).")],
        name: Annotated[
            str | None,
            typer.Option("--name", help="Dataset line (default: INGEST_DEFAULT_DATASET_NAME)."),
        ] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Print the report; store and publish nothing.")
        ] = False,
        fmt: Annotated[
            str, typer.Option("--format", help="auto, alpaca, openai or sharegpt.")
        ] = "auto",
        domain: Annotated[
            str | None, typer.Option(help="Category for records that name none.")
        ] = None,
        target_records: Annotated[
            list[str] | None,
            typer.Option("--target-records", help="Records per curriculum phase, e.g. B=5000."),
        ] = None,
        near_dedupe: Annotated[bool, typer.Option(help="Near-duplicate detection.")] = True,
        report: Annotated[
            Path | None, typer.Option(help="Also write the full report (JSON) here.")
        ] = None,
        training: Annotated[
            str | None,
            typer.Option(
                "--training",
                help='Training spec for this run (JSON), e.g. \'{"method": "lora", '
                '"overrides": {"learning_rate": 0.001}}\'. The same data with another spec '
                "is the same version, announced again (a retrain).",
            ),
        ] = None,
    ) -> None:
        """Validate, scrub, deduplicate and split corpus files into a new dataset version
        (with curriculum manifests) and publish DatasetReady."""
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        from services.ingest.app import make_executor, parse_training, valid_name
        from services.ingest.handlers import IngestRequest, ingest_with_retry
        from services.ingest.pipeline.formats import FORMATS, SourceFile
        from services.ingest.pipeline.run import Pipeline
        from services.ingest.settings import IngestSettings

        console = Console(stderr=True)
        settings = IngestSettings()
        line = name or settings.default_dataset_name
        if not valid_name(line):
            raise typer.BadParameter(f"invalid dataset name {line!r}")
        if fmt not in ("auto", *FORMATS):
            raise typer.BadParameter(f"--format must be auto or one of {FORMATS}")
        try:
            training_spec = parse_training(training)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--training") from None
        for path in paths:
            if not path.is_file():
                raise typer.BadParameter(f"{path} is not a file")
        targets: dict[str, int] = {}
        for spec in target_records or []:
            phase, _, count = spec.partition("=")
            if phase not in ("A", "B", "C") or not count.isdigit():
                raise typer.BadParameter(f"--target-records {spec!r}: use A=N, B=N or C=N")
            targets[phase] = int(count)
        config = settings.processing.with_overrides(
            {"near_dedupe": near_dedupe, **({"target_records": targets} if targets else {})}
        )
        sources = [SourceFile(p, p.name, fmt, domain=domain) for p in paths]  # type: ignore[arg-type]
        executor = make_executor(settings)
        try:
            with Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                TextColumn("{task.completed:,} records"),
                TimeElapsedColumn(),
                console=console,
            ) as bar:
                task = bar.add_task(f"ingesting into {line}", total=None)

                def progress(n: int) -> None:
                    bar.advance(task, n)

                if dry_run:
                    import tempfile

                    with tempfile.TemporaryDirectory(prefix="tuneloop-ingest-") as tmp:
                        pipeline = Pipeline(
                            config, dataset_name=line, executor=executor, progress=progress
                        )
                        full = pipeline.run(sources, workdir=Path(tmp)).report
                        summary: dict[str, Any] = {"status": "dry_run", "report": full}
                else:
                    from shared.service import ServiceRuntime

                    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
                        runtime = ServiceRuntime("ingest")
                        connected = await _start(runtime, console)
                        try:
                            outcome = await ingest_with_retry(
                                IngestRequest(
                                    files=sources,
                                    dataset_name=line,
                                    config=config,
                                    training=training_spec,
                                ),
                                ports=runtime,
                                settings=settings,
                                executor=executor,
                                progress=progress,
                            )
                        finally:
                            await _finish(runtime, connected)
                        return outcome.summary(), outcome.report

                    summary, full = asyncio.run(go())
        finally:
            if executor is not None:
                executor.shutdown()
        if report:
            report.write_text(json.dumps(full, indent=2))
        typer.echo(json.dumps(summary if not dry_run else full, indent=2))
        if summary.get("status") == "rejected":
            raise typer.Exit(1)

    @app.command()
    def harvest() -> None:
        """Harvest good production interactions into a new dataset version now (if at least
        INGEST_HARVEST_MIN_EXAMPLES new ones exist)."""
        from rich.console import Console

        from services.ingest.app import make_executor
        from services.ingest.handlers import harvest as run_harvest
        from services.ingest.settings import IngestSettings
        from shared.service import ServiceRuntime

        console = Console(stderr=True)
        settings = IngestSettings()
        executor = make_executor(settings)

        async def go() -> dict[str, Any]:
            runtime = ServiceRuntime("ingest")
            connected = await _start(runtime, console)
            try:
                result = await run_harvest(ports=runtime, settings=settings, executor=executor)
            finally:
                await _finish(runtime, connected)
            return {
                "status": result.status,
                "eligible": result.eligible,
                "scanned": result.scanned,
                "dataset_id": result.ingest.dataset_id if result.ingest else None,
                "run_id": result.ingest.run_id if result.ingest else None,
            }

        try:
            typer.echo(json.dumps(asyncio.run(go()), indent=2))
        finally:
            if executor is not None:
                executor.shutdown()
