"""Small corpora for ingest tests: unique, valid records (FinRisk length bounds) in each
format, written as JSONL, JSON arrays or gzip."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import orjson

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def sentence(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < chars:
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(3, 9)))
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def pair(rng: random.Random) -> tuple[str, str]:
    return sentence(rng, rng.randint(60, 300)), sentence(rng, rng.randint(120, 500))


def alpaca(prompt: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {"instruction": prompt, "input": "", "output": answer, **extra}


def openai(prompt: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You are a careful analyst."},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ],
        **extra,
    }


def sharegpt(prompt: str, answer: str, **extra: Any) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
        **extra,
    }


def records(n: int, *, seed: int = 0, fmt: str = "alpaca", **extra: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    make = {"alpaca": alpaca, "openai": openai, "sharegpt": sharegpt}[fmt]
    return [make(*pair(rng), **extra) for _ in range(n)]


def write_jsonl(path: Path, rows: list[Any], *, gz: bool = False) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_array(path: Path, rows: list[Any]) -> Path:
    path.write_bytes(orjson.dumps(rows))
    return path
