"""Exact and near-duplicate detection.

Exact: a 128-bit xxh3 of the conversation lowercased, whitespace removed.

Near: MinHash signatures computed in bulk by rensa (Rust) over word 3-shingles whose hashes
numpy computes for a whole chunk at once, so no Python code runs per token. Signatures are
banded for LSH (bands and rows chosen for the threshold, as datasketch does); a band match
is a candidate, confirmed when the signatures agree on at least ``threshold`` of their
positions. The first record of a cluster is kept.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import rensa
import xxhash

SHINGLE_WORDS = 3
_BASE = 0x100000001B3
_MASK = 2**64 - 1
_SPACE = 32
_MIX = np.uint64(0xFF51AFD7ED558CCD)
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)


def _powers(base: int, n: int) -> np.ndarray:
    """base**0 .. base**(n-1) mod 2**64, by doubling (log n vector multiplies)."""
    out = np.empty(max(n, 1), dtype=np.uint64)
    out[0] = 1
    k = 1
    with np.errstate(over="ignore"):
        while k < n:
            m = min(k, n - k)
            step = np.uint64(pow(base, k, 2**64))
            out[k : k + m] = out[:m] * step
            k += m
    return out


class _Powers:
    """BASE**i and BASE**-i mod 2**64 (BASE is odd, so it has an inverse), grown on demand."""

    def __init__(self) -> None:
        self.up = np.ones(1, dtype=np.uint64)
        self.down = np.ones(1, dtype=np.uint64)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            self.up = _powers(_BASE, size)
            self.down = _powers(pow(_BASE, -1, 2**64), size)
        return self.up[:n], self.down[:n]


_POWERS = _Powers()


_WHITESPACE = b" \t\n\r\x0b\x0c"


def conversation_text(messages: list[dict[str, str]]) -> bytes:
    """The conversation, lowercased, as UTF-8: what both keys are computed from."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages).lower().encode()


def exact_key(text: bytes) -> bytes:
    """128-bit key of the text with all whitespace removed (so spacing never matters)."""
    return xxhash.xxh3_128_digest(text.translate(None, _WHITESPACE))


def shingle_hashes(texts: list[bytes], words: int = SHINGLE_WORDS) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of ``words`` consecutive words of each text (one shingle for a
    shorter text), flat, with row offsets (len(texts) + 1).

    Word-sequence hashes come from a polynomial prefix hash over the bytes of the whole batch
    (hash(s, e) = (P[e] - P[s]) * BASE**-s), so no Python code runs per word.
    """
    n = len(texts)
    buf = b" ".join(texts) + b" "
    data = np.frombuffer(buf, dtype=np.uint8)
    size = len(data)
    up, down = _POWERS.get(size)
    prefix = np.zeros(size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(data * up, out=prefix[1:])
    sep = data <= _SPACE  # spaces, newlines, tabs and control bytes separate words
    before = np.ones(size, dtype=bool)
    before[1:] = sep[:-1]
    after = np.ones(size, dtype=bool)
    after[:-1] = sep[1:]
    starts = np.flatnonzero(~sep & before)
    ends = np.flatnonzero(~sep & after) + 1
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=n)
    record_starts = np.cumsum(lengths) - lengths
    record = np.searchsorted(record_starts, starts, side="right") - 1
    counts = np.bincount(record, minlength=n)
    first = np.cumsum(counts) - counts
    per_record = np.maximum(counts - words + 1, 1)
    per_record[counts == 0] = 0
    offsets = np.zeros(n + 1, dtype=np.uint64)
    offsets[1:] = np.cumsum(per_record)
    total = int(offsets[-1])
    rank = np.arange(total) - np.repeat(offsets[:-1].astype(np.int64), per_record)
    i = np.repeat(first, per_record) + rank
    j = np.minimum(i + words - 1, np.repeat(first + counts - 1, per_record))
    s, e = starts[i], ends[j]
    with np.errstate(over="ignore"):
        h = (prefix[e] - prefix[s]) * down[s]
        h ^= h >> np.uint64(33)
        h *= _MIX
        h ^= h >> np.uint64(33)
    return h, offsets


SIGNATURE_BATCH_BYTES = 1024 * 1024


def signatures(texts: list[bytes], *, num_perm: int, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint32. Texts are hashed in
    batches of about 1 MB: memory stays bounded and the arrays stay in cache."""
    out = np.zeros((len(texts), num_perm), dtype=np.uint32)
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (
            end == start or size + len(texts[end]) <= SIGNATURE_BATCH_BYTES
        ):
            size += len(texts[end])
            end += 1
        hashes, offsets = shingle_hashes(texts[start:end])
        matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            hashes, offsets, num_perm, seed
        )
        out[start:end] = np.asarray(matrix.to_rows(), dtype=np.uint32)
        start = end
    return out


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around ``threshold``."""
    xs = np.linspace(0.0, 1.0, 201)
    best = (1, num_perm)
    best_err = float("inf")
    for bands in range(1, num_perm + 1):
        rows = num_perm // bands
        if rows == 0:
            break
        p = 1.0 - (1.0 - xs**rows) ** bands
        fp = np.trapezoid(np.where(xs < threshold, p, 0.0), xs)
        fn = np.trapezoid(np.where(xs >= threshold, 1.0 - p, 0.0), xs)
        if fp + fn < best_err:
            best_err, best = float(fp + fn), (bands, rows)
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One uint64 per (record, band); equal keys = the band's rows are equal (w.h.p.)."""
    n = sigs.shape[0]
    used = sigs[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    mult = (np.arange(1, rows + 1, dtype=np.uint64) * _M1) | np.uint64(1)
    keys = (used * mult).sum(axis=2, dtype=np.uint64)
    keys ^= np.arange(bands, dtype=np.uint64) * _M2
    out: np.ndarray = keys
    return out


class NearDuplicateIndex:
    """The kept records' bands and signatures (uint16: the low bits are plenty to confirm a
    candidate); ``find`` returns the label of a kept near-duplicate."""

    def __init__(self, *, threshold: float, num_perm: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self._agree = math.ceil(threshold * num_perm - 1e-9)
        self._first: dict[int, int] = {}
        # Low 16 bits of each signature value are plenty to confirm a candidate.
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint16)
        self._labels: list[str] = []
        self.size = 0

    def keys(self, sigs: np.ndarray) -> np.ndarray:
        return band_keys(sigs, self.bands, self.rows)

    def find(self, keys: list[int], sig: np.ndarray) -> str | None:
        """The label of a kept record this one nearly duplicates, or None."""
        seen: set[int] = set()
        for key in keys:
            idx = self._first.get(key)
            if idx is None or idx in seen:
                continue
            seen.add(idx)
            if np.count_nonzero(self._sigs[idx] == sig) >= self._agree:
                return self._labels[idx]
        return None

    def add(self, keys: list[int], sig: np.ndarray, label: str) -> None:
        self.add_many(np.asarray([keys], dtype=np.uint64), sig[None, :], [label], fresh=False)

    def needs_check(self, keys: np.ndarray) -> np.ndarray:
        """Per row of a chunk's band keys: could it have a near-duplicate (a band shared with
        the index or with another row of the chunk)? Rows that cannot are added in bulk."""
        n, bands = keys.shape
        if n == 0:
            return np.zeros(0, dtype=bool)
        flat = keys.ravel()
        hits = self._first.keys() & set(flat.tolist())
        if hits:
            in_index = np.isin(flat, np.fromiter(hits, dtype=np.uint64, count=len(hits)))
        else:
            in_index = np.zeros(flat.size, dtype=bool)
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        repeated = counts[inverse] > 1
        result = np.asarray((in_index | repeated).reshape(n, bands).any(axis=1))
        return result

    def add_many(
        self, keys: np.ndarray, sigs: np.ndarray, labels: list[str], *, fresh: bool = True
    ) -> None:
        """Index rows; ``fresh`` = no key of theirs is indexed yet or repeated among them
        (what :meth:`needs_check` found), so a plain dict update is safe."""
        n = len(labels)
        start = self.size
        while start + n > len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[start : start + n] = sigs
        self._labels.extend(labels)
        self.size += n
        rows = np.repeat(np.arange(start, start + n), keys.shape[1]).tolist()
        if fresh:
            self._first.update(zip(keys.ravel().tolist(), rows, strict=True))
            return
        for key, row in zip(keys.ravel().tolist(), rows, strict=True):
            self._first.setdefault(key, row)  # the first record keeps a shared band
