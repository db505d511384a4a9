from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.trainer.handlers import Plan, make_plan
from services.trainer.settings import TrainerSettings
from services.trainer.training.config import (
    PROFILES,
    ConfigError,
    ConfigLimits,
    adapter_id_for,
    resolve_config,
)
from shared.events import TrainingSpec


def test_h100_profile_is_the_seed_recipe() -> None:
    cfg = resolve_config("h100")
    assert (cfg.r, cfg.alpha, cfg.dropout) == (128, 256, 0.05)
    assert cfg.target_modules == "all-linear"
    assert (cfg.learning_rate, cfg.batch_size, cfg.grad_accum) == (2e-4, 16, 4)
    assert (cfg.max_length, cfg.epochs_per_phase, cfg.precision) == (2048, 2.0, "bf16")
    assert cfg.method == "dora" and cfg.use_dora and not cfg.quantized


def test_every_profile_resolves_for_every_method() -> None:
    for profile in PROFILES:
        for method in ("dora", "qdora", "lora", "qlora"):
            cfg = resolve_config(profile, method=method)
            assert cfg.method == method
            assert cfg.quantized == method.startswith("q")
            assert cfg.use_dora == method.endswith("dora")


def test_config_hash_is_stable_and_sensitive_to_every_change() -> None:
    a = resolve_config("cpu-tiny")
    assert a.config_hash() == resolve_config("cpu-tiny").config_hash()
    assert a.config_hash() != resolve_config("cpu-tiny", overrides={"r": 8}).config_hash()
    assert a.config_hash() != resolve_config("cpu-tiny", method="lora").config_hash()
    assert a.config_hash() != resolve_config("cpu-smol").config_hash()


def test_adapter_id_depends_on_dataset_base_model_and_config() -> None:
    cfg = resolve_config("cpu-tiny")
    first = adapter_id_for("ds-1", "tiny", cfg)
    assert first == adapter_id_for("ds-1", "tiny", resolve_config("cpu-tiny"))
    assert first.startswith("adp-") and len(first) == 24
    assert first != adapter_id_for("ds-2", "tiny", cfg)
    assert first != adapter_id_for("ds-1", "smollm2-135m-instruct", cfg)
    assert first != adapter_id_for("ds-1", "tiny", resolve_config("cpu-tiny", method="qdora"))


def test_forbidden_method_is_refused_not_swapped() -> None:
    with pytest.raises(ConfigError, match="'lora' is forbidden"):
        resolve_config("cpu-tiny", method="lora", forbidden_methods={"lora", "qlora"})
    assert resolve_config("cpu-tiny", forbidden_methods={"lora"}).method == "dora"


@pytest.mark.parametrize(
    "overrides",
    [
        {"r": 0},
        {"r": "16; rm -rf /"},
        {"learning_rate": -1},
        {"batch_size": 10**9},
        {"unknown_field": 1},
        {"target_modules": ["q_proj", "../../etc"]},
        {"target_modules": []},
        {"phases": ["A", "A"]},
        {"phases": ["A" * 500]},
        {"method": "full-finetune"},
        {"precision": "fp8"},
    ],
)
def test_invalid_overrides_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        resolve_config("cpu-tiny", overrides=overrides)


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown training profile"):
        resolve_config("gpu-huge")


def test_settings_validate_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_FORBIDDEN_METHODS", '["lora"]')
    monkeypatch.setenv("TRAINER_OVERRIDES", '{"max_steps_per_phase": 7}')
    settings = TrainerSettings()
    assert settings.forbidden_methods == ["lora"]
    assert settings.overrides == {"max_steps_per_phase": 7}
    with pytest.raises(ValueError, match="unknown methods"):
        TrainerSettings(forbidden_methods=["sgd"])
    with pytest.raises(ValueError, match="unknown profile"):
        TrainerSettings(profile="nope")
    with pytest.raises(ValueError, match="invalid training config"):
        TrainerSettings(overrides={"r": -1})


# ----------------------------------------------------------------- per-run TrainingSpec


def plan(spec: TrainingSpec | None, **settings: Any) -> Plan:
    return make_plan("ds-1", TrainerSettings(**{"base_model": "tiny", **settings}), spec=spec)


def test_spec_resolution_order_profile_settings_spec() -> None:
    settings = {"profile": "cpu-smol", "overrides": {"r": 8, "batch_size": 4}, "method": "qdora"}
    # No spec: TRAINER_PROFILE → TRAINER_OVERRIDES → TRAINER_METHOD.
    cfg = plan(None, **settings).config
    assert (cfg.r, cfg.batch_size, cfg.method, cfg.learning_rate) == (8, 4, "qdora", 5e-4)
    # spec.profile replaces TRAINER_PROFILE; TRAINER_OVERRIDES still apply over it; then the
    # spec's overrides, then its method.
    spec = TrainingSpec(profile="cpu-tiny", method="lora", overrides={"batch_size": 2})
    cfg = plan(spec, **settings).config
    assert cfg.learning_rate == PROFILES["cpu-tiny"]["learning_rate"]
    assert (cfg.r, cfg.batch_size, cfg.method) == (8, 2, "lora")
    # A method in the spec's overrides beats TRAINER_METHOD; spec.method beats both.
    assert plan(TrainingSpec(overrides={"method": "dora"}), **settings).config.method == "dora"
    both = TrainingSpec(method="lora", overrides={"method": "dora"})
    assert plan(both, **settings).config.method == "lora"


def test_spec_base_model_overrides_the_setting_when_allowed(tmp_path: Path) -> None:
    assert plan(TrainingSpec(base_model="smollm2-135m-instruct")).base_model == (
        "smollm2-135m-instruct"
    )
    checkpoint = str(tmp_path / "my-base")
    allowed = plan(TrainingSpec(base_model=checkpoint), allowed_base_models=[checkpoint])
    assert allowed.base_model == checkpoint


def test_the_spec_is_part_of_the_adapter_id() -> None:
    default = plan(None)
    assert plan(TrainingSpec()).adapter_id == default.adapter_id  # an empty spec changes nothing
    assert plan(TrainingSpec(overrides={"r": 16})).adapter_id == default.adapter_id  # same value
    lower_r = plan(TrainingSpec(overrides={"r": 8}))
    assert lower_r.adapter_id != default.adapter_id
    assert lower_r.adapter_id == plan(TrainingSpec(overrides={"r": 8})).adapter_id
    assert plan(TrainingSpec(method="lora")).adapter_id != default.adapter_id
    assert plan(TrainingSpec(base_model="smollm2-135m-instruct")).adapter_id != default.adapter_id


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (TrainingSpec(overrides={"lr": 1e-4}), r"unknown training setting\(s\) \['lr'\]"),
        (TrainingSpec(overrides={"r": "16"}), "r: Input should be a valid integer"),
        (TrainingSpec(overrides={"r": True}), "r: Input should be a valid integer"),
        (TrainingSpec(overrides={"batch_size": 2.5}), "batch_size: Input should be a valid int"),
        (TrainingSpec(overrides={"learning_rate": "1e-4"}), "learning_rate: Input should be"),
        (TrainingSpec(overrides={"packing": "yes"}), "packing: Input should be a valid boolean"),
        (TrainingSpec(overrides={"learning_rate": 50.0}), "learning_rate: Input should be less"),
        (TrainingSpec(overrides={"dropout": -0.1}), "dropout: Input should be greater"),
        (TrainingSpec(overrides={"target_modules": ["../x"]}), "not a plain identifier"),
        (TrainingSpec(overrides={"max_steps_per_phase": 10**6}), "over the limit 100000"),
        (TrainingSpec(overrides={"max_steps_per_phase": 10**9}), "less than or equal to"),
        (TrainingSpec(overrides={"epochs_per_phase": 90.0}), "epochs_per_phase=90.0 is over"),
        (TrainingSpec(overrides={"batch_size": 4096}), "batch_size=4096 is over the limit 256"),
        (TrainingSpec(overrides={"grad_accum": 1000}), "grad_accum=1000 is over the limit"),
        (TrainingSpec(overrides={"batch_size": 64, "max_length": 8192}), "524288 tokens"),
        (TrainingSpec(overrides={"r": 1024}), "r=1024 is over the limit 512"),
        (TrainingSpec(profile="gpu-huge"), "unknown training profile 'gpu-huge'"),
        (TrainingSpec(overrides={"method": "sgd"}), "method: Input should be"),
    ],
)
def test_an_invalid_spec_is_refused_with_a_clear_reason(spec: TrainingSpec, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        plan(spec)
    # The reason says where the bad value came from.
    assert "TrainingSpec" in str(info.value)


def test_a_forbidden_method_from_a_spec_is_refused_not_swapped() -> None:
    for spec in (TrainingSpec(method="lora"), TrainingSpec(overrides={"method": "lora"})):
        with pytest.raises(ConfigError, match="'lora' is forbidden by policy") as info:
            plan(spec, forbidden_methods=["lora", "qlora"])
        assert "from the run's TrainingSpec" in str(info.value)


@pytest.mark.parametrize(
    "base_model",
    [
        "/etc",
        "/tmp/../etc/passwd",
        "../../secrets",
        "meta-llama/Llama-3.1-8B",  # a hub id: never downloaded because an event asked
        "https://example.com/model.tar",
        "tiny ",
        "x" * 500,
    ],
)
def test_a_spec_cannot_pick_an_arbitrary_base_model(base_model: str) -> None:
    with pytest.raises(ConfigError, match="is not allowed on this trainer") as info:
        plan(TrainingSpec(base_model=base_model), base_model="smollm2-135m-instruct")
    assert "TRAINER_ALLOWED_BASE_MODELS" in str(info.value)
    # ...unless the operator allow-lists it (an absolute path): exact names only.
    assert plan(TrainingSpec(base_model="/models/x"), allowed_base_models=["/models/x"])
    with pytest.raises(ConfigError):
        plan(TrainingSpec(base_model="/models/x/"), allowed_base_models=["/models/x"])


def test_hostile_values_arriving_as_json_are_refused() -> None:
    """NaN / Infinity / huge integers as they come off the wire in a DatasetReady."""
    for raw in (
        '{"overrides": {"learning_rate": NaN}}',
        '{"overrides": {"learning_rate": Infinity}}',
        '{"overrides": {"max_grad_norm": -Infinity}}',
        '{"overrides": {"max_steps_per_phase": 100000000000000000000000000}}',
        '{"overrides": {"seed": -1}}',
    ):
        try:
            spec = TrainingSpec.model_validate_json(raw)
        except ValueError:
            continue  # refused by the event schema already
        with pytest.raises(ConfigError):
            plan(spec)


def test_limits_and_allowed_base_models_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_LIMITS", '{"max_steps_per_phase": 40, "batch_size": 8}')
    monkeypatch.setenv("TRAINER_ALLOWED_BASE_MODELS", '["tiny", "/models/base"]')
    settings = TrainerSettings(profile="cpu-tiny", base_model="tiny")
    assert settings.limits.max_steps_per_phase == 40
    with pytest.raises(ConfigError, match="max_steps_per_phase=41 is over the limit 40"):
        make_plan("ds-1", settings, spec=TrainingSpec(overrides={"max_steps_per_phase": 41}))
    assert make_plan("ds-1", settings, spec=TrainingSpec(base_model="/models/base"))
    # A deployment whose own settings are over its limits does not start.
    with pytest.raises(ValueError, match="over the trainer's limits"):
        TrainerSettings(profile="cpu-tiny", overrides={"max_steps_per_phase": 41})
    with pytest.raises(ValueError, match="hub ids are never downloaded"):
        TrainerSettings(allowed_base_models=["meta-llama/Llama-3.1-8B"])
    with pytest.raises(ValueError, match="absolute checkpoint path"):
        TrainerSettings(allowed_base_models=["/models/../etc"])


def test_every_profile_fits_the_default_limits() -> None:
    for profile in PROFILES:
        resolve_config(profile, limits=ConfigLimits())


def test_packed_batches_go_one_bin_per_micro_batch_without_varlen_attention() -> None:
    from types import SimpleNamespace

    from services.trainer.training.worker import micro_batches

    def model(attention: str) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))

    packed = resolve_config("cpu-tiny", overrides={"batch_size": 8, "grad_accum": 2})
    assert micro_batches(packed, model("sdpa")) == (1, 16)  # same bins per optimizer step
    assert micro_batches(packed, model("flash_attention_2")) == (8, 2)
    padded = resolve_config("cpu-tiny", overrides={"packing": False, "batch_size": 8})
    assert micro_batches(padded, model("sdpa")) == (8, 1)
