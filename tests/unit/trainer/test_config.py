from __future__ import annotations

import pytest

from services.trainer.settings import TrainerSettings
from services.trainer.training.config import (
    PROFILES,
    ConfigError,
    adapter_id_for,
    resolve_config,
)


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
