"""Pure decisions of the inference service: format → engine, artifact checks (hostile input
included), promotion/retirement, the engine budget."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.inference.engines.profiles import PROFILES
from services.inference.handlers import (
    MAX_CONFIG_BYTES,
    Refused,
    inspect_model,
    pick_eviction,
    plan_for,
    promote,
)
from services.inference.models import Deployment

CPU, GPU = PROFILES["cpu"], PROFILES["l4"]
T0 = datetime(2026, 11, 22, tzinfo=UTC)


@pytest.mark.parametrize("fmt", ["awq-w4a16", "gptq-w4a16"])
def test_w4a16_is_refused_on_a_cpu_with_the_reason_and_served_by_vllm_on_a_gpu(fmt):
    with pytest.raises(Refused, match="GPU serving format"):
        plan_for(fmt, profile=CPU)
    plan = plan_for(fmt, profile=GPU)
    assert (plan.kind, plan.engine_kind, plan.engine) == ("engine", "vllm", "vllm")


def test_formats_map_to_engines():
    assert plan_for("bf16-merged", profile=CPU).engine == "vllm-cpu"
    assert plan_for("bf16-merged", profile=GPU).engine == "vllm"
    # GGUF: llama.cpp on a CPU (vLLM's GGUF plugin needs the CUDA vllm package).
    gguf = plan_for("gguf-q4_k_m", profile=CPU)
    assert (gguf.engine_kind, gguf.engine) == ("llama-cpp", "llama-cpp")  # announced as such
    on_gpu = plan_for("gguf-q4_k_m", profile=GPU, gguf_engine="vllm")
    assert (on_gpu.engine_kind, on_gpu.engine) == ("vllm", "vllm")
    assert plan_for("gguf-q4_k_m", profile=GPU).engine == "llama-cpp"
    assert plan_for("adapter", profile=CPU).kind == "lora"


def write_adapter(path: Path, **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 8, "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_plain_lora_passes_with_its_rank(tmp_path):
    files = inspect_model(write_adapter(tmp_path / "a"), "adapter", max_lora_rank=64)
    assert files.lora_rank == 8 and files.model_path == str(tmp_path / "a")


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"use_dora": True}, "DoRA adapter refused"),
        ({"peft_type": "IA3"}, "only plain LoRA"),
        ({"r": 128}, "exceeds the engines' max LoRA rank"),
        ({"r": 0}, "not a positive integer"),
        ({"r": "8; rm -rf /"}, "not a positive integer"),
        ({"r": True}, "not a positive integer"),
    ],
)
def test_adapters_that_cannot_hot_load_are_refused(tmp_path, config, match):
    with pytest.raises(Refused, match=match):
        inspect_model(write_adapter(tmp_path / "a", **config), "adapter", max_lora_rank=64)


def test_hostile_adapter_configs_are_refused(tmp_path):
    a = write_adapter(tmp_path / "a")
    (a / "adapter_config.json").write_text("{not json")
    with pytest.raises(Refused, match="not valid JSON"):
        inspect_model(a, "adapter", max_lora_rank=64)
    (a / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(Refused, match="not a JSON object"):
        inspect_model(a, "adapter", max_lora_rank=64)
    (a / "adapter_config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(Refused, match="not valid JSON"):
        inspect_model(a, "adapter", max_lora_rank=64)
    (a / "adapter_config.json").write_text(" " * (MAX_CONFIG_BYTES + 1) + "{}")
    with pytest.raises(Refused, match="larger than"):
        inspect_model(a, "adapter", max_lora_rank=64)
    (a / "adapter_config.json").unlink()
    with pytest.raises(Refused, match=re.escape("no adapter_config.json")):
        inspect_model(a, "adapter", max_lora_rank=64)
    b = write_adapter(tmp_path / "b")
    (b / "adapter_model.safetensors").unlink()
    with pytest.raises(Refused, match="no adapter_model"):
        inspect_model(b, "adapter", max_lora_rank=64)


def test_checkpoints_need_a_config_with_an_architecture(tmp_path):
    with pytest.raises(Refused, match=re.escape("no config.json")):
        inspect_model(tmp_path, "bf16-merged", max_lora_rank=64)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(Refused, match="no architecture"):
        inspect_model(tmp_path, "bf16-merged", max_lora_rank=64)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert inspect_model(tmp_path, "bf16-merged", max_lora_rank=64).model_path == str(tmp_path)


def test_gguf_needs_exactly_one_file_and_picks_up_a_tokenizer(tmp_path):
    with pytest.raises(Refused, match=re.escape("no .gguf")):
        inspect_model(tmp_path, "gguf-q4_k_m", max_lora_rank=64)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    files = inspect_model(tmp_path, "gguf-q4_k_m", max_lora_rank=64)
    assert files.model_path == str(tmp_path / "m.gguf") and files.tokenizer is None
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert inspect_model(tmp_path, "gguf-q4_k_m", max_lora_rank=64).tokenizer == str(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(Refused, match=re.escape("2 .gguf files")):
        inspect_model(tmp_path, "gguf-q4_k_m", max_lora_rank=64)


def dep(i: str, minutes: int, **fields) -> Deployment:
    values = {
        "id": i,
        "dedupe_key": f"k-{i}",
        "run_id": "run-1",
        "model_id": f"m-{i}",
        "base_model": "tiny",
        "format": "bf16-merged",
        "role": "candidate",
        "served_model_name": "tuneloop",
        "upstream_name": "tuneloop",
        "engine": "vllm-cpu",
        "mode": "local",
        "profile": "cpu",
        "status": "ready",
        "created_at": T0 + timedelta(minutes=minutes),
    }
    values.update(fields)
    return Deployment(**values)


def test_promotion_keeps_stable_and_previous_and_retires_older():
    rows = [
        dep("base", 0, role="baseline", stable_rank=0),
        dep("a", 1),
        dep("b", 2),
        dep("c", 3),  # newer than the promoted one: still being evaluated, stays
        dep("other-line", 0, served_model_name="other"),
    ]
    first = promote(rows, "b")
    assert (first.stable, first.previous, first.retire) == ("b", "base", ("a",))
    rows[0].stable_rank, rows[2].stable_rank = 1, 0
    rows[1].status = "retired"
    second = promote(rows, "c")
    assert (second.stable, second.previous, second.retire) == ("c", "b", ("base",))


def test_promotion_is_idempotent_and_keeps_engines_that_host_live_loras():
    rows = [
        dep("base", 0, role="baseline", stable_rank=1),
        dep("x", 1, stable_rank=0),
        dep("lora", 2, host_deployment_id="base", format="adapter"),
        dep("y", 3),
    ]
    again = promote(rows, "x")
    assert again.stable == "x" and again.previous == "base" and again.retire == ()
    # An engine hosting a LoRA that stays is not retired with the rest.
    assert promote([*rows[:2], dep("z", 5)], "z").retire == ("base",)
    kept = promote([rows[0], rows[1], dep("lora2", 6, host_deployment_id="base"), dep("z", 5)], "z")
    assert kept.retire == ()
    rows[0].stable_rank, rows[1].stable_rank = None, 1
    out = promote(rows, "y")
    # The LoRA is retired first, then its engine.
    assert out.retire == ("lora", "base") and out.previous == "x"
    with pytest.raises(KeyError):
        promote(rows, "missing")


def test_eviction_takes_the_oldest_plain_candidate_never_stable_previous_baseline_or_hosts():
    rows = [
        dep("base", 0, role="baseline"),
        dep("host", 1),
        dep("lora", 2, host_deployment_id="host"),
        dep("stable", 3, stable_rank=0),
        dep("prev", 4, stable_rank=1),
        dep("c1", 5),
        dep("c2", 6),
        dep("gone", 0, status="retired"),
    ]
    assert pick_eviction(rows, max_engines=10) is False
    assert pick_eviction(rows, max_engines=6) == "c1"
    protected = [r for r in rows if r.id not in ("c1", "c2")]
    assert pick_eviction(protected, max_engines=4) is None
