"""A real DoRA adapter, trained for a few steps on chat records, for quantizer tests/bench."""

from __future__ import annotations

import json
import random
from pathlib import Path

INTENTS = [
    ("remind me to call mom", "reminder", "call mom"),
    ("schedule a meeting with the team", "meeting", "meeting with the team"),
    ("buy groceries", "todo", "buy groceries"),
    ("pay rent", "todo", "pay rent"),
    ("water the plants", "reminder", "water the plants"),
    ("send the report", "todo", "send the report"),
]
WHENS = ["tomorrow at 9am", "next monday", "tonight", "friday afternoon", "on the first", "by noon"]


def chat_records(n: int, *, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, intent, task = rng.choice(INTENTS)
        when = rng.choice(WHENS)
        answer = json.dumps({"intent": intent, "task": task, "when": when})
        out.append(
            {
                "id": f"r{seed}-{i}",
                "messages": [
                    {"role": "user", "content": f"{text} {when}"},
                    {"role": "assistant", "content": answer},
                ],
                "category": intent,
                "source": "test",
            }
        )
    return out


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def train_dora(base_dir: Path, out_dir: Path, *, steps: int = 12, seed: int = 0) -> Path:
    """Train a DoRA adapter (r=8, all linear layers) for ``steps`` real optimizer steps."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    if tok.pad_token is None:  # SmolLM2's tokenizer has none
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, use_dora=True, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    texts = [
        tok.apply_chat_template(r["messages"], tokenize=False)
        for r in chat_records(8, seed=seed + 100)
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    peft_model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
