"""Pure parts of the quantization package: input parsing, adapter checks, the gate."""

from __future__ import annotations

import json
import math

import pytest

from services.quantizer.quantization.data import DatasetError, read_chat_jsonl, render
from services.quantizer.quantization.merge import AdapterError, inspect_adapter
from services.quantizer.quantization.pipeline import gate, relative_increase

GOOD = {
    "id": "1",
    "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
}


def test_validation_reader_skips_malformed_and_hostile_lines(tmp_path):
    path = tmp_path / "v.jsonl"
    lines = [
        json.dumps(GOOD),
        "not json at all",
        "\xff\xfe garbage",
        json.dumps([1, 2, 3]),
        json.dumps({"messages": "a string"}),
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": 5}]}),
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
        json.dumps(
            {"messages": [GOOD["messages"][0], {"role": "assistant", "content": "x" * 40_000}]}
        ),
        "",
        json.dumps(GOOD),
    ]
    path.write_text("\n".join(lines))
    records = read_chat_jsonl(path, max_records=100)
    assert len(records.conversations) == 2
    assert records.skipped == 8


def test_validation_reader_limits(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join(json.dumps(GOOD) for _ in range(50)))
    assert len(read_chat_jsonl(path, max_records=5).conversations) == 5
    with pytest.raises(DatasetError, match="over the 100 limit"):
        read_chat_jsonl(path, max_records=5, max_bytes=100)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DatasetError, match="no usable chat record"):
        read_chat_jsonl(empty, max_records=5)


def test_render_prompt_only_stops_before_the_last_answer():
    class NoTemplate:
        chat_template = None

    msgs = [
        *GOOD["messages"],
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "bye"},
    ]
    assert render(NoTemplate(), msgs, prompt_only=True).endswith("user: again\nassistant:")
    assert "bye" in render(NoTemplate(), msgs)


def _adapter(tmp_path, config, *, weights="adapter_model.safetensors"):
    d = tmp_path / "a"
    d.mkdir(exist_ok=True)
    if config is not None:
        (d / "adapter_config.json").write_text(
            config if isinstance(config, str) else json.dumps(config)
        )
    if weights:
        (d / weights).write_bytes(b"x")
    return d


def test_inspect_adapter_accepts_dora_and_lora(tmp_path):
    info = inspect_adapter(_adapter(tmp_path, {"peft_type": "LORA", "r": 8, "use_dora": True}))
    assert info.use_dora and info.rank == 8


@pytest.mark.parametrize(
    ("config", "weights", "match"),
    [
        (None, "adapter_model.safetensors", "no adapter_config.json"),
        ("{not json", "adapter_model.safetensors", "not valid JSON"),
        ("[1, 2]", "adapter_model.safetensors", "not a JSON object"),
        ({"peft_type": "PROMPT_TUNING", "r": 8}, "adapter_model.safetensors", "unsupported"),
        ({"r": 8}, "adapter_model.safetensors", "unsupported"),
        ({"peft_type": "LORA", "r": -1}, "adapter_model.safetensors", "rank"),
        ({"peft_type": "LORA", "r": "8; rm -rf /"}, "adapter_model.safetensors", "rank"),
        ({"peft_type": "LORA", "r": 8}, None, "no adapter_model.safetensors"),
        ({"peft_type": "LORA", "r": 8}, "adapter_model.bin", "pickled"),
    ],
)
def test_inspect_adapter_refuses_malformed_and_hostile_adapters(tmp_path, config, weights, match):
    with pytest.raises(AdapterError, match=match):
        inspect_adapter(_adapter(tmp_path, config, weights=weights))


def test_inspect_adapter_refuses_an_oversized_config(tmp_path):
    d = _adapter(tmp_path, {"peft_type": "LORA", "r": 8, "pad": "x" * 2_000_000})
    with pytest.raises(AdapterError, match="larger than"):
        inspect_adapter(d)


def test_gate_threshold_and_degenerate_numbers():
    assert gate(10.0, 10.4, 0.05) == (True, pytest.approx(0.04))
    ok, rel = gate(10.0, 10.6, 0.05)
    assert not ok and rel == pytest.approx(0.06)
    assert gate(10.0, 9.0, 0.05)[0]  # better is fine
    assert not gate(10.0, math.inf, 0.05)[0]
    assert not gate(10.0, math.nan, 0.05)[0]
    assert relative_increase(0.0, 1.0) == math.inf


def test_group_size_divides_every_layer():
    import torch

    from services.quantizer.quantization.compress import pick_group_size

    class M(torch.nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.a = torch.nn.Linear(width, 8)
            self.lm_head = torch.nn.Linear(7, 8)  # not quantized: not counted

    assert pick_group_size(M(128)) == 128
    assert pick_group_size(M(576)) == 64  # SmolLM2's hidden size
    assert pick_group_size(M(576), 32) == 32
    with pytest.raises(ValueError, match="no group size"):
        pick_group_size(M(100))
