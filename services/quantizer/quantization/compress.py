"""AWQ and GPTQ W4A16 with llm-compressor: a compressed-tensors checkpoint vLLM loads natively.

Calibration samples come from the dataset (chat records rendered with the model's template).
Both run on the CPU for small models: GPTQ as it is; AWQ needs one workaround (below).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from services.quantizer.quantization.merge import copy_tokenizer

Method = Literal["awq", "gptq"]
GROUP_SIZES = (128, 64, 32, 16)


def pick_group_size(model: Any, preferred: int = 128) -> int:
    """The largest group size <= ``preferred`` that divides every quantized layer's inputs.

    128 is the usual choice, but SmolLM2's hidden size (576) only divides by 64.
    """
    import torch

    widths = {
        m.in_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")
    }
    for size in GROUP_SIZES:
        if size <= preferred and all(w % size == 0 for w in widths):
            return size
    raise ValueError(f"no group size in {GROUP_SIZES} divides the layer widths {sorted(widths)}")


@contextlib.contextmanager
def cpu_awq_workaround() -> Iterator[None]:
    """llm-compressor's AWQ pins cached activations for fast host→device copies; on a machine
    with no accelerator ``Tensor.pin_memory`` raises "Cannot access accelerator device when
    none is available". Pinning buys nothing without a device, so make it a no-op there."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory

    def no_pin(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pin  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def calibration_dataset(sequences: list[list[int]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict(
        {"input_ids": sequences, "attention_mask": [[1] * len(s) for s in sequences]}
    )


def quantize_w4a16(
    merged_dir: Path,
    out_dir: Path,
    *,
    method: Method,
    calibration: list[list[int]],
    group_size: int = 128,
    max_seq_length: int = 256,
) -> Path:
    """Quantize the merged checkpoint's Linear layers (not ``lm_head``) to 4-bit weights."""
    import torch
    from llmcompressor.entrypoints.oneshot import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM

    if not calibration:
        raise ValueError("no calibration samples")
    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    size = pick_group_size(model, group_size)
    scheme = {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": method == "gptq",
                "strategy": "group",
                "group_size": size,
            },
        }
    }
    recipe: list[Any]
    if method == "gptq":
        recipe = [GPTQModifier(ignore=["lm_head"], config_groups=scheme)]
    else:
        # AWQ only rescales channels; the quantization itself is a separate modifier.
        recipe = [
            AWQModifier(duo_scaling=True),
            QuantizationModifier(ignore=["lm_head"], config_groups=scheme),
        ]
    with cpu_awq_workaround():
        oneshot(
            model=model,
            dataset=calibration_dataset(calibration),
            recipe=recipe,
            num_calibration_samples=len(calibration),
            max_seq_length=max_seq_length,
            shuffle_calibration_samples=False,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, save_compressed=True)
    copy_tokenizer(merged_dir, out_dir)
    return out_dir
