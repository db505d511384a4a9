"""``tuneloop train --dry-run`` and its refusals, on ingest's on-disk dataset layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.trainer.training.config import adapter_id_for, resolve_config
from tests.integration.trainer.dataset import json_task, jsonl

pytestmark = pytest.mark.integration


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    records = json_task(12)
    root = tmp_path / "ds"
    root.mkdir()
    (root / "train.jsonl").write_bytes(jsonl(records))
    ids = [r["id"] for r in records]
    for phase, sel in (("A", ids[:4]), ("B", ids)):
        (root / f"curriculum-{phase}.json").write_text(
            json.dumps({"phase": phase, "description": phase, "seed": 1, "record_ids": sel})
        )
    return root


def invoke(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from shared.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def test_dry_run_prints_the_plan(dataset_dir: Path, models_dir: Path) -> None:
    result = invoke(
        "train",
        str(dataset_dir),
        "--profile",
        "cpu-tiny",
        "--base-model",
        "tiny",
        "--set",
        "max_steps_per_phase=5",
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    config = resolve_config("cpu-tiny", overrides={"max_steps_per_phase": 5})
    assert plan["adapter_id"] == adapter_id_for(plan["dataset_id"], "tiny", config)
    assert plan["config_hash"] == config.config_hash()
    assert plan["phases"] == [{"phase": "A", "records": 4}, {"phase": "B", "records": 12}]
    assert Path(plan["base_model_path"], "config.json").exists()

    one = invoke(
        "train",
        str(dataset_dir),
        "--profile",
        "cpu-tiny",
        "--base-model",
        "tiny",
        "--phase",
        "B",
        "--dry-run",
    )
    assert one.exit_code == 0, one.output
    assert json.loads(one.stdout)["phases"] == [{"phase": "B", "records": 12}]


def test_refusals(dataset_dir: Path, tmp_path: Path) -> None:
    forbidden = invoke(
        "train",
        str(dataset_dir),
        "--profile",
        "cpu-tiny",
        "--method",
        "lora",
        "--dry-run",
        env={"TRAINER_FORBIDDEN_METHODS": '["lora"]'},
    )
    assert forbidden.exit_code == 2
    assert "forbidden" in forbidden.output
    hostile = invoke("train", str(dataset_dir), "--set", "r=-1", "--dry-run")
    assert hostile.exit_code == 2
    assert invoke("train", str(dataset_dir), "--phase", "../../A", "--dry-run").exit_code == 2
    assert invoke("train", str(tmp_path / "nope"), "--dry-run").exit_code == 2
    (dataset_dir / "train.jsonl").write_bytes(b'{"id": "x", "messages": "hi"}\n')
    bad = invoke("train", str(dataset_dir), "--profile", "cpu-tiny", "--dry-run")
    assert bad.exit_code == 2
    assert "'messages' must be" in " ".join(bad.output.split())
    assert invoke("train-cancel", "'; DROP TABLE trainer_jobs; --").exit_code == 2


def test_spec_option_resolves_like_the_service(dataset_dir: Path, tmp_path: Path) -> None:
    from services.trainer.handlers import make_plan
    from services.trainer.settings import TrainerSettings
    from shared.events import TrainingSpec

    spec = {"method": "lora", "overrides": {"r": 4, "max_steps_per_phase": 3}}
    common = ("train", str(dataset_dir), "--profile", "cpu-tiny", "--base-model", "tiny")
    result = invoke(*common, "--set", "r=8", "--spec", json.dumps(spec), "--dry-run")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["training_spec"]["method"] == "lora"
    # The spec wins over --set, as a DatasetReady's spec wins over TRAINER_OVERRIDES.
    assert (plan["config"]["r"], plan["config"]["method"]) == (4, "lora")
    expected = make_plan(
        plan["dataset_id"],
        TrainerSettings(profile="cpu-tiny", base_model="tiny", overrides={"r": 8}),
        spec=TrainingSpec(**spec),  # type: ignore[arg-type]
    )
    assert plan["adapter_id"] == expected.adapter_id
    # The same spec from a file.
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    from_file = invoke(*common, "--set", "r=8", "--spec", str(path), "--dry-run")
    assert json.loads(from_file.stdout)["adapter_id"] == plan["adapter_id"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ('{"base_model": "/etc"}', "is not allowed on this trainer"),
        ('{"base_model": "org/model"}', "is not allowed on this trainer"),
        ('{"overrides": {"batch_size": 1000}}', "batch_size=1000 is over the limit 256"),
        ('{"overrides": {"lr": 0.1}}', "unknown training setting"),
        ('{"method": "sgd"}', "not a valid TrainingSpec"),
        ('{"overrides": ', "not a valid TrainingSpec"),
        ("/no/such/spec.json", "not JSON text nor a JSON file"),
    ],
)
def test_spec_option_refusals(dataset_dir: Path, spec: str, message: str) -> None:
    result = invoke("train", str(dataset_dir), "--profile", "cpu-tiny", "--spec", spec, "--dry-run")
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
