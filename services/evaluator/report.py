"""``benchmark_results.json``: what a run measured, the verdict, the baseline and every
item's output (bounded), uploaded to the artifact store."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from services.evaluator.gate import Verdict
from services.evaluator.runner import ItemResult, RunResult, RunSummary
from shared.db import utcnow
from shared.events import ArtifactRef, ModelDeployed
from shared.storage import ArtifactStore

REPORT_NAME = "benchmark_results.json"
# Outputs are kept whole for scoring (up to max_output_chars) but cut in the report.
REPORT_OUTPUT_CHARS = 4000


def deployment_report(
    event: ModelDeployed,
    result: RunResult,
    verdict: Verdict | None,
    baseline: tuple[str, RunSummary] | None,
    started_at: datetime,
    *,
    failure: str | None,
) -> dict[str, Any]:
    return build_report(
        result,
        deployment={
            "deployment_id": event.deployment_id,
            "model_id": event.model_id,
            "served_model_name": event.served_model_name,
            "endpoint": event.endpoint,
            "engine": event.engine,
            "run_id": event.run_id,
        },
        verdict=verdict,
        baseline=baseline,
        started_at=started_at,
        failure=failure,
    )


def build_report(
    result: RunResult,
    *,
    deployment: dict[str, Any],
    verdict: Verdict | None,
    baseline: tuple[str, RunSummary] | None,
    started_at: datetime,
    failure: str | None = None,
) -> dict[str, Any]:
    """``benchmark_results.json``: summary, verdict, baseline and every item's output."""
    bench = result.benchmark
    return {
        "benchmark": {
            "name": bench.name,
            "version": bench.version,
            "description": bench.description,
            "items": len(bench.items),
            "categories": bench.categories,
        },
        "deployment": deployment,
        "started_at": started_at.isoformat(),
        "finished_at": utcnow().isoformat(),
        "summary": result.summary().model_dump(),
        "gate": (
            {"passed": verdict.passed, "reasons": verdict.reasons, "failures": verdict.failures}
            if verdict
            else None
        ),
        "baseline": (
            {"deployment_id": baseline[0], "summary": baseline[1].model_dump()}
            if baseline
            else None
        ),
        "failure": failure,
        "results": [_report_item(it) for it in result.items],
    }


def _report_item(item: ItemResult) -> dict[str, Any]:
    data = item.to_dict()
    if len(item.output) > REPORT_OUTPUT_CHARS:
        data["output"] = item.output[:REPORT_OUTPUT_CHARS]
        data["output_truncated"] = True
    return data


async def upload_report(store: ArtifactStore, report: dict[str, Any]) -> ArtifactRef:
    data = json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8", errors="replace")
    return await store.put_bytes(data, kind="evaluations", name=REPORT_NAME)
