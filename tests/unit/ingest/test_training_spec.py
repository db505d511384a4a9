"""The training spec a request may carry: parsed strictly, passed on, never part of the
dataset version."""

from __future__ import annotations

import orjson
import pytest

from services.ingest.app import parse_training
from services.ingest.handlers import canonical_training, training_key
from shared.events import TrainingSpec


def test_a_valid_spec_is_parsed():
    spec = parse_training('{"method": "lora", "overrides": {"learning_rate": 0.001}}')
    assert spec == TrainingSpec(method="lora", overrides={"learning_rate": 0.001})
    assert parse_training(None) is None and parse_training("  ") is None


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("{not json", "invalid training spec"),
        ("[1, 2]", "invalid training spec"),
        ('{"method": "sgd"}', "method"),
        ('{"profile": "../../etc"}', "profile"),
        ('{"unknown_field": 1}', "unknown_field"),
        ('{"overrides": {"x": {"nested": 1}}}', "overrides"),
        (orjson.dumps({"overrides": {f"k{i}": i for i in range(65)}}).decode(), "overrides"),
        (orjson.dumps({"base_model": "m" * 501}).decode(), "base_model"),
        ('"\\u0000"', "invalid training spec"),
    ],
)
def test_malformed_hostile_and_oversized_specs_are_refused(raw: str, says: str):
    with pytest.raises(ValueError, match="invalid training spec") as info:
        parse_training(raw)
    assert says in str(info.value) and len(str(info.value)) <= 2000


def test_the_key_ignores_spelling_but_not_meaning():
    assert canonical_training(TrainingSpec()) is None
    assert training_key(None) == training_key(TrainingSpec())
    a = TrainingSpec(method="lora", overrides={"a": 1, "b": "x"})
    b = TrainingSpec.model_validate_json('{"overrides": {"b": "x", "a": 1}, "method": "lora"}')
    assert training_key(a) == training_key(b)
    assert training_key(a) != training_key(None)
    assert training_key(a) != training_key(TrainingSpec(method="dora", overrides=a.overrides))


def test_versions_made_before_specs_count_as_announced_without_one():
    import importlib.util
    from pathlib import Path

    import services.ingest

    path = Path(services.ingest.__file__).parent / "migrations" / "ingest_0003_dataset_runs.py"
    module_spec = importlib.util.spec_from_file_location("ingest_0003", path)
    assert module_spec and module_spec.loader
    migration = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(migration)
    assert training_key(None) == migration.NO_SPEC
