"""Real training (peft + trl) of the tiny model on the CPU: loss goes down on the JSON task,
curriculum phases run in order and continue from each other, and the adapter is a real DoRA
adapter that reloads and changes the model's outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.trainer.training.config import resolve_config
from services.trainer.training.data import plan_phases
from services.trainer.training.worker import Worker
from tests.integration.trainer.dataset import json_task, read_jsonl

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 8


def assistant_loss(model: Any, tokenizer: Any, records: list[dict[str, Any]]) -> float:
    """Mean cross-entropy on the assistant tokens of ``records`` (what the adapter learns)."""
    import torch

    total, count = 0.0, 0
    model.eval()
    for record in records:
        enc = tokenizer.apply_chat_template(
            record["messages"],
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"]
        mask = torch.as_tensor(enc["assistant_masks"]).bool().reshape(ids.shape)
        labels = ids.masked_fill(~mask, -100)
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = int(mask[:, 1:].sum())
        total += float(out.loss) * n
        count += n
    return total / count


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Any]:
    train = json_task(64, seed=1)
    ids = [r["id"] for r in train]
    manifests = {
        name: json.dumps({"phase": name, "seed": 1, "record_ids": sel}).encode()
        for name, sel in (("A", ids[:16]), ("B", ids[16:32]), ("C", ids))
    }
    work = tmp_path_factory.mktemp("work")
    phases = []
    for phase in plan_phases(train, manifests):
        path = work / f"phase-{phase.name}.jsonl"
        lines = [json.dumps({"messages": r["messages"]}) + "\n" for r in phase.records]
        path.write_text("".join(lines))
        phases.append({"name": phase.name, "file": str(path), "sequential": True})
    config = resolve_config("cpu-tiny", overrides={"max_steps_per_phase": STEPS})
    spec = {
        "work_dir": str(work),
        "base_model_path": str(models_dir / "tiny"),
        "config": config.model_dump(mode="json"),
        "phases": phases,
        "checkpoint_every_steps": 100,
        "threads": 1,
        "prompts": ["remind me to pay rent friday", "remind me to call mom tonight"],
        "max_new_tokens": 24,
        "metadata": {"dataset_id": "ds-json", "base_model": "tiny"},
    }
    metadata = Worker(spec).run()
    return {"work": work, "metadata": metadata, "spec": spec}


def test_training_lowers_loss_on_held_out_json_task(trained: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = trained["spec"]["base_model_path"]
    adapter = trained["work"] / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    held_out = json_task(24, seed=99, prefix="v")
    before = assistant_loss(AutoModelForCausalLM.from_pretrained(base_path), tokenizer, held_out)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    after = assistant_loss(tuned, tokenizer, held_out)
    # A random-init base starts near ln(vocab) ≈ 6.9 nats; the adapter must learn the format.
    assert before > 6.0
    assert after < before - 1.5, (before, after)


def test_curriculum_phases_run_in_order_and_continue(trained: dict[str, Any]) -> None:
    phases = trained["metadata"]["phases"]
    assert [p["phase"] for p in phases] == ["A", "B", "C"]
    assert [p["records"] for p in phases] == [16, 16, 64]
    for p in phases:
        assert p["steps"] == STEPS
        assert p["final_loss"] < p["first_loss"]
        assert p["tokens_per_second"] > 0
    steps = read_jsonl(trained["work"] / "steps.jsonl")
    order = [s["phase"] for s in steps]
    assert order == ["A"] * STEPS + ["B"] * STEPS + ["C"] * STEPS
    # B continues from A's adapter: it starts where A ended, not back at the random base.
    assert phases[1]["first_loss"] < phases[0]["first_loss"] - 0.5
    assert phases[2]["first_loss"] < phases[0]["first_loss"] - 0.5


def test_adapter_is_dora_in_peft_format_and_changes_outputs(trained: dict[str, Any]) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter: Path = trained["work"] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert config["r"] == 16
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    magnitudes = [k for k in weights if "lora_magnitude_vector" in k]
    assert magnitudes, "a DoRA adapter has magnitude vectors"
    assert (adapter / "tokenizer.json").exists()

    base_path = trained["spec"]["base_model_path"]
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "remind me to pay rent friday"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    with torch.no_grad():
        tuned_logits = tuned.eval()(input_ids=ids).logits
    assert (tuned_logits - base_logits).abs().max() > 0.5


def test_metadata_records_the_training_log_and_post_training_protocol(
    trained: dict[str, Any],
) -> None:
    adapter: Path = trained["work"] / "adapter"
    meta = json.loads((adapter / "training_metadata.json").read_text())
    assert meta["dataset_id"] == "ds-json"
    assert meta["base_model"] == "tiny"
    assert meta["resolved_config"]["max_steps_per_phase"] == STEPS
    assert meta["method"] == "dora"
    assert meta["precision"] == "fp32"
    assert meta["peak_memory_mb"] > 0
    assert meta["code_version"].startswith("tuneloop-")
    samples = meta["post_training"]
    assert [s["prompt"] for s in samples] == trained["spec"]["prompts"]
    assert all(s["tokens"] > 0 and s["latency_s"] > 0 for s in samples)
    curve = json.loads((adapter / "loss_curve.json").read_text())
    assert len(curve) == 3 * STEPS
    assert all({"phase", "step", "loss"} <= set(point) for point in curve)


def test_qdora_trains_on_the_cpu_with_a_4bit_base(tmp_path: Path, models_dir: Path) -> None:
    """bitsandbytes' CPU backend: a 4-bit NF4 base with a trainable DoRA adapter on top."""
    from safetensors.torch import load_file

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in json_task(16)))
    config = resolve_config("cpu-tiny", method="qdora", overrides={"max_steps_per_phase": 3})
    spec = {
        "work_dir": str(tmp_path),
        "base_model_path": str(models_dir / "tiny"),
        "config": config.model_dump(mode="json"),
        "phases": [{"name": "all", "file": str(path)}],
        "checkpoint_every_steps": 100,
        "threads": 1,
        "prompts": [],
    }
    meta = Worker(spec).run()
    assert meta["method"] == "qdora"
    assert meta["phases"][0]["steps"] == 3
    adapter = tmp_path / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any("lora_magnitude_vector" in k for k in weights)


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_chatml_template_without_generation_markers_gets_them_unchanged_otherwise(
    models_dir: Path,
) -> None:
    """SmolLM2's template has no {% generation %} markers (trl refuses it for assistant-only
    loss): the training template renders the same text and masks exactly the answers."""
    from transformers import AutoTokenizer

    from services.trainer.training.worker import chatml_training_template

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "tiny")
    chats = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "it's 5"},
            {"role": "assistant", "content": "ok"},
        ],
    ]
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    original = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    prompt = tokenizer.apply_chat_template(chats[0][:1], tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = chatml_training_template(SMOLLM2_TEMPLATE)
    assert [tokenizer.apply_chat_template(c, tokenize=False) for c in chats] == original
    assert (
        tokenizer.apply_chat_template(chats[0][:1], tokenize=False, add_generation_prompt=True)
        == prompt
    )
    enc = tokenizer.apply_chat_template(
        chats[1], return_dict=True, return_assistant_tokens_mask=True
    )
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "ok<|im_end|>"
