"""``tuneloop quantize``: run the quantizer on one adapter, without the bus."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        adapter: Annotated[
            str, typer.Argument(help="Adapter directory, or a store URI (file:// or gs://).")
        ],
        base_model: Annotated[
            str, typer.Option("--base-model", help="tiny, smollm2-135m-instruct or a path.")
        ],
        validation: Annotated[
            Path, typer.Option(help="Validation split (chat-record JSONL) for the gate.")
        ],
        target: Annotated[
            list[str] | None,
            typer.Option(
                "--target",
                help="bf16-merged, awq-w4a16, gptq-w4a16, gguf-q4_k_m or adapter (repeatable).",
            ),
        ] = None,
        out: Annotated[Path, typer.Option(help="Where the artifacts go.")] = Path("quantized"),
        max_ppl_increase: Annotated[
            float | None, typer.Option(help="Gate: allowed relative perplexity increase.")
        ] = None,
        sha256: Annotated[
            str | None, typer.Option(help="With a URI: the adapter manifest's sha256.")
        ] = None,
        size_bytes: Annotated[
            int | None, typer.Option(help="With a URI: the adapter manifest's size.")
        ] = None,
    ) -> None:
        """Merge an adapter into its base, quantize it to each target, and gate each on
        validation perplexity. Exits 1 if any target was rejected or failed."""
        from rich.console import Console
        from rich.table import Table

        from services.quantizer.quantization.pipeline import JobError, run_job
        from services.quantizer.settings import QuantizerSettings
        from shared.basemodels import resolve_base_model

        console = Console(stderr=True)
        overrides = {} if max_ppl_increase is None else {"max_ppl_increase": max_ppl_increase}
        settings = QuantizerSettings(**overrides)  # type: ignore[arg-type]
        targets = target or settings.targets_for(base_model)
        adapter_dir = _local_adapter(adapter, sha256, size_bytes)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tuneloop-quantize-") as tmp:
            try:
                report = run_job(
                    base_dir=resolve_base_model(base_model),
                    base_model=base_model,
                    adapter_dir=adapter_dir,
                    validation=validation,
                    targets=targets,
                    work_dir=Path(tmp),
                    settings=settings.job_settings(),
                    on_progress=lambda msg: console.print(f"[dim]{msg}[/dim]"),
                )
            except JobError as exc:
                console.print(f"[red]quantization failed:[/red] {exc.reason}")
                raise typer.Exit(2) from exc
            for result in report.targets:
                if result.output_dir is not None:
                    dest = out / result.format
                    shutil.rmtree(dest, ignore_errors=True)
                    shutil.copytree(result.output_dir, dest)
        (out / "quantization_report.json").write_text(json.dumps(report.as_dict(), indent=1))
        table = Table(title=f"merged perplexity {report.merged_perplexity:.4f}")
        for col in ("target", "status", "ppl after", "Δ", "MB", "s"):
            table.add_column(col)
        for r in report.targets:
            table.add_row(
                r.format,
                r.status,
                "-" if r.perplexity_after is None else f"{r.perplexity_after:.4f}",
                "-" if r.relative_increase is None else f"{r.relative_increase:+.2%}",
                "-" if r.size_bytes is None else f"{r.size_bytes / 1e6:.2f}",
                f"{r.seconds:.1f}",
            )
            if r.reason:
                console.print(f"[yellow]{r.reason}[/yellow]")
        Console().print(table)
        console.print(f"artifacts and quantization_report.json in {out}")
        if any(r.status != "accepted" for r in report.targets):
            raise typer.Exit(1)


def _local_adapter(adapter: str, sha256: str | None, size_bytes: int | None) -> Path:
    if not adapter.startswith(("file://", "gs://")):
        path = Path(adapter)
        if not path.is_dir():
            raise typer.BadParameter(f"{adapter} is not a directory")
        return path
    if sha256 is None or size_bytes is None:
        raise typer.BadParameter("a store URI needs --sha256 and --size-bytes (from its event)")
    import asyncio

    from shared.events import ArtifactRef
    from shared.settings import CommonSettings
    from shared.storage import ArtifactStore

    common = CommonSettings()
    store = ArtifactStore.from_url(
        common.resolved_artifact_store_url, cache_dir=common.home / "cache" / "quantizer"
    )
    ref = ArtifactRef(uri=adapter, sha256=sha256, size_bytes=size_bytes)
    return asyncio.run(store.fetch_dir(ref))
