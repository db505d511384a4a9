"""The whole pipeline on small corpora: dedupe, split, curriculum, versions, reports."""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError

from services.ingest.pipeline import curriculum
from services.ingest.pipeline.formats import SourceFile
from services.ingest.pipeline.run import Pipeline, previous_sources
from services.ingest.settings import ProcessingConfig
from tests.unit.ingest.corpus import alpaca, records, sentence, write_array, write_jsonl


def run(tmp: Path, sources, config=None, name="line", previous=None, executor=None):
    pipe = Pipeline(config or ProcessingConfig(), dataset_name=name, executor=executor)
    return pipe.run(sources, workdir=tmp / f"out-{random.random()}", previous=previous)


def read(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_output_records_follow_the_split_contract(tmp_path: Path):
    src = write_jsonl(tmp_path / "a.jsonl", records(30, seed=1, category="tax", source="seed"))
    out = run(tmp_path, [SourceFile(src, "a.jsonl")])
    rows = read(out.train_path) + read(out.validation_path)
    assert len(rows) == 30 == out.kept
    for row in rows:
        assert set(row) == {"id", "messages", "category", "source"}
        assert row["category"] == "tax" and row["source"] == "seed"
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert len({r["id"] for r in rows}) == 30


def test_exact_and_near_duplicates_are_removed_keeping_the_first(tmp_path: Path):
    rows = records(20, seed=2)
    exact = dict(rows[3])
    exact["output"] = "  " + rows[3]["output"].upper() + " "  # same after normalising
    words = rows[5]["output"].split()
    words[len(words) // 2] = "changed"
    near = dict(rows[5], output=" ".join(words))
    src = write_jsonl(tmp_path / "a.jsonl", [*rows, exact, near])
    out = run(tmp_path, [SourceFile(src, "a.jsonl")])
    assert out.kept == 20
    assert out.report["dedupe"]["exact"] == 1 and out.report["dedupe"]["near"] == 1
    reasons = {e["line"]: e["reason"] for e in out.report["rejected_examples"]}
    assert reasons == {21: "duplicate of a.jsonl:4", 22: "near-duplicate of a.jsonl:6"}
    off = run(tmp_path, [SourceFile(src, "a.jsonl")], ProcessingConfig(near_dedupe=False))
    assert off.kept == 21  # without near-dedupe only the exact copy goes


def test_similar_but_different_records_are_kept(tmp_path: Path):
    # Templated requests differing in their content words are not near-duplicates.
    rows = [
        alpaca(
            f"Remind me to call {who} tomorrow at {h} pm about the quarterly report",
            f'{{"intent": "reminder", "task": "call {who} about the quarterly report", '
            f'"when": "tomorrow {h}:00", "notes": "' + "x" * 40 + '"}',
        )
        for who, h in [("mom", 5), ("dad", 6), ("the bank", 3), ("our auditor", 4)]
    ]
    src = write_jsonl(tmp_path / "t.jsonl", rows)
    out = run(tmp_path, [SourceFile(src, "t.jsonl")], ProcessingConfig(min_output_chars=50))
    assert out.kept == 4


def test_split_is_deterministic_and_stratified(tmp_path: Path):
    rows = records(100, seed=3, category="a") + records(40, seed=4, category="b")
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    first = run(tmp_path, [SourceFile(src, "s.jsonl")])
    second = run(tmp_path, [SourceFile(src, "s.jsonl")])
    assert first.train_path.read_bytes() == second.train_path.read_bytes()
    assert first.dataset_id == second.dataset_id
    by_cat = first.report["split"]["by_category"]
    assert by_cat == {"a": {"train": 90, "validation": 10}, "b": {"train": 36, "validation": 4}}
    reseeded = run(tmp_path, [SourceFile(src, "s.jsonl")], ProcessingConfig(split_seed=7))
    assert {r["id"] for r in read(reseeded.validation_path)} != {
        r["id"] for r in read(first.validation_path)
    }
    assert reseeded.dataset_id != first.dataset_id  # the config is part of the version


def test_domain_per_file_and_per_record(tmp_path: Path):
    a = write_jsonl(tmp_path / "a.jsonl", records(5, seed=5))
    b = write_array(tmp_path / "b.json", records(5, seed=6, fmt="sharegpt", domain="fx"))
    out = run(tmp_path, [SourceFile(a, "a.jsonl", domain="credit"), SourceFile(b, "b.json")])
    assert out.counts_by_category == {"credit": 5, "fx": 5}
    assert out.counts_by_source == {"a": 5, "b": 5}
    assert [i["format"] for i in out.report["inputs"]] == ["alpaca", "sharegpt"]


def test_pii_is_scrubbed_before_anything_is_written(tmp_path: Path):
    rows = records(3, seed=7)
    rows[0]["output"] += " Reach me at jane.doe@example.com or (555) 123-4567."
    rows[1]["instruction"] += " My card is 4111 1111 1111 1111 and SSN 123-45-6789."
    src = write_jsonl(tmp_path / "p.jsonl", rows)
    out = run(tmp_path, [SourceFile(src, "p.jsonl")])
    written = out.train_path.read_bytes() + out.validation_path.read_bytes()
    for secret in (b"jane.doe", b"123-4567", b"4111", b"6789"):
        assert secret not in written
    assert out.report["pii_scrubbed"] == {
        "email": 1,
        "iban": 0,
        "card": 1,
        "ssn": 1,
        "ip": 0,
        "phone": 1,
    }
    assert b"jane" not in out.rejects_path.read_bytes()


def test_everything_rejected_gives_no_version(tmp_path: Path):
    src = write_jsonl(tmp_path / "bad.jsonl", [alpaca("short", "short")] * 3)
    out = run(tmp_path, [SourceFile(src, "bad.jsonl")])
    assert out.dataset_id is None and out.kept == 0
    assert out.report["rejected_by_reason"] == {"input_too_short": 3}


def test_report_stats_and_target_gap(tmp_path: Path):
    rows = records(10, seed=8)
    rows.append(alpaca("p" * 60, ""))  # empty answer
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    out = run(
        tmp_path,
        [SourceFile(src, "r.jsonl")],
        ProcessingConfig(target_count=1200, short_output_chars=300),
    )
    rep = out.report
    assert rep["target"] == {"count": 1200, "have": 10, "gap": 1190, "progress": "10 of 1,200"}
    assert rep["outputs"]["empty"] == 1
    assert rep["outputs"]["short"] == sum(1 for r in rows[:10] if len(r["output"]) < 300)
    assert rep["lengths"]["output_chars"]["max"] == max(len(r["output"]) for r in rows[:10])


def test_reingesting_on_top_of_the_previous_version_reproduces_it(tmp_path: Path):
    src = write_jsonl(tmp_path / "a.jsonl", records(40, seed=9))
    v1 = run(tmp_path, [SourceFile(src, "a.jsonl")])
    prev = previous_sources(v1.train_path, v1.validation_path, "line@1")
    again = run(tmp_path, [SourceFile(src, "a.jsonl")], previous=prev)
    assert again.dataset_id == v1.dataset_id
    assert again.report["dedupe"]["exact"] == 40 and again.new_records == 0
    # New records extend the line; the old ones keep their split.
    more = write_jsonl(tmp_path / "b.jsonl", records(20, seed=10))
    v2 = run(tmp_path, [SourceFile(src, "a.jsonl"), SourceFile(more, "b.jsonl")], previous=prev)
    assert v2.dataset_id != v1.dataset_id and v2.kept == 60 and v2.new_records == 20
    old_val = {r["id"] for r in read(v1.validation_path)}
    assert old_val <= {r["id"] for r in read(v2.validation_path)}
    # A near-duplicate of a previous record is dropped too.
    words = read(v1.train_path)[0]["messages"][-1]["content"].split()
    words[3] = "different"
    near = write_jsonl(
        tmp_path / "n.jsonl",
        [alpaca(read(v1.train_path)[0]["messages"][0]["content"], " ".join(words))],
    )
    v3 = run(tmp_path, [SourceFile(near, "n.jsonl")], previous=prev)
    assert v3.report["dedupe"]["near"] == 1 and v3.dataset_id == v1.dataset_id


def test_worker_processes_give_the_same_version(tmp_path: Path):
    rows = records(300, seed=11) + records(50, seed=11)  # 50 exact duplicates
    src = write_jsonl(tmp_path / "w.jsonl", rows)
    inline = run(tmp_path, [SourceFile(src, "w.jsonl")])
    with ProcessPoolExecutor(2) as pool:
        import services.ingest.pipeline.run as run_module

        old = run_module.CHUNK_RECORDS
        run_module.CHUNK_RECORDS = 64  # several chunks in flight
        try:
            pooled = run(tmp_path, [SourceFile(src, "w.jsonl")], executor=pool)
        finally:
            run_module.CHUNK_RECORDS = old
    assert pooled.dataset_id == inline.dataset_id
    assert pooled.report["dedupe"]["exact"] == 50


def test_unreadable_file_is_reported_and_other_files_still_ingested(tmp_path: Path):
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"\x1f\x8b" + b"not really gzip")
    good = write_jsonl(tmp_path / "good.jsonl", records(5, seed=12))
    out = run(tmp_path, [SourceFile(bad, "bad.jsonl.gz"), SourceFile(good, "good.jsonl")])
    assert out.kept == 5
    assert out.report["rejected_by_reason"] == {"file": 1}


# ---------------------------------------------------------------- curriculum


def test_curriculum_respects_weights_targets_and_seed():
    rng = random.Random(0)
    ids = [f"r{i}" for i in range(1000)]
    domains = ["big"] * 700 + ["mid"] * 250 + ["small"] * 50
    lengths = [rng.randint(100, 5000) for _ in ids]
    kwargs = dict(
        seed=42,
        targets={"A": 500, "B": 600, "C": 30},
        domain_weights={},
        temperature=0.5,
        stress_fraction=0.1,
    )
    m = curriculum.build_manifests(ids, domains, lengths, **kwargs)
    assert [len(m[p]["record_ids"]) for p in "ABC"] == [500, 600, 30]
    dom = dict(zip(ids, domains, strict=True))
    a = [dom[r] for r in m["A"]["record_ids"]]
    assert a == sorted(a)  # domain blocks
    assert Counter(a) == {"big": 350, "mid": 125, "small": 25}  # proportional to size
    b = Counter(dom[r] for r in m["B"]["record_ids"])
    w = {d: n**0.5 for d, n in {"big": 700, "mid": 250, "small": 50}.items()}
    for d in w:
        assert abs(b[d] - 600 * w[d] / sum(w.values())) <= 1
    assert max(b.values()) / 600 < 0.7 * 0.9  # the big domain no longer dominates
    longest = set(sorted(ids, key=lambda r: -lengths[int(r[1:])])[:30])
    assert set(m["C"]["record_ids"]) == longest
    assert m == curriculum.build_manifests(ids, domains, lengths, **kwargs)
    assert m["A"]["seed"] == 42 and set(m["A"]) == {"phase", "description", "seed", "record_ids"}
    explicit = curriculum.build_manifests(
        ids, domains, lengths, **{**kwargs, "domain_weights": {"big": 1, "mid": 1, "small": 2}}
    )
    assert Counter(dom[r] for r in explicit["B"]["record_ids"]) == {
        "big": 150,
        "mid": 150,
        "small": 300,
    }  # small repeats its 50 records


def test_curriculum_interleaves_domains_in_phase_b():
    ids = [f"r{i}" for i in range(200)]
    domains = ["x"] * 100 + ["y"] * 100
    m = curriculum.build_manifests(
        ids,
        domains,
        [1] * 200,
        seed=1,
        targets={},
        domain_weights={},
        temperature=0.5,
        stress_fraction=0.1,
    )
    b = [d for r in m["B"]["record_ids"] for d in [domains[int(r[1:])]]]
    runs = sum(1 for i in range(1, len(b)) if b[i] != b[i - 1])
    assert runs > 150  # alternating, not blocks


def test_quotas_sum_exactly():
    assert sum(curriculum.quotas(7, {"a": 1, "b": 1, "c": 1}).values()) == 7
    assert curriculum.quotas(0, {"a": 1}) == {"a": 0}


@pytest.mark.parametrize(
    "bad", [{"validation_fraction": 1.5}, {"near_threshold": 0}, {"num_perm": 4}]
)
def test_processing_config_is_validated(bad):
    with pytest.raises(ValidationError):
        ProcessingConfig().with_overrides(bad)


def test_sentence_helper_makes_unique_text():
    rng = random.Random(1)
    assert sentence(rng, 50) != sentence(rng, 50)


def test_near_duplicate_index_finds_candidates_and_confirms_them():
    from services.ingest.pipeline import dedupe

    rng = random.Random(3)
    texts = [sentence(rng, 400).encode() for _ in range(6)]
    near = texts[0].replace(texts[0].split()[5], b"zzz", 1)
    sigs = dedupe.signatures([*texts, near], num_perm=128)
    index = dedupe.NearDuplicateIndex(threshold=0.8, num_perm=128)
    keys = index.keys(sigs)
    found, check = index.check_chunk(keys[:6])
    assert not check.any() and (found == -1).all()  # nothing indexed, no two alike
    rows = np.arange(6)
    index.store(rows, sigs[:6])
    index.index(keys[:6].ravel(), np.repeat(rows, keys.shape[1]))
    found, check = index.check_chunk(keys[6:])
    assert check.all()
    candidates = {int(c) for c in found[0] if c >= 0}
    assert candidates == {0}
    assert index.similar(candidates, sigs[6]) == 0
    assert index.similar({1, 2}, sigs[6]) is None  # candidates are confirmed, not trusted


def test_key_index_maps_keys_to_their_first_value_across_growth():
    from services.ingest.pipeline.dedupe import KeyIndex

    index = KeyIndex(capacity=16)
    rng = np.random.default_rng(0)
    # Keys that collide in the low and the high bits, added in batches that force growth.
    keys = rng.permutation(np.arange(1, 5001, dtype=np.uint64) * np.uint64(2**50 + 7))
    keys[:50] = np.arange(50, dtype=np.uint64) << np.uint64(40)  # 0 is a key like any other
    for lo in range(0, 5000, 700):
        part = keys[lo : lo + 700]
        index.add(part, np.arange(lo, lo + len(part)))
    assert index.size == 5000 and len(index._keys) >= 10000
    assert index.lookup(keys).tolist() == list(range(5000))
    probe = np.concatenate([keys[[0, 4999, 1234]], np.array([7, 2**64 - 1], dtype=np.uint64)])
    assert index.lookup(probe).tolist() == [0, 4999, 1234, -1, -1]
    assert KeyIndex().lookup(probe).tolist() == [-1] * 5
    assert KeyIndex().lookup(np.zeros(0, dtype=np.uint64)).tolist() == []


def test_a_phase_with_no_records_gets_no_manifest(tmp_path: Path):
    src = write_jsonl(tmp_path / "a.jsonl", records(20, seed=13))
    out = run(
        tmp_path, [SourceFile(src, "a.jsonl")], ProcessingConfig(target_records={"A": 0, "B": 7})
    )
    assert sorted(out.manifest_paths) == ["B", "C"]
    assert len(orjson.loads(out.manifest_paths["B"].read_bytes())["record_ids"]) == 7


def _shingle_jaccard(a: bytes, b: bytes) -> float:
    def grams(t: bytes) -> set[tuple[bytes, ...]]:
        w = t.split()
        return {tuple(w[i : i + 3]) for i in range(max(1, len(w) - 2))}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


def test_signatures_estimate_jaccard_similarity_without_bias():
    """One-permutation MinHash: the share of agreeing positions estimates the Jaccard
    similarity of the word 3-shingle sets (here within 0.02 on average over 200 pairs and
    never off by more than 0.2), whatever the text length and wherever batches split."""
    from services.ingest.pipeline import dedupe

    rng = random.Random(11)
    pairs = []
    for _ in range(200):
        words = sentence(rng, rng.choice([60, 400, 3000])).encode().split()
        other = list(words)
        for _ in range(int(len(words) * rng.random() * 0.3)):
            other[rng.randrange(len(other))] = b"w%d" % rng.randrange(10**9)
        pairs.append((b" ".join(words), b" ".join(other)))
    flat = [t for p in pairs for t in p]
    sigs = dedupe.signatures(flat, num_perm=128)
    errors = np.array(
        [
            np.mean(sigs[2 * i] == sigs[2 * i + 1]) - _shingle_jaccard(a, b)
            for i, (a, b) in enumerate(pairs)
        ]
    )
    assert abs(errors.mean()) < 0.02 and np.abs(errors).max() < 0.2
    # A text's signature does not depend on the batch it was sketched in.
    assert (dedupe.signatures(flat[:7], num_perm=128) == sigs[:7]).all()
    alone = dedupe.signatures([flat[5]], num_perm=128)
    assert (alone[0] == sigs[5]).all()
    # Any number of permutations; short texts (fewer words than a shingle) and no words.
    short = dedupe.signatures([b"hi", b"hi", b"hi there", b"", b" \n "], num_perm=100)
    assert short.shape == (5, 100)
    assert (short[0] == short[1]).all() and not (short[0] == short[2]).all()
    assert (short[3] == short[4]).all()


def test_line_numbers_survive_reading_in_byte_ranges(tmp_path: Path, monkeypatch):
    """Workers read ranges of a plain JSONL file themselves; rejections and duplicates still
    name the right lines, whatever the range size (and with worker processes)."""

    from services.ingest.pipeline import run as run_module

    rows = [orjson.dumps(r) for r in records(60, seed=21)]
    rows.insert(10, b'{"instruction": "broken')  # line 11
    rows.insert(30, b"")  # line 31: blank
    rows.append(rows[5])  # line 63: duplicate of line 6
    src = tmp_path / "r.jsonl"
    src.write_bytes(b"\n".join(rows) + b"\n")
    expected = {11: "parse", 63: "exact_duplicate"}
    for block in (300, 4096, 1 << 21):
        monkeypatch.setattr(run_module, "BLOCK_BYTES", block)
        out = run(tmp_path, [SourceFile(src, "r.jsonl")])
        got = {e["line"]: e["code"] for e in out.report["rejected_examples"]}
        assert got == expected, block
        dup = next(e for e in out.report["rejected_examples"] if e["line"] == 63)
        assert dup["reason"] == "duplicate of r.jsonl:6"
        assert out.kept == 60
    with ProcessPoolExecutor(2) as pool:
        pipe = run_module.Pipeline(ProcessingConfig(), dataset_name="t", executor=pool)
        out = pipe.run([SourceFile(src, "r.jsonl")], workdir=tmp_path / "pool")
    assert {e["line"]: e["code"] for e in out.report["rejected_examples"]} == expected


def test_stress_phase_picks_the_longest_ties_by_id_as_a_full_sort_would():
    import heapq

    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 300)
        lengths = [rng.randint(1, 20) for _ in range(n)]  # many ties
        ids = [f"r{rng.randint(0, 50):03d}x{i}" for i in range(n)]
        if rng.random() < 0.2:  # NUL in an id: the heap path, not numpy's strings
            ids = [f"{x}\0" if rng.random() < 0.5 else x for x in ids]
        for k in (1, rng.randint(1, n), n):
            expected = heapq.nsmallest(k, range(n), key=lambda i: (-lengths[i], ids[i]))
            assert curriculum._longest(np.asarray(lengths), ids, k).tolist() == expected
    assert curriculum._longest(np.asarray([5, 3]), ["a", "b"], 0).tolist() == []


@pytest.mark.parametrize("gz", [False, True])
def test_a_huge_line_is_rejected_without_being_held_whole(tmp_path: Path, monkeypatch, gz):
    """Past MAX_RECORD_BYTES a line is cut short while it is read (by the byte-range readers
    and by the gzip block reader), reported as too long at its line, and the lines around it
    are read as usual."""
    import gzip

    from services.ingest.pipeline import formats
    from services.ingest.pipeline import run as run_module

    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1000)
    monkeypatch.setattr(formats, "BLOCK_BYTES", 256)
    monkeypatch.setattr(run_module, "BLOCK_BYTES", 256)
    rows = [orjson.dumps(r) for r in records(6, seed=31)]
    rows.insert(2, b'{"instruction": "' + b"x" * 5000 + b'", "output": "y"}')  # line 3
    data = b"\n".join(rows) + b"\n"
    src = tmp_path / ("h.jsonl.gz" if gz else "h.jsonl")
    src.write_bytes(gzip.compress(data) if gz else data)
    if not gz:
        pieces = [
            formats.read_line_range(src, s, min(len(data), s + 256))
            for s in range(0, len(data), 256)
        ]
        assert max(map(len, pieces)) <= 256 + 1001 + 1000  # never the whole 5 KB line
    out = run(tmp_path, [SourceFile(src, src.name, "alpaca")])
    assert out.kept == 6
    [entry] = out.report["rejected_examples"]
    assert (entry["line"], entry["code"]) == (3, "parse") and "longer than" in entry["reason"]


def test_format_detection_skips_a_huge_first_line(tmp_path: Path, monkeypatch):
    from services.ingest.pipeline import formats

    monkeypatch.setattr(formats, "MAX_RECORD_BYTES", 1000)
    rows = [b'{"junk": "' + b"z" * 50_000 + b'"}', *(orjson.dumps(r) for r in records(4, seed=41))]
    src = tmp_path / "d.jsonl"
    src.write_bytes(b"\n".join(rows))
    out = run(tmp_path, [SourceFile(src, "d.jsonl")])  # format auto
    assert out.report["inputs"][0]["format"] == "alpaca" and out.kept == 4
    assert [e["line"] for e in out.report["rejected_examples"]] == [1]


def _reference_manifests(ids, domains, lengths, *, seed, targets, domain_weights, **rest):
    """The list-and-tuple version the numpy one replaced: the same manifests, bit for bit."""
    import heapq
    import math
    from collections import defaultdict

    def take(records, count, rng):
        out = []
        while len(out) < count:
            order = rng.permutation(len(records))[: count - len(out)]
            out.extend([records[i] for i in order.tolist()])
        return out

    by_domain = defaultdict(list)
    for record_id, domain in zip(ids, domains, strict=True):
        by_domain[domain].append(record_id)
    n = len(ids)
    sizes = {d: len(r) for d, r in by_domain.items()}
    rng = np.random.default_rng([seed % 2**32, 0])
    order_a = []
    for domain, count in sorted(curriculum.quotas(targets.get("A", n), sizes).items()):
        order_a += take(by_domain[domain], count, rng)
    rng = np.random.default_rng([seed % 2**32, 1])
    weights = curriculum.phase_b_weights(sizes, domain_weights, rest["temperature"])
    placed = []
    for domain, count in sorted(curriculum.quotas(targets.get("B", n), weights).items()):
        picks = take(by_domain[domain], count, rng)
        phase = float(rng.random())
        placed += [((k + phase) / count, rid) for k, rid in enumerate(picks)]
    placed.sort()
    rng = np.random.default_rng([seed % 2**32, 2])
    target_c = targets.get("C", max(1, math.ceil(n * rest["stress_fraction"])) if n else 0)
    k = min(target_c, n)
    longest = heapq.nsmallest(k, range(n), key=lambda i: (-lengths[i], ids[i])) if k > 0 else []
    pool = [ids[i] for i in longest]
    record_ids = {
        "A": order_a,
        "B": [rid for _, rid in placed],
        "C": take(pool, target_c, rng) if pool else [],
    }
    return {
        p: {"phase": p, "description": curriculum.DESCRIPTIONS[p], "seed": seed, "record_ids": r}
        for p, r in record_ids.items()
    }


def test_curriculum_gives_what_the_list_version_gave():
    rng = random.Random(11)
    for _ in range(150):
        n = rng.choice([0, 1, 2, 3, 10, 57, 500, 2000])
        ids = list(
            dict.fromkeys(
                rng.choice(["r", "x", "r\0", "é", ""]) + f"{rng.getrandbits(20):x}"
                if rng.random() < 0.3
                else f"r{i:05d}"
                for i in range(n)
            )
        )
        domains = [rng.choice("bazmqc"[: rng.randint(1, 6)]) for _ in ids]
        lengths = [rng.choice([rng.randint(1, 30), rng.randint(1, 5000)]) for _ in ids]
        kwargs = dict(
            seed=rng.randint(0, 2**40),
            targets=rng.choice(
                [{}, {"A": rng.randint(0, 3000)}, {"B": rng.randint(0, 3000), "C": 99}, {"C": 0}]
            ),
            domain_weights=rng.choice([{}, {"a": 2.0, "b": 0.5}, {"a": 0.0}]),
            temperature=rng.choice([0.5, 1.0, 0.0]),
            stress_fraction=rng.choice([0.1, 0.5, 0.0]),
        )
        expected = _reference_manifests(ids, domains, lengths, **kwargs)
        assert curriculum.build_manifests(ids, domains, lengths, **kwargs) == expected


def test_a_failure_after_the_split_writer_started_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The split files are written by a worker while the curriculum is built: if that fails,
    the run ends only once the writer has (nothing keeps writing into a run that is over)."""
    from concurrent.futures import ThreadPoolExecutor

    rows = records(3000, seed=12)
    src = write_jsonl(tmp_path / "a.jsonl", rows)

    def broken(*args, **kwargs):
        raise RuntimeError("curriculum broke")

    monkeypatch.setattr(curriculum, "manifest_rows", broken)
    work = tmp_path / "run"
    with ThreadPoolExecutor(2) as executor:
        pipe = Pipeline(ProcessingConfig(), dataset_name="x", executor=executor)
        with pytest.raises(RuntimeError, match="curriculum broke"):
            pipe.run([SourceFile(src, "a.jsonl")], workdir=work)
        assert not list((work / "chunks").iterdir())  # every chunk copied and deleted
        kept = len(read(work / "train.jsonl")) + len(read(work / "validation.jsonl"))
        assert kept == pipe.meta.fixed_split.count(0) == len(pipe.meta.ids) > 2500


def test_split_assignment_ranks_as_a_full_lexsort_would_ties_included():
    """New records go to validation per category by (split order, arrival): the quicksort
    shortcut must rank exactly as the stable two-key sort, with ties in the order hash
    (none in practice, but the result must not depend on that) and previous-version rows."""
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        categories = int(rng.integers(1, 8))
        pipe = Pipeline(ProcessingConfig(validation_fraction=0.25), dataset_name="x")
        meta = pipe.meta
        high = 30 if trial % 2 else 2**63  # small: many ties in the order hash
        order = rng.integers(0, high, n, dtype=np.uint64)
        codes = rng.integers(0, categories, n).astype(np.uint32)
        fixed = rng.choice(np.array([0, 0, 0, 1, 2], dtype=np.uint8), n)
        cuts = np.sort(rng.integers(0, n + 1, 3))
        meta.split_order = np.split(order, cuts)
        meta.category_codes.extend(codes.tolist())
        meta.fixed_split.extend(fixed.tobytes())
        pipe._category_code = {f"c{c}": c for c in range(categories)}

        expected = fixed.copy()
        new = np.flatnonzero(fixed == 0)
        ranked = np.lexsort((order[new], codes[new]))
        for code in range(categories):
            group = new[ranked][codes[new][ranked] == code]
            n_val = int(np.floor(len(group) * 0.25 + 0.5))
            expected[group] = 1
            expected[group[:n_val]] = 2
        assert pipe._assign_splits().tolist() == expected.tolist()


@pytest.mark.parametrize("digest_first", [True, False])
def test_split_files_and_digests_come_out_the_same_whichever_job_runs_first(
    tmp_path: Path, digest_first: bool
):
    """The train file is hashed by one job and written by another, from the same chunk
    files, each of which the second of the two to be done with it deletes."""
    import hashlib

    from services.ingest.pipeline.run import split_digest, write_splits

    rng = random.Random(9)
    plan, expected = [], {1: b"", 2: b""}
    for c in range(6):
        lines = [f'{{"n": "{c}-{i}-{"x" * rng.randint(0, 3000)}"}}\n'.encode() for i in range(50)]
        split = np.asarray([rng.choice([0, 1, 1, 1, 2]) for _ in lines], dtype=np.uint8)
        if c == 2:
            split[:] = 0  # nothing kept: its file may not even exist
        path = tmp_path / "chunks" / f"{c:07d}.jsonl"
        path.parent.mkdir(exist_ok=True)
        if c != 2:
            path.write_bytes(b"".join(lines))
        for line, code in zip(lines, split.tolist(), strict=True):
            if code:
                expected[code] += line
        sizes = np.asarray([len(x) for x in lines], dtype=np.uint32)
        plan.append((str(path), sizes, split))
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    if digest_first:
        train_digest = split_digest(plan, 1)
        validation_digest = write_splits(plan, train, validation, digest_of=2)
    else:
        validation_digest = write_splits(plan, train, validation, digest_of=2)
        train_digest = split_digest(plan, 1)
    assert train.read_bytes() == expected[1] and validation.read_bytes() == expected[2]
    assert train_digest == hashlib.sha256(expected[1]).hexdigest()
    assert validation_digest == hashlib.sha256(expected[2]).hexdigest()
    assert not list((tmp_path / "chunks").iterdir())
