from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.trainer.training.data import (
    MAX_LINE_BYTES,
    DataError,
    parse_records,
    plan_phases,
    read_records,
)


def rec(i: int, **extra: object) -> dict[str, object]:
    return {
        "id": f"r{i}",
        "messages": [
            {"role": "user", "content": f"q{i}"},
            {"role": "assistant", "content": f"a{i}"},
        ],
        "category": "c",
        "source": "s",
        **extra,
    }


def lines(*objs: object) -> list[bytes]:
    return [json.dumps(o).encode() for o in objs]


def manifest(phase: str, ids: list[str]) -> bytes:
    return json.dumps({"phase": phase, "description": "d", "seed": 1, "record_ids": ids}).encode()


def test_valid_records_keep_only_what_training_needs() -> None:
    out = parse_records([*lines(rec(0), rec(1)), b"\n"])
    assert [r["id"] for r in out] == ["r0", "r1"]
    assert out[0] == {
        "id": "r0",
        "messages": [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe garbage", "not valid JSON"),
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'{"messages": []}', "'id' must be"),
        (json.dumps({"id": "x" * 300, "messages": []}).encode(), "'id' must be"),
        (b'{"id": "x", "messages": "hello"}', "'messages' must be"),
        (b'{"id": "x", "messages": [1]}', "message 0 must be an object"),
        (b'{"id": "x", "messages": [{"role": "tool", "content": "x"}]}', "role 'tool'"),
        (b'{"id": "x", "messages": [{"role": "user", "content": {"$ne": 1}}]}', "must be a string"),
        (b'{"id": "x", "messages": [{"role": "user", "content": "question"}]}', "no assistant"),
        (
            json.dumps({"id": "x", "messages": [{"role": "user", "content": "q"}] * 300}).encode(),
            "'messages' must be",
        ),
    ],
)
def test_malformed_and_hostile_records_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_records([*lines(rec(0)), raw])


def test_empty_split_is_refused() -> None:
    with pytest.raises(DataError, match="no records"):
        parse_records([b"", b"  \n"])


def test_oversized_line_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(rec(0)).encode() + b"\n" + b"x" * (MAX_LINE_BYTES * 3) + b"\n")
    with pytest.raises(DataError, match="line 2: longer than"):
        read_records(path)


def test_no_curriculum_is_one_phase_over_the_split() -> None:
    records = parse_records(lines(rec(0), rec(1)))
    (phase,) = plan_phases(records, {})
    assert phase.name == "all" and phase.records == records and not phase.sequential
    with pytest.raises(DataError, match="no curriculum"):
        plan_phases(records, {}, ["A"])


def test_curriculum_phases_in_order_with_manifest_order_and_repeats() -> None:
    records = parse_records(lines(*(rec(i) for i in range(4))))
    phases = plan_phases(
        records,
        {"C": manifest("C", ["r3", "r0"]), "A": manifest("A", ["r2", "r1", "r2"])},
    )
    assert [p.name for p in phases] == ["A", "C"]
    assert [r["id"] for r in phases[0].records] == ["r2", "r1", "r2"]
    assert [r["id"] for r in phases[1].records] == ["r3", "r0"]
    assert all(p.sequential for p in phases)
    only = plan_phases(records, {"A": manifest("A", ["r0"]), "B": manifest("B", ["r1"])}, ["B"])
    assert [p.name for p in only] == ["B"]


@pytest.mark.parametrize(
    ("manifests", "message"),
    [
        ({"A": manifest("A", ["r0", "ghost"])}, "not in the train split"),
        ({"A": manifest("B", ["r0"])}, "says it is phase 'B'"),
        ({"A": b"{"}, "not valid JSON"),
        ({"A": b'"just a string"'}, "must be a JSON object"),
        ({"A": json.dumps({"phase": "A", "record_ids": []}).encode()}, "non-empty list"),
        ({"A": json.dumps({"phase": "A", "record_ids": [1, 2]}).encode()}, "non-empty list"),
        ({"Z": manifest("Z", ["r0"])}, "unknown curriculum phases"),
        ({"../../etc": manifest("A", ["r0"])}, "unknown curriculum phases"),
    ],
)
def test_bad_manifests_are_refused(manifests: dict[str, bytes], message: str) -> None:
    records = parse_records(lines(rec(0), rec(1)))
    with pytest.raises(DataError, match=message):
        plan_phases(records, manifests)


def test_requesting_a_phase_the_dataset_lacks_is_refused() -> None:
    records = parse_records(lines(rec(0)))
    with pytest.raises(DataError, match=r"phases \['C'\] requested"):
        plan_phases(records, {"A": manifest("A", ["r0"])}, ["C"])
