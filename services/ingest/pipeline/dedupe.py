"""Exact and near-duplicate detection.

Exact: a 128-bit xxh3 of the conversation lowercased, whitespace removed.

Near: MinHash signatures over word 3-shingles, computed for a whole chunk at once with numpy
(one-permutation hashing with optimal densification), so no Python code runs per token.
Signatures are banded for LSH (bands and rows chosen for the threshold, as datasketch does);
a band match is a candidate, confirmed when the signatures agree on at least ``threshold`` of
their positions. The first record of a cluster is kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import xxhash

from services.ingest.pipeline import fastpass

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
    """BASE**i and BASE**-i mod 2**32 (BASE is odd, so it has an inverse), grown on demand.
    32 bits: half the memory traffic of the per-byte passes, and a word-hash collision
    (about one per 2**32 pairs of distinct words) moves no similarity measurably."""

    def __init__(self) -> None:
        self.up = np.ones(1, dtype=np.uint32)
        self.down = np.ones(1, dtype=np.uint32)

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.up) < n:
            size = max(n, 2 * len(self.up))
            self.up = _powers(_BASE, size).astype(np.uint32)
            self.down = _powers(pow(_BASE, -1, 2**64), size).astype(np.uint32)
        return self.up[:n], self.down[:n]


_POWERS = _Powers()


_WHITESPACE = b" \t\n\r\x0b\x0c"


def conversation_text(messages: list[dict[str, str]]) -> bytes:
    """The conversation, lowercased, as UTF-8: what both keys are computed from."""
    return "\n".join([f"{m['role']}: {m['content']}" for m in messages]).lower().encode()


def exact_key(text: bytes) -> bytes:
    """128-bit key of the text with all whitespace removed (so spacing never matters)."""
    return xxhash.xxh3_128_digest(text.translate(None, _WHITESPACE))


_C1 = np.uint64(0x9FB21C651E98DF25)
_C2 = np.uint64(0xD6E8FEB86659FD93)
_C3 = np.uint64(0xCA5A826395121157)
_EMPTY = np.uint32(0xFFFFFFFF)


def _mix(h: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (murmur3's), in place."""
    with np.errstate(over="ignore"):
        h ^= h >> np.uint64(33)
        h *= _MIX
        h ^= h >> np.uint64(33)
        h *= _M2
        h ^= h >> np.uint64(29)
    return h


def shingle_hashes(texts: list[bytes], words: int = SHINGLE_WORDS) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of ``words`` consecutive words of each text (one shingle for a
    shorter text, none for a text without words), with the text each belongs to; flat, in
    no particular order.

    A word's hash comes from a polynomial prefix hash over the bytes of the whole batch
    (hash(s, e) = (P[e] - P[s]) * BASE**-s, the same for the same word anywhere); a
    shingle's hash combines its words' hashes. No Python code runs per word.
    """
    n = len(texts)
    buf = b" ".join(texts) + b" "
    data = np.frombuffer(buf, dtype=np.uint8)
    size = len(data)
    up, down = _POWERS.get(size)
    prefix = np.zeros(size + 1, dtype=np.uint32)
    with np.errstate(over="ignore"):
        np.cumsum(data * up, out=prefix[1:])
    sep = data <= _SPACE  # spaces, newlines, tabs, control bytes
    # Words and separators alternate, so the edges alternate: start, end, start, ...
    # (nonzero of a bool array is several times faster than of an int8 diff)
    edges = np.flatnonzero(sep[1:] ^ sep[:-1]) + 1
    if not sep[0]:
        edges = np.concatenate([np.zeros(1, dtype=edges.dtype), edges])
    starts, ends = edges[0::2], edges[1::2]  # the buffer ends with a separator
    with np.errstate(over="ignore"):
        word = ((prefix[ends] - prefix[starts]) * down[starts]).astype(np.uint64)
    lengths = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=n)
    record_starts = np.cumsum(lengths) - lengths
    first = np.searchsorted(starts, record_starts)  # each text's first word
    counts = np.diff(np.append(first, len(starts)))
    record_of_word = np.repeat(np.arange(n, dtype=np.int64), counts)
    full = len(word) - words + 1
    if full > 0:
        # Shingles that start at word w: valid when its last word is of the same text.
        valid = np.flatnonzero(record_of_word[words - 1 :] == record_of_word[:full])
        # Combined over contiguous slices (all but a few are valid), then one gather.
        with np.errstate(over="ignore"):
            every = word[:full] * _C1
            if words > 1:
                every += word[1 : full + 1] * _C2
            for k in range(2, words):
                every += word[k : full + k] * _C3 ** np.uint64(k - 1)
        h = every[valid]
        owner = record_of_word[valid]
    else:
        h, owner = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    short = np.flatnonzero((counts > 0) & (counts < words))
    if len(short):  # texts with fewer words than a shingle: all their words, one shingle
        extra = np.zeros(len(short), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(words - 1):
                take = counts[short] > k
                idx = first[short[take]] + k
                extra[take] += word[idx] * (_C1 if k == 0 else _C2 * np.uint64(k))
        h = np.concatenate([h, extra])
        owner = np.concatenate([owner, short])
    return h, owner  # mixed by the caller (signatures), with its seed


SIGNATURE_BATCH_BYTES = 1024 * 1024
_PROBE_ROUNDS = 24
# Each shingle lands in two bins (each bin still keeps the minimum of the shingles it got,
# so agreement still has probability J): far fewer empty bins to densify in short texts.
_BINS_PER_SHINGLE = 2


def signatures(texts: list[bytes], *, num_perm: int, seed: int = 1) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint32, by one-permutation hashing
    with optimal densification (Shrivastava 2017): each shingle hash goes to
    ``_BINS_PER_SHINGLE`` of ``num_perm`` bins and each bin keeps its minimum; an empty bin
    borrows the value of the bin a fixed probe sequence (the same for every text) reaches
    first. Two texts agree on a bin with probability equal to their Jaccard similarity, as
    with ``num_perm`` separate permutations, at the cost of two hashes per shingle. A text
    with no words gets an all-empty signature. Texts are hashed in batches of about 1 MB
    (bounded memory, arrays in cache)."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    start = 0
    k = np.uint64(num_perm)
    salt = signature_salt(seed)
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (
            end == start or size + len(texts[end]) <= SIGNATURE_BATCH_BYTES
        ):
            size += len(texts[end])
            end += 1
        hashes, owner = shingle_hashes(texts[start:end])
        m = end - start
        flat = np.full(m * num_perm, _EMPTY, dtype=np.uint32)
        base = owner * num_perm
        salted = hashes ^ salt
        for _ in range(_BINS_PER_SHINGLE):
            salted = _mix(salted)
            bins = ((salted >> np.uint64(32)) * k) >> np.uint64(32)  # range reduction, any k
            np.minimum.at(flat, base + bins.astype(np.int64), salted.astype(np.uint32))
        sig = flat.reshape(m, num_perm)
        _densify(sig, num_perm)
        out[start:end] = sig
        start = end
    return out


def signature_salt(seed: int = 1) -> np.uint64:
    """What every shingle hash is xored with before mixing (see :func:`signatures`)."""
    salt: np.uint64 = _mix(np.asarray([seed], dtype=np.uint64))[0]
    return salt


@lru_cache(maxsize=32)
def probes(num_perm: int) -> np.ndarray:
    """Probe sequence per bin: probes(k)[t, j] = the bin an empty bin j borrows from at
    attempt t (never j itself). Fixed, so every text borrows alike."""
    j = np.arange(num_perm, dtype=np.uint64)
    rows = []
    for t in range(1, _PROBE_ROUNDS + 1):
        with np.errstate(over="ignore"):
            h = _mix(j * np.uint64(0x100000001B3) + np.uint64(t) * _M1)
        step = 1 + (h % np.uint64(max(1, num_perm - 1))).astype(np.int64)
        rows.append((np.arange(num_perm) + step) % num_perm)
    return np.stack(rows)


def _densify(sig: np.ndarray, num_perm: int) -> None:
    """Fill empty bins in place (see :func:`signatures`); a few vectorised rounds."""
    empty_r, empty_c = np.nonzero(sig == _EMPTY)
    if not len(empty_r):
        return
    source = sig.copy()  # borrow only from bins that were filled by shingles
    table = probes(num_perm)
    for t in range(_PROBE_ROUNDS):
        value = source[empty_r, table[t, empty_c]]
        got = value != _EMPTY
        sig[empty_r[got], empty_c[got]] = value[got]
        empty_r, empty_c = empty_r[~got], empty_c[~got]
        if not len(empty_r):
            return
    # Very few shingles: scan the bins in order from the empty one (rotation).
    for r, c in zip(empty_r.tolist(), empty_c.tolist(), strict=True):
        row = source[r]
        for d in range(1, num_perm):
            v = row[(c + d) % num_perm]
            if v != _EMPTY:
                sig[r, c] = v
                break


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


class KeyIndex:
    """A uint64 → int64 map as an open-addressing hash table in two numpy arrays (linear
    probing, an eighth to half full): 32-128 bytes an entry where a dict of Python ints costs
    ~150,
    with lookups and inserts done a chunk at a time, each a few vectorised probe rounds
    (sorted runs needed a binary search per run, cache miss after cache miss). A key keeps
    its first value: the caller adds only keys that :meth:`lookup` did not find, each once."""

    _FIB = np.uint64(0x9E3779B97F4A7C15)

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._alloc(max(16, 1 << (capacity - 1).bit_length()))
        self.size = 0
        # The same table, probed one key at a time in C (no numpy pass per probe round).
        self._native = fastpass.native if fastpass.wanted() else None

    def _alloc(self, slots: int) -> None:
        self._keys = np.zeros(slots, dtype=np.uint64)
        self._values = np.full(slots, -1, dtype=np.int64)  # -1 = empty slot
        self._mask = slots - 1
        self._shift = np.uint64(64 - (slots.bit_length() - 1))

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            home: np.ndarray = ((keys * self._FIB) >> self._shift).astype(np.int64)
        return home

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The value of each key, -1 where absent."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if not self.size or not len(keys):
            return out
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        if self._native is not None:
            self._native.table_lookup(keys, self._keys, self._values, int(self._shift), out)
            return out
        pending = np.arange(len(keys))
        slots = self._home(keys)
        while len(pending):
            values = self._values[slots]
            used = values >= 0
            hit = used & (self._keys[slots] == keys[pending])
            out[pending[hit]] = values[hit]
            go_on = used & ~hit
            pending, slots = pending[go_on], (slots[go_on] + 1) & self._mask
        return out

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        if not len(keys):
            return
        if 2 * (self.size + len(keys)) > len(self._keys):
            self._grow(self.size + len(keys))
        self._insert(np.asarray(keys, dtype=np.uint64), np.asarray(values, dtype=np.int64))
        self.size += len(keys)

    def _insert(self, keys: np.ndarray, values: np.ndarray) -> None:
        if self._native is not None:
            self._native.table_insert(
                np.ascontiguousarray(keys, dtype=np.uint64),
                np.ascontiguousarray(values, dtype=np.int64),
                self._keys,
                self._values,
                int(self._shift),
            )
            return
        pending = np.arange(len(keys))
        slots = self._home(keys)
        while len(pending):
            free = self._values[slots] < 0
            want, who = slots[free], pending[free]
            # Several keys may want the same free slot: one write lands (keys are distinct),
            # and the key that reads itself back took the slot.
            self._keys[want] = keys[who]
            won = self._keys[want] == keys[who]
            self._values[want[won]] = values[who[won]]
            stay = np.ones(len(pending), dtype=bool)
            stay[np.flatnonzero(free)[won]] = False
            pending, slots = pending[stay], (slots[stay] + 1) & self._mask

    def _grow(self, needed: int) -> None:
        used = self._values >= 0
        keys, values = self._keys[used], self._values[used]
        self._alloc(1 << (4 * needed - 1).bit_length())  # few rehashes
        self._insert(keys, values)


class NearDuplicateIndex:
    """Band keys and signatures of the kept records, by row (the record's ordinal).

    Signatures are stored as their low 8 bits: a chance agreement (1/256 per position)
    moves a similarity estimate by under 0.005, and it halves the memory per record."""

    def __init__(self, *, threshold: float, num_perm: int) -> None:
        self.threshold = threshold
        self.num_perm = num_perm
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self._agree = math.ceil(threshold * num_perm - 1e-9)
        self._first = KeyIndex()
        self._sigs = np.zeros((1024, num_perm), dtype=np.uint8)

    def keys(self, sigs: np.ndarray) -> np.ndarray:
        return band_keys(sigs, self.bands, self.rows)

    def check_chunk(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For a chunk's band keys (n, bands): the indexed row holding each band (-1 if
        none), and which rows need a closer look (a band shared with the index or with
        another row of the chunk). The others cannot be near-duplicates of anything."""
        n, bands = keys.shape
        flat = keys.ravel()
        found = self._first.lookup(flat).reshape(n, bands)
        if n == 0:
            return found, np.zeros(0, dtype=bool)
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        repeated = (counts[inverse] > 1).reshape(n, bands)
        return found, np.asarray((found >= 0).any(axis=1) | repeated.any(axis=1))

    def similar(self, candidates: Iterable[int], sig: np.ndarray) -> int | None:
        """The first candidate row whose signature agrees with ``sig`` enough, or None."""
        small = sig.astype(np.uint8)
        for row in sorted(candidates):
            if np.count_nonzero(self._sigs[row] == small) >= self._agree:
                return row
        return None

    def store(self, rows: np.ndarray, sigs: np.ndarray) -> None:
        if not len(rows):
            return
        while int(rows.max()) >= len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[rows] = sigs.astype(np.uint8)

    def index(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Index band keys (each absent from the index and given once) → rows."""
        self._first.add(keys, rows)
