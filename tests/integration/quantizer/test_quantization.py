"""The quantization job on the tiny model with real peft, llm-compressor and llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.quantizer.quantization.merge import load_adapted, merge_adapter
from services.quantizer.quantization.pipeline import (
    REPORT_NAME,
    JobError,
    JobReport,
    JobSettings,
    run_job,
)

pytestmark = pytest.mark.integration

FAST = JobSettings(
    max_eval_records=12,
    max_eval_tokens=64,
    calibration_samples=8,
    calibration_max_tokens=64,
    generations=2,
    max_new_tokens=6,
)
QUANTIZED = ["awq-w4a16", "gptq-w4a16", "gguf-q4_k_m"]


@pytest.fixture(scope="module")
def job(tiny_dora, tmp_path_factory) -> JobReport:
    return run_job(
        base_dir=str(tiny_dora.base_dir),
        base_model="tiny",
        adapter_dir=tiny_dora.adapter_dir,
        validation=tiny_dora.validation,
        targets=["bf16-merged", *QUANTIZED, "adapter"],
        work_dir=tmp_path_factory.mktemp("job"),
        settings=FAST,
    )


def _by_format(report: JobReport) -> dict[str, object]:
    return {t.format: t for t in report.targets}


def test_merge_matches_adapter_on_base_logits(tiny_dora, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = merge_adapter(str(tiny_dora.base_dir), tiny_dora.adapter_dir, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok("remind me to call mom tomorrow at 9am", return_tensors="pt").input_ids
    with torch.no_grad():
        adapted = load_adapted(str(tiny_dora.base_dir), tiny_dora.adapter_dir)(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dora.base_dir)(ids).logits
    assert (merged - adapted).abs().max().item() < 1e-4
    # The adapter really changes the model, so the comparison above means something.
    assert (adapted - base).abs().max().item() > 0.1
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (merged_dir / "tokenizer.json").is_file()
    assert "im_start" in (merged_dir / "chat_template.jinja").read_text()


def test_every_quantized_target_passes_the_gate_with_its_numbers(job):
    targets = _by_format(job)
    assert job.merge_max_logit_diff is not None and job.merge_max_logit_diff < 1e-3
    for fmt in ["bf16-merged", *QUANTIZED]:
        result = targets[fmt]
        assert result.status == "accepted", result.reason
        assert result.perplexity_before == pytest.approx(job.merged_perplexity)
        assert result.perplexity_after is not None
        assert result.relative_increase <= FAST.max_ppl_increase
        assert result.generations and all(isinstance(g, str) for g in result.generations)
        report = json.loads((result.output_dir / REPORT_NAME).read_text())
        assert report["merged"]["perplexity"] == pytest.approx(job.merged_perplexity)
        assert {t["format"] for t in report["targets"]} >= {fmt}
    merged_size = targets["bf16-merged"].size_bytes
    for fmt in QUANTIZED:
        assert targets[fmt].size_bytes < merged_size / 1.5, fmt
    # 4-bit weights are not the same model: the perplexity moved, a little.
    assert targets["gptq-w4a16"].perplexity_after != job.merged_perplexity


def test_dora_adapter_is_refused_as_an_unmerged_target(job):
    result = _by_format(job)["adapter"]
    assert result.status == "failed"
    assert "DoRA" in result.reason


@pytest.mark.parametrize("fmt", ["awq-w4a16", "gptq-w4a16"])
def test_w4a16_is_compressed_tensors_that_transformers_reloads_and_generates(job, fmt):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _by_format(job)[fmt].output_dir
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == "pack-quantized"
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["strategy"] == "group"
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert any(k.endswith("q_proj.weight_packed") for k in keys)
    assert not any(k.endswith("q_proj.weight") for k in keys)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("remind me to", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert gen.shape[1] == ids.shape[1] + 4


def test_gguf_is_q4_k_m_and_llama_cpp_scores_it(job):
    from services.quantizer.quantization.gguf import gguf_file_type, gguf_tensor_types

    out = _by_format(job)["gguf-q4_k_m"].output_dir
    path = out / "model.Q4_K_M.gguf"
    assert gguf_file_type(path) == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = set(gguf_tensor_types(path).values())
    assert "Q4_K" in types  # rows of 256 (the tiny ffn_down) are true K-quants
    assert "F32" in types  # norms stay full precision


def test_gguf_f32_conversion_is_exact(job, tmp_path):
    """The converter itself loses nothing: llama.cpp on the F32 GGUF scores as transformers."""
    from transformers import AutoTokenizer

    from services.quantizer.quantization.gguf import convert_to_gguf
    from services.quantizer.quantization.perplexity import LlamaCppScorer, TransformersScorer

    merged = _by_format(job)["bf16-merged"].output_dir
    f32 = convert_to_gguf(merged, tmp_path / "m.gguf")
    ids = AutoTokenizer.from_pretrained(merged)("pay rent by noon")["input_ids"]
    cpp = LlamaCppScorer(f32, n_ctx=64)
    try:
        assert cpp.nll(ids) == pytest.approx(TransformersScorer.load(merged).nll(ids), rel=1e-4)
        # llama.cpp tokenizes like the HF tokenizer (vocab, merges, pre-tokenizer carried over).
        assert cpp.llm.tokenize(b"pay rent by noon", add_bos=False) == ids
    finally:
        cpp.close()


def _scramble_packed_weights(fmt: str, out: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    tensors = load_file(str(path))
    gen = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if key.endswith("weight_packed"):
            tensors[key] = torch.randint(
                -(2**31), 2**31 - 1, value.shape, generator=gen, dtype=torch.int32
            )
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_gate_rejects_a_damaged_quantization_with_the_numbers(tiny_dora, tmp_path):
    report = run_job(
        base_dir=str(tiny_dora.base_dir),
        base_model="tiny",
        adapter_dir=tiny_dora.adapter_dir,
        validation=tiny_dora.validation,
        targets=["gptq-w4a16"],
        work_dir=tmp_path,
        settings=JobSettings(**{**FAST.__dict__, "verify_merge": False, "generations": 0}),
        damage=_scramble_packed_weights,
    )
    (result,) = report.targets
    assert result.status == "rejected"
    assert result.perplexity_after > result.perplexity_before * 1.05
    assert f"{result.perplexity_before:.4f}" in result.reason
    assert f"{result.perplexity_after:.4f}" in result.reason
    assert "over the 5.00% limit" in result.reason


def test_adapter_that_does_not_fit_the_base_is_a_clear_job_error(tiny_dora, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dora.adapter_dir, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(8, 77)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(JobError, match="merging the adapter into tiny failed"):
        run_job(
            base_dir=str(tiny_dora.base_dir),
            base_model="tiny",
            adapter_dir=bad,
            validation=tiny_dora.validation,
            targets=["bf16-merged"],
            work_dir=tmp_path / "w",
            settings=FAST,
        )


def test_validation_split_without_usable_records_is_a_job_error(tiny_dora, tmp_path):
    junk = tmp_path / "junk.jsonl"
    junk.write_text('not json\n{"messages": "nope"}\n[1, 2]\n{"messages": [{"role": "x"}]}\n')
    with pytest.raises(JobError, match="no usable chat record"):
        run_job(
            base_dir=str(tiny_dora.base_dir),
            base_model="tiny",
            adapter_dir=tiny_dora.adapter_dir,
            validation=junk,
            targets=["bf16-merged"],
            work_dir=tmp_path / "w",
            settings=FAST,
        )


def test_plain_lora_adapter_passes_through_unmerged(tiny_dora, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dora.base_dir)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "lora")
    report = run_job(
        base_dir=str(tiny_dora.base_dir),
        base_model="tiny",
        adapter_dir=tmp_path / "lora",
        validation=tiny_dora.validation,
        targets=["adapter"],
        work_dir=tmp_path / "w",
        settings=FAST,
    )
    (result,) = report.targets
    assert result.status == "accepted"
    assert not report.adapter.use_dora
    out = result.output_dir
    assert (out / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "lora" / "adapter_model.safetensors"
    ).read_bytes()
    assert result.perplexity_after == result.perplexity_before == report.merged_perplexity
