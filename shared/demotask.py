"""The demo task: informal requests with time expressions → ``{"intent", "task", "when"}`` JSON
(the Phi-2 seed's task model), generated from templates with a seed.

Two products, disjoint by construction:

- a **train corpus** in ingest's format (OpenAI chat JSONL: ``id``, ``messages``, ``category``
  = the intent, ``source``), and
- a **held-out benchmark** in the evaluator's format, whose requests use task phrases that
  never occur in the train corpus.

Intents and time expressions come from closed vocabularies that the train corpus covers;
tasks in the benchmark are unseen. A tiny random-init model cannot learn to copy unseen words
(see the design notes), so the benchmark scores what it can learn: JSON validity, schema
validity and the ``intent`` and ``when`` fields (``score_task=True`` adds ``task``, for
pretrained bases). Same seed, same bytes.

Its answers are short (about 70 characters), below ingest's default minimum answer length
(100, FinRisk's): submit the corpus with :data:`INGEST_OVERRIDES` or every record is rejected
as ``output_too_short`` (with them, ingest keeps 987 of 1,000 at seed 0: 3 exact and 10 near
duplicates dropped).

    python -m shared.demotask DEST [--seed 0] [--train 1000] [--test 40]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

# ProcessingConfig overrides for ingesting the train corpus (see the module docstring).
INGEST_OVERRIDES: dict[str, Any] = {"min_input_chars": 0, "min_output_chars": 0}

SYSTEM_PROMPT = (
    "Turn the request into JSON with the keys intent (reminder, meeting or todo), task and when."
)
INTENTS = ("reminder", "meeting", "todo")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "reminder": (
        "remind me to {task} {when}",
        "pls remind me to {task} {when}",
        "dont let me forget to {task} {when}",
        "{when} remind me to {task}",
        "can you remind me to {task} {when}",
        "reminder: {task} {when}",
    ),
    "meeting": (
        "schedule a meeting to {task} {when}",
        "set up a meeting {when} to {task}",
        "book a call to {task} {when}",
        "can we meet {when} to {task}",
        "put a meeting on my calendar to {task} {when}",
        "need a meeting with the team to {task} {when}",
    ),
    "todo": (
        "add {task} to my todo list {when}",
        "i need to {task} {when}",
        "todo: {task} {when}",
        "gotta {task} {when}",
        "{when} i have to {task}",
        "put {task} on my list {when}",
    ),
}

# (how people write it, the normalised value in the JSON): every value occurs in training.
WHEN: tuple[tuple[str, str], ...] = (
    ("tomorrow at 9am", "tomorrow 9am"),
    ("tmrw at 9am", "tomorrow 9am"),
    ("tomorrow morning", "tomorrow morning"),
    ("tmrw morning", "tomorrow morning"),
    ("tonight", "tonight"),
    ("later tonight", "tonight"),
    ("today at noon", "today 12pm"),
    ("by noon", "today 12pm"),
    ("later today", "today"),
    ("this afternoon", "today afternoon"),
    ("next monday", "next monday"),
    ("on monday at 3pm", "monday 3pm"),
    ("friday afternoon", "friday afternoon"),
    ("on friday afternoon", "friday afternoon"),
    ("next week", "next week"),
    ("on the first", "the 1st"),
    ("on sunday", "sunday"),
    ("this weekend", "this weekend"),
    ("at 5pm", "today 5pm"),
    ("in an hour", "in 1 hour"),
    ("in 2 hours", "in 2 hours"),
    ("every morning", "every morning"),
    ("on wednesday at 10am", "wednesday 10am"),
    ("next month", "next month"),
)

# Task phrases for training, and disjoint ones only the benchmark uses.
TRAIN_TASKS = (
    "call mom",
    "buy groceries",
    "pay rent",
    "send the report",
    "water the plants",
    "review the pull request",
    "book the dentist",
    "email the landlord",
    "clean the kitchen",
    "walk the dog",
    "renew my passport",
    "pick up the kids",
    "pay the phone bill",
    "call the bank",
    "finish the slides",
    "plan the budget",
    "fix the bike",
    "order pizza",
    "wash the car",
    "read the contract",
    "call the plumber",
    "update the roadmap",
    "prepare the demo",
    "cancel the gym",
    "buy a gift for dad",
    "back up the laptop",
    "write the newsletter",
    "check the invoices",
    "call grandma",
    "take out the trash",
    "return the library books",
    "book flights",
    "submit the expense report",
    "feed the cat",
    "go for a run",
    "call the insurance",
    "review the budget",
    "print the tickets",
    "sign the lease",
    "reply to the recruiter",
    "schedule the oil change",
    "buy milk",
    "send the invoice",
    "call the doctor",
    "clean the garage",
    "pay the credit card",
    "review the design doc",
    "plan the offsite",
    "fix the sink",
    "order new glasses",
)
HELDOUT_TASKS = (
    "water the garden",
    "call the electrician",
    "buy concert tickets",
    "send the contract",
    "review the quarterly numbers",
    "book a haircut",
    "email the accountant",
    "clean the windows",
    "pick up the dry cleaning",
    "renew the car insurance",
    "plan the birthday party",
    "update the resume",
    "return the package",
    "call the vet",
    "pay the water bill",
    "prepare the tax forms",
    "buy a new charger",
    "fix the printer",
    "read the onboarding guide",
    "schedule the movers",
)
_PREFIXES = ("", "", "", "hey ", "ok so ", "um ", "yo ")
_SUFFIXES = ("", "", "", " pls", " thx", "!", " asap")

SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["intent", "task", "when"],
    "properties": {
        "intent": {"enum": list(INTENTS)},
        "task": {"type": "string", "minLength": 1},
        "when": {"type": "string", "minLength": 1},
    },
    "additionalProperties": False,
}


def answer(intent: str, task: str, when: str) -> str:
    """The assistant turn: compact JSON with the keys in a fixed order."""
    return json.dumps({"intent": intent, "task": task, "when": when})


def _example(rng: random.Random, tasks: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    intent = rng.choice(INTENTS)
    template = rng.choice(TEMPLATES[intent])
    task = rng.choice(tasks)
    surface, when = rng.choice(WHEN)
    text = template.format(task=task, when=surface)
    text = rng.choice(_PREFIXES) + text + rng.choice(_SUFFIXES)
    if rng.random() < 0.15:
        text = text.capitalize()
    return text, {"intent": intent, "task": task, "when": when}


def train_records(seed: int = 0, n: int = 1000) -> list[dict[str, Any]]:
    """The train corpus in ingest's OpenAI chat format (category = intent)."""
    rng = random.Random(f"demotask-train-{seed}")
    out: list[dict[str, Any]] = []
    for i in range(n):
        text, fields = _example(rng, TRAIN_TASKS)
        out.append(
            {
                "id": f"demotask-{seed}-{i:05d}",
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                    {"role": "assistant", "content": answer(**fields)},
                ],
                "category": fields["intent"],
                "source": "demotask",
            }
        )
    return out


def benchmark(seed: int = 0, n: int = 40, *, score_task: bool = False) -> dict[str, Any]:
    """The held-out benchmark (evaluator format): unseen tasks, seen intents and times."""
    rng = random.Random(f"demotask-test-{seed}")
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(items) < n:
        text, fields = _example(rng, HELDOUT_TASKS)
        if text in seen and len(seen) < 5000:
            continue
        seen.add(text)
        items.append(
            {
                "id": f"demotask-{len(items):03d}",
                "category": fields["intent"],
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": text},
                ],
                "expected": fields,
            }
        )
    scored = ["intent", "task", "when"] if score_task else ["intent", "when"]
    return {
        "name": "demotask",
        "description": (
            "Informal requests with time expressions to {intent, task, when} JSON, held out "
            "from the demo train corpus (unseen task phrases). Scores JSON validity, schema "
            f"validity and the fields {', '.join(scored)}."
        ),
        "scorer": {"type": "json_schema", "schema": SCHEMA, "fields": scored},
        "items": items,
    }


def write(dest: Path, *, seed: int = 0, n_train: int = 1000, n_test: int = 40) -> tuple[Path, Path]:
    """``dest/train.jsonl`` and ``dest/benchmark.json``."""
    dest.mkdir(parents=True, exist_ok=True)
    train = dest / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_records(seed, n_train)))
    bench = dest / "benchmark.json"
    bench.write_text(json.dumps(benchmark(seed, n_test), indent=1) + "\n")
    return train, bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=40)
    args = parser.parse_args(argv)
    train, bench = write(args.dest, seed=args.seed, n_train=args.train, n_test=args.test)
    print(train)
    print(bench)


if __name__ == "__main__":
    main()
