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
from collections import defaultdict
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


def _take(records: list[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` records: whole shuffled passes over ``records``, then a partial one."""
    out: list[str] = []
    while len(out) < count:
        order = rng.permutation(len(records))[: count - len(out)]
        out.extend([records[i] for i in order.tolist()])
    return out


def _longest(lengths: Sequence[int], ids: Sequence[str], k: int) -> list[int]:
    """Indices of the ``k`` longest records, longest first, ties by id: what
    ``heapq.nsmallest(k, range(n), key=lambda i: (-lengths[i], ids[i]))`` gives, with the
    n-sized part done by numpy (only records as long as the k-th longest are sorted)."""
    if k <= 0:
        return []
    size = np.asarray(lengths, dtype=np.int64)
    cut = np.partition(size, len(size) - k)[len(size) - k]  # the k-th largest length
    candidates = np.flatnonzero(size >= cut).tolist()
    return heapq.nsmallest(k, candidates, key=lambda i: (-lengths[i], ids[i]))


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
    by_domain: dict[str, list[str]] = defaultdict(list)
    for record_id, domain in zip(ids, domains, strict=True):
        by_domain[domain].append(record_id)
    n = len(ids)
    sizes = {d: len(r) for d, r in by_domain.items()}
    manifests: dict[str, dict[str, Any]] = {}

    rng = np.random.default_rng([seed % 2**32, 0])
    target_a = targets.get("A", n)
    order_a: list[str] = []
    for domain, count in sorted(quotas(target_a, sizes).items()):
        order_a += _take(by_domain[domain], count, rng)
    manifests["A"] = {
        "phase": "A",
        "description": DESCRIPTIONS["A"],
        "seed": seed,
        "record_ids": order_a,
    }

    rng = np.random.default_rng([seed % 2**32, 1])
    weights = phase_b_weights(sizes, domain_weights, temperature)
    placed: list[tuple[float, str]] = []
    for domain, count in sorted(quotas(targets.get("B", n), weights).items()):
        picks = _take(by_domain[domain], count, rng)
        # Evenly spaced positions with a random phase: domains interleave smoothly.
        phase = float(rng.random())
        placed += [((k + phase) / count, rid) for k, rid in enumerate(picks)]
    placed.sort()
    manifests["B"] = {
        "phase": "B",
        "description": DESCRIPTIONS["B"],
        "seed": seed,
        "record_ids": [rid for _, rid in placed],
    }

    rng = np.random.default_rng([seed % 2**32, 2])
    target_c = targets.get("C", max(1, math.ceil(n * stress_fraction)) if n else 0)
    # Longest first; ties by id so the choice never depends on input order.
    longest = _longest(lengths, ids, min(target_c, n))
    pool = [ids[i] for i in longest]
    manifests["C"] = {
        "phase": "C",
        "description": DESCRIPTIONS["C"],
        "seed": seed,
        "record_ids": _take(pool, target_c, rng) if pool else [],
    }
    return manifests
