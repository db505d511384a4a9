"""Curriculum manifests over the train split (after Elson's ``curriculum_sampler.py``).

- Phase A, domain blocks: each domain's records together (domains in name order, records
  shuffled within a block), each domain's share of the target proportional to its size.
- Phase B, mixed: every domain gets ``weight / sum(weights)`` of the target (explicit
  weights, or size ** temperature so that no domain dominates), interleaved evenly.
- Phase C, stress: a short epoch of the longest (hardest) records, shuffled.

Targets are met exactly; a domain asked for more records than it has repeats them.
Deterministic for a given seed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DESCRIPTIONS = {
    "A": "domain blocks: each domain's records together, share proportional to size",
    "B": "mixed: domains interleaved with weights so that no domain dominates",
    "C": "stress: the longest records, a short epoch",
}


def quotas(total: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Split ``total`` by ``weights`` (largest remainder): sums to ``total`` exactly."""
    names = sorted(w for w in weights if weights[w] > 0)
    if not names or total <= 0:
        return dict.fromkeys(weights, 0)
    weight_sum = sum(weights[n] for n in names)
    exact = {n: total * weights[n] / weight_sum for n in names}
    out = {n: math.floor(exact[n]) for n in names}
    rest = total - sum(out.values())
    for n in sorted(names, key=lambda n: (-(exact[n] - out[n]), n))[:rest]:
        out[n] += 1
    return {n: out.get(n, 0) for n in weights}


def _take(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` indices into a pool of ``size`` records: whole shuffled passes over it,
    then a partial one."""
    parts: list[np.ndarray] = []
    have = 0
    while have < count:
        parts.append(rng.permutation(size)[: count - have])
        have += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _longest(lengths: np.ndarray, ids: Sequence[str], k: int) -> np.ndarray:
    """Indices of the ``k`` longest records, longest first, ties by id: what
    ``heapq.nsmallest(k, range(n), key=lambda i: (-lengths[i], ids[i]))`` gives, with the
    n-sized part done by numpy (only records as long as the k-th longest are sorted)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    cut = np.partition(lengths, len(lengths) - k)[len(lengths) - k]  # the k-th largest
    candidates = np.flatnonzero(lengths >= cut)
    names = [ids[i] for i in candidates.tolist()]
    if any("\0" in name for name in names):  # numpy's strings drop trailing NULs
        key = lambda i: (-int(lengths[i]), ids[i])  # noqa: E731
        return np.asarray(heapq.nsmallest(k, candidates.tolist(), key=key), dtype=np.int64)
    order = np.lexsort((np.asarray(names, dtype=str), -lengths[candidates]))
    return candidates[order[:k]]


def phase_b_weights(
    sizes: Mapping[str, int], domain_weights: Mapping[str, float], temperature: float
) -> dict[str, float]:
    if domain_weights:
        return {d: float(domain_weights.get(d, 1.0)) for d in sizes}
    return {d: float(s) ** temperature for d, s in sizes.items()}


def build_manifests(
    ids: Sequence[str],
    domains: Sequence[str],
    lengths: Sequence[int],
    *,
    seed: int,
    targets: Mapping[str, int],
    domain_weights: Mapping[str, float],
    temperature: float,
    stress_fraction: float,
) -> dict[str, dict[str, Any]]:
    rows = manifest_rows(
        ids,
        domains,
        lengths,
        seed=seed,
        targets=targets,
        domain_weights=domain_weights,
        temperature=temperature,
        stress_fraction=stress_fraction,
    )
    return manifests_of(ids, rows, seed=seed)


def manifests_of(
    ids: Sequence[str], rows: Mapping[str, np.ndarray], *, seed: int
) -> dict[str, dict[str, Any]]:
    """The manifests (as written to ``curriculum-<phase>.json``) of :func:`manifest_rows`."""
    id_array = np.empty(len(ids), dtype=object)
    id_array[:] = ids
    return {
        phase: {
            "phase": phase,
            "description": DESCRIPTIONS[phase],
            "seed": seed,
            "record_ids": id_array[picked].tolist(),
        }
        for phase, picked in rows.items()
    }


def manifest_rows(
    ids: Sequence[str],
    domains: Sequence[str],
    lengths: Sequence[int] | np.ndarray,
    *,
    seed: int,
    targets: Mapping[str, int],
    domain_weights: Mapping[str, float],
    temperature: float,
    stress_fraction: float,
) -> dict[str, np.ndarray]:
    """Per phase, the records it lists, as indices into ``ids``, in manifest order."""
    code_of: dict[str, int] = {}
    codes = np.fromiter(
        (code_of.setdefault(d, len(code_of)) for d in domains), dtype=np.int64, count=len(ids)
    )
    grouped = np.argsort(codes, kind="stable")  # each domain's records, in input order
    ends = np.cumsum(np.bincount(codes, minlength=len(code_of))).tolist()
    by_domain = {d: grouped[(ends[c - 1] if c else 0) : ends[c]] for d, c in code_of.items()}
    n = len(ids)
    sizes = {d: len(r) for d, r in by_domain.items()}
    rows: dict[str, np.ndarray] = {}
    empty = np.zeros(0, dtype=np.int64)

    rng = np.random.default_rng([seed % 2**32, 0])
    target_a = targets.get("A", n)
    rows["A"] = np.concatenate(
        [
            empty,
            *(
                by_domain[domain][_take(count, sizes[domain], rng)]
                for domain, count in sorted(quotas(target_a, sizes).items())
            ),
        ]
    )

    rng = np.random.default_rng([seed % 2**32, 1])
    weights = phase_b_weights(sizes, domain_weights, temperature)
    placed: list[np.ndarray] = [np.zeros(0)]
    picked: list[np.ndarray] = [empty]
    for domain, count in sorted(quotas(targets.get("B", n), weights).items()):
        picked.append(by_domain[domain][_take(count, sizes[domain], rng)])
        # Evenly spaced positions with a random phase: domains interleave smoothly.
        phase = float(rng.random())
        placed.append((np.arange(count) + phase) / count if count else np.zeros(0))
    at, chosen = np.concatenate(placed), np.concatenate(picked)
    order = np.argsort(at, kind="stable")
    if len(at) and bool(np.any(at[order][1:] == at[order][:-1])):  # ties: by id
        key = lambda j: (at[j], ids[int(chosen[j])])  # noqa: E731
        order = np.asarray(sorted(range(len(at)), key=key), dtype=np.int64)
    rows["B"] = chosen[order]

    rng = np.random.default_rng([seed % 2**32, 2])
    target_c = targets.get("C", max(1, math.ceil(n * stress_fraction)) if n else 0)
    # Longest first; ties by id so the choice never depends on input order.
    pool = _longest(np.asarray(lengths, dtype=np.int64), ids, min(target_c, n))
    rows["C"] = pool[_take(target_c, len(pool), rng)] if len(pool) else empty
    return rows
