"""``tuneloop train``: the trainer's work without the bus, on a local dataset directory.

The directory is what ingest writes: ``train.jsonl`` (chat records) and optionally
``curriculum-A.json`` / ``-B`` / ``-C``. The same planning, checks and worker as the service;
re-running the same command resumes from its checkpoints.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from shared.events import TrainingSpec

PHASES = ("A", "B", "C")


def _dataset_id(train: Path) -> str:
    digest = hashlib.sha256()
    with train.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"ds-{digest.hexdigest()[:20]}"


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise typer.BadParameter(f"--set {item!r}: use KEY=VALUE (VALUE as JSON or text)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _parse_spec(text: str) -> TrainingSpec:
    """``--spec``: JSON text, or the path of a JSON file (at most 64 KiB)."""
    from shared.events import TrainingSpec

    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file() or path.stat().st_size > 64 * 1024:
            raise ValueError(f"--spec {text[:200]!r}: not JSON text nor a JSON file (<= 64 KiB)")
        source = path.read_text()
    try:
        return TrainingSpec.model_validate_json(source)
    except ValueError as exc:
        raise ValueError(f"--spec is not a valid TrainingSpec: {exc}") from exc


class _DatabaseOnly:
    """Enough of a runtime for job updates that emit nothing (the CLI has no outbox relay)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def transaction(self) -> Any:
        return self.db.session()

    def emit(self, session: Any, event: Any) -> None:
        raise RuntimeError("the CLI does not emit events")


def register(app: typer.Typer) -> None:
    @app.command("train-cancel")
    def train_cancel(
        adapter_id: Annotated[str, typer.Argument(help="The adapter id of a running job.")],
    ) -> None:
        """Ask the trainer to stop a running job cleanly (it checkpoints and emits a
        retryable TrainingFailed)."""
        import re

        from services.trainer.jobs import SqlJobs
        from shared.db import Database
        from shared.settings import CommonSettings

        if not re.fullmatch(r"adp-[0-9a-f]{20}", adapter_id):
            raise typer.BadParameter(f"{adapter_id!r} is not an adapter id")

        async def go() -> bool:
            db = Database(CommonSettings().resolved_database_url)
            try:
                return await SqlJobs(_DatabaseOnly(db)).request_cancel(adapter_id)
            finally:
                await db.dispose()

        if not asyncio.run(go()):
            typer.echo(f"{adapter_id} is not running")
            raise typer.Exit(1)
        typer.echo(f"cancellation of {adapter_id} requested")

    @app.command()
    def train(
        dataset_dir: Annotated[
            Path, typer.Argument(help="Directory with train.jsonl [and curriculum-A/B/C.json].")
        ],
        profile: Annotated[
            str | None, typer.Option(help="h100, cpu-tiny or cpu-smol (default: TRAINER_PROFILE).")
        ] = None,
        method: Annotated[
            str | None, typer.Option(help="dora, qdora, lora or qlora (default: the profile's).")
        ] = None,
        phase: Annotated[
            list[str] | None, typer.Option("--phase", help="Train only this phase (repeatable).")
        ] = None,
        base_model: Annotated[
            str | None, typer.Option(help="tiny, smollm2-135m-instruct or a checkpoint path.")
        ] = None,
        overrides: Annotated[
            list[str] | None,
            typer.Option(
                "--set", help="Override a config field, e.g. --set max_steps_per_phase=20"
            ),
        ] = None,
        spec_text: Annotated[
            str | None,
            typer.Option(
                "--spec",
                help="A TrainingSpec as a DatasetReady would carry it (JSON text or a .json "
                'file), e.g. \'{"method": "lora", "overrides": {"r": 8}}\'; applied over the '
                "other options and checked as the service checks it.",
            ),
        ] = None,
        out: Annotated[
            Path | None, typer.Option(help="Where the adapter goes (default ./adapters/<id>).")
        ] = None,
        work_dir: Annotated[
            Path | None, typer.Option(help="Checkpoints and logs (default under TUNELOOP_HOME).")
        ] = None,
        dry_run: Annotated[
            bool,
            typer.Option("--dry-run", help="Resolve the config, check data and model, print."),
        ] = False,
    ) -> None:
        """Train an adapter on a local dataset directory (no broker, no database)."""
        from rich.console import Console
        from rich.markup import escape

        from services.trainer.handlers import (
            local_base_model,
            make_plan,
            worker_spec,
            write_phase,
        )
        from services.trainer.settings import TrainerSettings
        from services.trainer.training.config import ConfigError, Layer
        from services.trainer.training.data import DataError, plan_phases, read_records
        from services.trainer.training.runner import run_worker
        from shared.settings import CommonSettings

        console = Console(stderr=True)
        train_path = dataset_dir / "train.jsonl"
        if not train_path.is_file():
            raise typer.BadParameter(f"{train_path} does not exist")
        for p in phase or []:
            if p not in PHASES:
                raise typer.BadParameter(f"--phase {p!r}: one of {PHASES}")
        base = TrainerSettings()
        updates: dict[str, Any] = {}
        if profile:
            updates["profile"] = profile
        if base_model:
            updates["base_model"] = base_model
        flags = Layer("the command line", _parse_overrides(overrides or []), method)
        try:
            training = _parse_spec(spec_text) if spec_text else None
            settings = TrainerSettings(**{**base.model_dump(), **updates})
            dataset_id = _dataset_id(train_path)
            plan = make_plan(
                dataset_id, settings, spec=training, layers=[flags], phases=phase or None
            )
            records = read_records(train_path, source=str(train_path))
            manifests = {
                p: (dataset_dir / f"curriculum-{p}.json").read_bytes()
                for p in PHASES
                if (dataset_dir / f"curriculum-{p}.json").is_file()
            }
            phases = plan_phases(records, manifests, plan.config.phases)
        except (ConfigError, DataError, ValueError) as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(2) from exc
        try:
            base_path = local_base_model(plan.base_model)
        except Exception as exc:
            console.print(f"[red]{escape(f'base model {plan.base_model!r}: {exc}')}[/red]")
            raise typer.Exit(2) from exc
        summary = {
            "adapter_id": plan.adapter_id,
            "dataset_id": dataset_id,
            "base_model": plan.base_model,
            "base_model_path": base_path,
            "config_hash": plan.config.config_hash(),
            "config": plan.config.canonical(),
            "training_spec": training.model_dump(mode="json") if training else None,
            "phases": [{"phase": p.name, "records": len(p.records)} for p in phases],
        }
        if dry_run:
            typer.echo(json.dumps(summary, indent=1))
            return
        home = CommonSettings().home
        work = (work_dir or home / "trainer" / "cli") / plan.adapter_id
        data = work / "data"
        data.mkdir(parents=True, exist_ok=True)
        spec = worker_spec(
            work,
            plan,
            [write_phase(data, p) for p in phases],
            base_path,
            settings,
            dataset_id=dataset_id,
            train_records=len(records),
            metadata={"dataset_dir": str(dataset_dir.resolve())},
        )

        async def show(update: dict[str, Any]) -> None:
            kind = update.get("type")
            if kind == "step":
                console.print(
                    f"  {update['phase']} step {update['step']}: loss {update['loss']:.4f}"
                )
            elif kind in ("phase_start", "checkpoint", "resume", "phase_done"):
                console.print(f"[bold]{kind}[/bold] {json.dumps(update)}")

        outcome = asyncio.run(run_worker(spec, on_progress=show))
        if outcome.status != "done":
            console.print(f"[red]training {outcome.status}: {escape(outcome.reason)}[/red]")
            raise typer.Exit(1)
        target = out or Path("adapters") / plan.adapter_id
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(work / "adapter", target)
        console.print(f"[green]adapter {plan.adapter_id} written to {target}[/green]")
        typer.echo(json.dumps({**summary, "adapter_dir": str(target), **outcome.metadata}))
