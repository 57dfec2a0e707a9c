"""Every distinct token of one field, each with a field-wide id and its count, for the two passes.

Pass 1 adds each chunk's dictionary (its tokens, one entry per distinct raw value, and how often
each occurs). The table keeps them pending and merges them now and then with one
``dictionary_encode`` of (the table, the pending tokens): the table's own tokens come first and
are distinct, so they keep their positions, and the new ones are appended. That one hashing gives
both the counts (a ``bincount`` by id) and each pending entry's field-wide id, which is spilled
(``IdSpill``) so pass 2 needs no strings: once the counts are final, ``vocabulary`` orders the
tokens and returns the vocabulary id of every field-wide id, and a chunk's entries are mapped by a
gather. Merging only when the pending entries outnumber the table (and a floor) keeps the hashing
proportional to the entries added, and memory to the distinct tokens plus that many pending; a
cap on the pending chunks keeps a small field's many small dictionaries from piling up.
"""
from __future__ import annotations

import os
import threading
from array import array
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["FieldTable", "IdSpill", "ordered_vocabulary"]

MERGE_ENTRIES = 1 << 16  # pending entries a table holds at least before merging them
MERGE_CHUNKS = 64  # and at most this many chunks' dictionaries


class IdSpill:
    """Per (field, chunk) arrays of field-wide ids in one temporary file, each field's written in
    chunk order; writers reserve their range under a lock and write outside it, so the fields'
    tables can merge in parallel. Where each array lies: 16 bytes, not a Python object."""

    def __init__(self, path, fields: int):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._end = 0
        self._lock = threading.Lock()
        self._starts = [array("q") for _ in range(fields)]  # [field][chunk]: byte offset
        self._sizes = [array("q") for _ in range(fields)]  # [field][chunk]: ids

    def write(self, field: int, chunk: int, ids: np.ndarray) -> None:
        if chunk != len(self._starts[field]):
            raise RuntimeError(f"field {field}: ids of chunk {chunk} written out of order")
        data = memoryview(np.ascontiguousarray(ids, np.int32)).cast("B")
        with self._lock:
            offset, self._end = self._end, self._end + len(data)
        self._starts[field].append(offset)
        self._sizes[field].append(len(ids))
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written

    def read(self, field: int, chunk: int) -> np.ndarray:
        offset, count = self._starts[field][chunk], self._sizes[field][chunk]
        data = os.pread(self._fd, 4 * count, offset)
        if len(data) != 4 * count:
            raise OSError(f"short read of a temporary preprocessing file ({len(data)} of {4 * count} bytes)")
        return np.frombuffer(data, np.int32)

    def close(self) -> None:
        os.close(self._fd)


def ordered_vocabulary(tokens: pa.Array, counts: np.ndarray, min_count: int) -> Tuple[pa.Array, np.ndarray]:
    """(the tokens counted at least ``min_count`` times (and at least once), "" (missing) excluded,
    ordered by (-count, token); their positions in ``tokens``) -- ``FieldSpec.build_vocab``'s order."""
    keep = np.flatnonzero(counts >= max(min_count, 1))
    kept = tokens.take(pa.array(keep))
    present = pc.not_equal(kept, "").to_numpy(zero_copy_only=False)
    if not present.all():
        keep, kept = keep[present], kept.filter(pa.array(present))
    order = pc.sort_indices(pa.table({"c": counts[keep], "v": kept}),
                            sort_keys=[("c", "descending"), ("v", "ascending")]).to_numpy()
    return kept.take(pa.array(order)), keep[order]


def _count_by_id(tokens: List[pa.Array], weights: List[np.ndarray], known: pa.Array,
                 known_counts: np.ndarray) -> Tuple[pa.Array, np.ndarray, np.ndarray]:
    """(``known`` followed by the new distinct tokens, their counts, each added token's id)."""
    encoded = pc.dictionary_encode(pa.concat_arrays([known] + tokens))
    ids = encoded.indices.to_numpy(zero_copy_only=False)[len(known):]
    # Float64 sums of whole counts are exact far beyond any row count.
    counts = np.bincount(ids, weights=np.concatenate(weights), minlength=len(encoded.dictionary)).astype(np.int64)
    counts[:len(known)] += known_counts
    return encoded.dictionary, counts, ids


class FieldTable:
    """The distinct tokens of one field with their counts; see the module's description."""

    def __init__(self, field: int, spill: IdSpill):
        self.field, self.spill = field, spill
        self.tokens, self.counts = pa.array([], pa.string()), np.zeros(0, np.int64)
        self._pending: List[Tuple[int, pa.Array, np.ndarray]] = []  # (chunk, tokens, weights)
        self._pending_entries = 0

    def add(self, chunk: int, tokens: pa.Array, weights: np.ndarray) -> None:
        """One chunk's dictionary: its tokens and how often each counts (0: not counted)."""
        self._pending.append((chunk, tokens, weights))
        self._pending_entries += len(tokens)
        if self._pending_entries > max(len(self.tokens), MERGE_ENTRIES) or len(self._pending) >= MERGE_CHUNKS:
            self.merge()

    def merge(self) -> None:
        if not self._pending:
            return
        chunks, tokens, weights = zip(*self._pending)
        self.tokens, self.counts, ids = _count_by_id(list(tokens), list(weights), self.tokens, self.counts)
        bounds = np.cumsum([0] + [len(t) for t in tokens]).tolist()
        for k, chunk in enumerate(chunks):
            self.spill.write(self.field, chunk, ids[bounds[k]:bounds[k + 1]])
        self._pending, self._pending_entries = [], 0

    def vocabulary(self, min_count: int) -> Tuple[pa.Array, np.ndarray]:
        """(the vocabulary, in ``FieldSpec.build_vocab``'s order; the vocabulary id of each
        field-wide id, 0 out of vocabulary)."""
        self.merge()
        vocab, where = ordered_vocabulary(self.tokens, self.counts, min_count)
        ids = np.zeros(len(self.tokens), np.int32)
        ids[where] = np.arange(1, len(where) + 1, dtype=np.int32)
        return vocab, ids

    def multi_vocabulary(self, sep: str, min_count: int) -> Tuple[pa.Array, int]:
        """For a 'multi' field, whose tokens are raw lists: (the vocabulary of the list items,
        counted once per occurrence of each list; the longest list, at least 1)."""
        self.merge()
        items, weights, longest = [], [], 1
        for raw, c in zip(self.tokens.to_pylist(), self.counts.tolist()):
            parts = raw.split(sep)
            longest = max(longest, len(parts))
            items += parts
            weights += [c] * len(parts)
        item_tokens, item_counts, _ = _count_by_id([pa.array(items, pa.string())], [np.asarray(weights, np.float64)],
                                                   pa.array([], pa.string()), np.zeros(0, np.int64))
        return ordered_vocabulary(item_tokens, item_counts, min_count)[0], longest
