"""The dataset's chat-record JSONL → texts for perplexity, calibration and generation prompts.

Records are ``{"id", "messages": [{"role", "content"}...], "category", "source"}`` (see
docs/DEVELOPING.md). Malformed lines are counted and skipped; a file with no usable record is
an error the caller turns into a failure event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = {"system", "user", "assistant"}


class DatasetError(ValueError):
    """The validation split cannot be used (missing, too large, nothing valid in it)."""


@dataclass
class ChatRecords:
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    skipped: int = 0


def _valid_messages(obj: Any, max_chars: int) -> list[dict[str, str]] | None:
    if not isinstance(obj, dict):
        return None
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    out: list[dict[str, str]] = []
    total = 0
    for m in messages:
        if not isinstance(m, dict):
            return None
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            return None
        total += len(content)
        out.append({"role": role, "content": content})
    if total > max_chars or not any(m["role"] == "assistant" for m in out):
        return None
    return out


def read_chat_jsonl(
    path: Path,
    *,
    max_records: int,
    max_bytes: int = 64 * 1024 * 1024,
    max_chars_per_record: int = 32_000,
) -> ChatRecords:
    """Read up to ``max_records`` valid conversations; refuse files over ``max_bytes``."""
    size = path.stat().st_size
    if size > max_bytes:
        raise DatasetError(f"validation split is {size} bytes, over the {max_bytes} limit")
    records = ChatRecords()
    with path.open("rb") as fh:
        for raw in fh:
            if len(records.conversations) >= max_records:
                break
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                records.skipped += 1
                continue
            messages = _valid_messages(obj, max_chars_per_record)
            if messages is None:
                records.skipped += 1
                continue
            records.conversations.append(messages)
    if not records.conversations:
        raise DatasetError(
            f"validation split has no usable chat record ({records.skipped} malformed lines)"
        )
    return records


def render(tokenizer: Any, messages: list[dict[str, str]], *, prompt_only: bool = False) -> str:
    """The conversation as the model sees it (its chat template; plain text without one)."""
    if prompt_only:
        # Everything before the last assistant turn, ready for the model to answer.
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        messages = messages[:last]
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=prompt_only
            )
        )
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + ("\nassistant:" if prompt_only else "")
