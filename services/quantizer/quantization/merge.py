"""Merge a (Q)DoRA / (Q)LoRA adapter into its base, in full precision.

vLLM refuses DoRA adapters, so a DoRA adapter is served as a merged model of its own. The base
is always loaded unquantized for the merge, even when the adapter was trained against a 4-bit
base (QDoRA/QLoRA): merging into 4-bit weights would round the update away.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SUPPORTED_PEFT_TYPES = {"LORA"}
DTYPES = {"float32", "bfloat16", "float16"}


class AdapterError(ValueError):
    """The adapter directory is not something we can merge (retrying cannot help)."""


@dataclass(frozen=True)
class AdapterInfo:
    peft_type: str
    use_dora: bool
    rank: int
    target_modules: list[str] | str | None


def inspect_adapter(adapter_dir: Path, *, max_config_bytes: int = 1 << 20) -> AdapterInfo:
    """Read and check ``adapter_config.json`` without trusting it."""
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"adapter has no {ADAPTER_CONFIG}")
    if path.stat().st_size > max_config_bytes:
        raise AdapterError(f"{ADAPTER_CONFIG} is larger than {max_config_bytes} bytes")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{ADAPTER_CONFIG} is not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterError(f"{ADAPTER_CONFIG} is not a JSON object")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise AdapterError(f"unsupported adapter type {peft_type or '(none)'!r}: expected LORA")
    if (adapter_dir / "adapter_model.bin").exists():
        # A pickle: loading it could run code from whoever produced the adapter.
        raise AdapterError("adapter ships a pickled adapter_model.bin: only safetensors is loaded")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise AdapterError("adapter has no adapter_model.safetensors")
    rank = cfg.get("r", 0)
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"adapter rank {rank!r} is not a positive integer")
    return AdapterInfo(
        peft_type=peft_type,
        use_dora=bool(cfg.get("use_dora", False)),
        rank=rank,
        target_modules=cfg.get("target_modules"),
    )


def _torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    return getattr(torch, name)


def load_adapted(base_dir: str, adapter_dir: Path) -> Any:
    """The base with the adapter applied (unmerged): the reference the merge must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # The event names the base; the adapter's own base_model_name_or_path is not trusted.
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False).eval()


def merge_adapter(
    base_dir: str, adapter_dir: Path, out_dir: Path, *, save_dtype: str = "float32"
) -> Path:
    """Write the merged model (config, weights, generation config, tokenizer) to ``out_dir``."""
    from transformers import AutoTokenizer

    inspect_adapter(adapter_dir)
    model = load_adapted(base_dir, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(_torch_dtype(save_dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    # The tokenizer travelling with the adapter wins (the trainer may have set a chat
    # template or pad token); otherwise the base's.
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
    return out_dir


def copy_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
