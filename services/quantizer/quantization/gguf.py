"""Merged Llama-family checkpoint → GGUF → Q4_K_M, for llama.cpp / CPU serving.

Neither registry package ships llama.cpp's ``convert_hf_to_gguf.py``: the ``gguf`` package
has the writer, tensor-name map and vocab readers, and llama-cpp-python bundles ``libllama``
with its quantizer (``llama_model_quantize``). So: write an F32 GGUF here with ``gguf`` (the
same layout llama.cpp's converter produces for ``LlamaForCausalLM``: Q/K rows permuted to
llama.cpp's rotary layout, BPE vocab, merges, special ids, chat template), then let libllama
quantize it to Q4_K_M. Tensors whose rows do not divide into 256-wide K-quant blocks
(hidden 128 or 576) are given llama.cpp's own fallback types by libllama, as its CLI does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}
FTYPES = {"q4_k_m": 15, "q8_0": 7, "f16": 1}


class GgufError(ValueError):
    """The checkpoint cannot be converted (architecture or tokenizer unsupported)."""


def _permute(weights: Any, n_head: int, n_head_kv: int | None) -> Any:
    # HF stores rotary halves side by side; llama.cpp interleaves them (as its converter does).
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def convert_to_gguf(model_dir: Path, out_file: Path, *, name: str = "tuneloop") -> Path:
    """Write an F32 GGUF of a Llama-architecture HF checkpoint with a GPT-2-style BPE vocab."""
    import gguf
    import numpy as np
    from gguf.vocab import SpecialVocab
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    if not set(archs) & SUPPORTED_ARCHITECTURES:
        raise GgufError(f"GGUF conversion supports {sorted(SUPPORTED_ARCHITECTURES)}, not {archs}")
    if config.get("quantization_config"):
        raise GgufError("convert the merged full-precision model, not a quantized one")
    tokens, types = _bpe_vocab(model_dir, int(config["vocab_size"]))

    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    n_layers = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or hidden // n_head)

    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name(name)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta") or _rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    special = SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    for tid in special.special_token_ids.values():
        if 0 <= tid < len(types):
            types[tid] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(model_dir))
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(types)
    special.add_to_gguf(writer, quiet=True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise GgufError("no safetensors weights in the model directory")
    seen_output = False
    for path in weights:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                target = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise GgufError(f"no GGUF name for tensor {key!r}")
                data = fh.get_tensor(key).float().numpy().astype(np.float32)
                if key.endswith("q_proj.weight"):
                    data = _permute(data, n_head, n_head)
                elif key.endswith("k_proj.weight"):
                    data = _permute(data, n_head, n_kv)
                seen_output = seen_output or target == "output.weight"
                writer.add_tensor(target, data)
    del seen_output  # tied embeddings: llama.cpp reuses token_embd when output is absent
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _bpe_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens (by id) and their llama.cpp types from a byte-level BPE ``tokenizer.json``.

    Less strict than ``gguf.vocab.BpeVocab``: a tokenizer rebuilt by transformers from a GGUF
    (SmolLM2 here) has a byte-fallback decoder chain around the byte-level one, and its special
    tokens sit inside the base vocabulary.
    """
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise GgufError("no tokenizer.json: only fast byte-level BPE tokenizers are converted")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tok.get("pre_tokenizer")):
        raise GgufError("tokenizer is not a byte-level BPE: llama.cpp's gpt2 vocab cannot hold it")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in tok.get("added_tokens") or []:
        tid = int(added["id"])
        by_id[tid] = added["content"]
        kinds[tid] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(int(kinds.get(i, gguf.TokenType.NORMAL)))
        else:  # the embedding has more rows than the tokenizer has tokens
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


def _rope_theta(config: dict[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", 10000.0))


def quantize_gguf(src: Path, dest: Path, *, kind: str = "q4_k_m", threads: int = 2) -> Path:
    """Quantize a GGUF with libllama's own quantizer (what ``llama-quantize`` runs)."""
    import ctypes

    import llama_cpp

    if kind not in FTYPES:
        raise GgufError(f"unknown GGUF quantization {kind!r}; one of {sorted(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(), ctypes.byref(params))
    if rc != 0 or not dest.is_file():
        raise GgufError(f"llama_model_quantize({kind}) failed with code {rc}")
    return dest


def gguf_file_type(path: Path) -> int:
    """The ``general.file_type`` written in a GGUF (15 = MOSTLY_Q4_K_M)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    field = reader.get_field("general.file_type")
    if field is None:
        raise GgufError("GGUF has no general.file_type")
    return int(field.contents())


def gguf_tensor_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer regex.

    SmolLM's splits digits one by one before the byte-level step ("smollm" in llama.cpp);
    plain byte-level BPE (the tiny test model, GPT-2 style) is "gpt-2".
    """
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if '"Digits"' in pre and '"individual_digits": true' in pre:
        return "smollm"
    return "gpt-2"
