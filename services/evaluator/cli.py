"""``tuneloop eval``: benchmark any OpenAI-compatible server (vLLM, the gateway, a hosted API)
without the bus; ``tuneloop demotask``: write the demo task's train corpus and benchmark."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from services.evaluator.benchmark import (
    Benchmark,
    BenchmarkError,
    from_validation_split,
    load_benchmark,
)
from services.evaluator.gate import GateSettings, Verdict, decide
from services.evaluator.runner import RunOptions, RunResult, RunSummary, run_benchmark
from services.evaluator.settings import BENCHMARKS_DIR
from shared.db import utcnow

console = Console(stderr=True)


def _load(benchmark: Path, from_validation: bool, threshold: float) -> Benchmark:
    try:
        if from_validation:
            return from_validation_split(
                benchmark.read_bytes(), name=benchmark.stem or "validation", threshold=threshold
            )
        return load_benchmark(benchmark)
    except (BenchmarkError, OSError) as exc:
        console.print(f"[red]cannot use benchmark {benchmark}:[/red] {exc}")
        raise typer.Exit(2) from exc


def render_summary(summary: RunSummary, baseline: RunSummary | None) -> Table:
    table = Table(title=f"{summary.benchmark} ({summary.items} items)")
    table.add_column("category")
    table.add_column("items", justify="right")
    table.add_column("score", justify="right")
    if baseline:
        table.add_column("baseline", justify="right")
    for cat, score in summary.category_scores.items():
        row = [cat, str(summary.category_counts[cat]), f"{score:.3f}"]
        if baseline:
            base = baseline.category_scores.get(cat)
            row.append("-" if base is None else f"{base:.3f}")
        table.add_row(*row)
    overall = ["overall", str(summary.items), f"{summary.overall_score:.3f}"]
    if baseline:
        overall.append(f"{baseline.overall_score:.3f}")
    table.add_row(*overall, style="bold")
    return table


def summary_line(summary: RunSummary) -> str:
    lat = summary.latency
    return (
        f"latency ms: p50 {lat.p50_ms:.0f}  p95 {lat.p95_ms:.0f}  p99 {lat.p99_ms:.0f}  "
        f"mean {lat.mean_ms:.0f}\n{summary.tokens_per_second:.1f} tokens/s, "
        f"{summary.errors} errors, {summary.wall_s:.1f} s"
    )


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate(
        endpoint: Annotated[
            str | None,
            typer.Option(help="OpenAI-compatible base URL (http://host:port or .../v1)."),
        ] = None,
        model: Annotated[str, typer.Option(help="Model name to request.")] = "tuneloop",
        benchmark: Annotated[
            Path, typer.Option(help="Benchmark file (JSON or JSONL).")
        ] = BENCHMARKS_DIR / "demotask.json",
        from_validation: Annotated[
            bool,
            typer.Option(help="BENCHMARK is a dataset validation split: score by similarity."),
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Validate the benchmark; send nothing.")
        ] = False,
        baseline_endpoint: Annotated[
            str | None, typer.Option(help="Also run the stable deployment and compare.")
        ] = None,
        baseline_model: Annotated[str | None, typer.Option()] = None,
        concurrency: int = 8,
        timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 60.0,
        retries: int = 2,
        max_tokens: int = 128,
        max_items: Annotated[int, typer.Option(help="0 = all; else a seeded sample.")] = 0,
        seed: int = 0,
        min_overall: float = 0.80,
        min_category: float = 0.70,
        max_latency_ms: Annotated[float, typer.Option(help="Mean latency SLO.")] = 2000.0,
        max_regression: float = 0.02,
        output: Annotated[Path, typer.Option(help="Where to write the report.")] = Path(
            "benchmark_results.json"
        ),
        api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY")] = None,
    ) -> None:
        """Run a benchmark against an OpenAI-compatible endpoint and apply the gate.

        Exit status: 0 passed, 1 gate failed, 2 bad benchmark/arguments, 3 unreachable."""
        bench = _load(benchmark, from_validation, 0.7).sample(max_items, seed)
        if dry_run:
            scorers: dict[str, int] = {}
            for item in bench.items:
                t = bench.scorer_for(item).type
                scorers[t] = scorers.get(t, 0) + 1
            typer.echo(
                json.dumps(
                    {
                        "benchmark": bench.name,
                        "version": bench.version,
                        "items": len(bench.items),
                        "categories": {
                            c: sum(1 for i in bench.items if i.category == c)
                            for c in bench.categories
                        },
                        "scorers": scorers,
                        "endpoint": endpoint,
                        "model": model,
                    },
                    indent=1,
                )
            )
            return
        if not endpoint:
            raise typer.BadParameter("--endpoint is required unless --dry-run")
        options = RunOptions(concurrency=concurrency, retries=retries, max_tokens=max_tokens)
        gate = GateSettings(
            min_overall=min_overall,
            min_category=min_category,
            max_mean_latency_ms=max_latency_ms,
            max_regression=max_regression,
        )
        started_at = utcnow()
        result, base = asyncio.run(
            _run_cli(
                bench,
                endpoint,
                model,
                baseline_endpoint,
                baseline_model or model,
                options=options,
                timeout_s=timeout,
                seed=seed,
                api_key=api_key,
            )
        )
        unreachable = result.unreachable()
        summary = result.summary()
        base_summary = base.summary() if base and not base.unreachable() else None
        verdict: Verdict | None = None if unreachable else decide(summary, base_summary, gate)
        _write_report(
            output, result, base_summary, verdict, endpoint, model, unreachable, started_at
        )
        console.print(render_summary(summary, base_summary))
        console.print(summary_line(summary))
        if unreachable:
            console.print(f"[red]{unreachable}[/red]")
            raise typer.Exit(3)
        assert verdict is not None
        colour = "green" if verdict.passed else "red"
        console.print(f"[{colour}]{'PASSED' if verdict.passed else 'FAILED'}[/{colour}]")
        for reason in verdict.reasons:
            console.print(f"  - {reason}")
        console.print(f"report: {output}")
        if not verdict.passed:
            raise typer.Exit(1)

    @app.command("demotask")
    def demotask(
        dest: Annotated[Path, typer.Argument(help="Folder for train.jsonl and benchmark.json.")],
        seed: int = 0,
        train: int = 1000,
        test: int = 40,
    ) -> None:
        """Write the demo task's train corpus (ingest format) and held-out benchmark."""
        from shared.demotask import write

        for path in write(dest, seed=seed, n_train=train, n_test=test):
            typer.echo(str(path))


async def _run_cli(
    bench: Benchmark,
    endpoint: str,
    model: str,
    baseline_endpoint: str | None,
    baseline_model: str,
    *,
    options: RunOptions,
    timeout_s: float,
    seed: int,
    api_key: str | None,
) -> tuple[RunResult, RunResult | None]:
    from services.evaluator.app import build_scoring
    from services.evaluator.client import OpenAIChatClient
    from services.evaluator.settings import EvaluatorSettings

    scoring = build_scoring(EvaluatorSettings(), bench)
    results: list[RunResult] = []
    for url, name in ((endpoint, model), (baseline_endpoint, baseline_model)):
        if url is None:
            continue
        async with OpenAIChatClient(
            url,
            name,
            timeout_s=timeout_s,
            seed=seed,
            api_key=api_key,
            pool_size=options.concurrency,
        ) as client:
            results.append(await run_benchmark(bench, client, scoring=scoring, options=options))
    return results[0], (results[1] if len(results) > 1 else None)


def _write_report(
    output: Path,
    result: RunResult,
    baseline: RunSummary | None,
    verdict: Verdict | None,
    endpoint: str,
    model: str,
    unreachable: str | None,
    started_at: datetime,
) -> None:
    from services.evaluator.report import build_report

    report = build_report(
        result,
        deployment={"endpoint": endpoint, "served_model_name": model},
        verdict=verdict,
        baseline=("baseline", baseline) if baseline else None,
        started_at=started_at,
        failure=unreachable,
    )
    output.write_text(json.dumps(report, indent=1, ensure_ascii=False), errors="replace")
