"""Columnar preprocessing: raw files -> encoded int32 rows, float32 labels and the schema.

Pass 1 reads each file in chunks (``chunks.py``: pyarrow's CSV parser in worker threads, each
string column dictionary-encoded while it is parsed, each integer column parsed as int64 and
bucketed). The worker that parsed a chunk also makes its labels, its per-row dictionary indices
(column after column, uint16 when the dictionaries allow) and each field's tokens and their
counts (``_count_chunk``); the consuming thread appends the first two to spill files in file order
and hands the tokens to each field's table (``field_tables.py``), which gives every token a
field-wide id and counts by id. Once every count is known each field's vocabulary is fixed exactly
as ``FieldSpec.build_vocab`` does it (count >= min_count, ordered by (-count, token)), as the
vocabulary id of each field-wide id. Pass 2 encodes the chunks on all cores (numpy's gathers and
the file I/O release the GIL): dictionary index -> field-wide id -> vocabulary id are two gathers,
with no string hashed again, and each chunk's rows are grouped by split so that each split is one
contiguous range of the output.

Why this shape: the parse is most of the time, and hashing the values is most of the parse, so
each value is hashed once, in the parser, and only the distinct values of a chunk ever reach
Python (integer bucketing, derived fields, counting). Integers skip the hashing: parsing int64 and
bucketing from a table costs less than hashing the same column as strings. Two passes, because an
id needs the counts of the whole file; the dictionary indices and field-wide ids are spilled to
disk in between so memory is a few chunks, the field tables (distinct tokens) and one byte per row
for the split, not the file. Chunks of a few MiB: smaller ones parse a little faster per byte
(cache) but give more dictionary entries, so more tokens to count, and more Python work per byte.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from .cache import flushed_while_written
from .chunks import parse_workers, read_chunks
from .container import split_of_rows
from .field_tables import FieldTable, IdSpill
from .formats import TableFormat, integer_token, locate_error
from .int_buckets import integer_tokens
from .schema import DataFormatError, FeatureSchema

__all__ = ["SPLITS", "Source", "preprocess_files"]

CHUNK_BYTES = 4 << 20
SPLITS = ("train", "val", "test")
_TEMPORARY = ("codes.tmp", "labels.tmp", "ids.tmp")


@dataclass
class Source:
    """One input file; ``split`` is None when the rows are split at random, else the split the
    whole file is (only 'train' files count towards the vocabularies then)."""
    path: Path
    split: Optional[str] = None


@dataclass
class _Chunk:
    start: int  # its first row among all the sources' rows
    rows: int
    sizes: List[int]  # each field's dictionary size
    codes_at: int  # where its dictionary indices start in codes.tmp, in bytes
    codes_dtype: np.dtype  # uint16 when every dictionary has at most 2**16 entries


@dataclass
class _CountedChunk:
    """What a worker thread makes of one parsed chunk (see ``_count_chunk``)."""
    labels: np.ndarray  # float32, one a row
    codes: np.ndarray  # (source columns, rows): each row's dictionary index in each column
    tokens: List[pa.Array]  # each field's token of each dictionary entry (a 'multi' field: the raw list)
    weights: List[np.ndarray]  # how often each entry counts towards the vocabulary (0: not counted)


class _Malformed(Exception):
    """A malformed value in a chunk: the file is scanned row by row to name its line."""


def _tokens(column, dictionary: pa.Array, memo: dict) -> pa.Array:
    """The token of each dictionary entry; ``derive`` runs once per distinct value (integers:
    on the whole dictionary at once unless some value needs Python's ``int``)."""
    if column.derive is None or column.kind == "multi":
        return dictionary
    if column.derive is integer_token:
        tokens = integer_tokens(dictionary)
        if tokens is not None:
            return tokens
    values = dictionary.to_pylist()
    for v in values:
        if v not in memo:
            memo[v] = column.derive(v)  # ValueError: reported with the file and line
    return pa.array([memo[v] for v in values], pa.string())


def _count_chunk(fmt: TableFormat, memos: List[dict], counted: bool, cols: dict, rows: int) -> _CountedChunk:
    """Labels, dictionary indices, tokens and token counts of one chunk; runs in a worker."""
    labels = cols[fmt.label]
    lab_values = labels.dictionary.to_pylist()
    if any(v not in ("0", "1") for v in lab_values):
        raise _Malformed(fmt.label)
    tokens, weights = [], []
    try:
        for i, c in enumerate(fmt.fields):
            col = cols[c.source]
            tokens.append(col.dictionary if col.bucketed else _tokens(c, col.dictionary, memos[i]))
            weights.append(col.counts if counted else np.zeros(len(col.counts), np.int64))
    except ValueError as e:
        raise _Malformed(str(e)) from None
    sources = fmt.sources[1:]
    wide = any(len(cols[s].dictionary) > 1 << 16 for s in sources)
    codes = np.empty((len(sources), rows), np.int32 if wide else np.uint16)
    for j, s in enumerate(sources):  # column after column: pass 2 gathers each contiguously
        codes[j] = cols[s].indices
    return _CountedChunk(np.asarray([v == "1" for v in lab_values], np.float32)[labels.indices], codes,
                         tokens, weights)


def preprocess_files(sources: Sequence[Source], fmt: TableFormat, out: Path, seed: int,
                     progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Encode ``sources`` into ``out`` (x.int32, y.float32); returns the metadata with the schema.
    ``progress(bytes, rows)`` is called after each chunk of pass 1."""
    # One set of threads for every phase: Arrow's kernels, numpy's gathers and the file I/O
    # release the GIL, and reused threads keep reusing their allocator arenas.
    with ThreadPoolExecutor(max_workers=parse_workers()) as pool:
        return _preprocess(sources, fmt, out, seed, progress, pool)


def _preprocess(sources: Sequence[Source], fmt: TableFormat, out: Path, seed: int,
                progress: Optional[Callable[[int, int], None]], pool: ThreadPoolExecutor) -> dict:
    spill = IdSpill(out / "ids.tmp", len(fmt.fields))
    try:
        return _two_passes(sources, fmt, out, seed, progress, pool, spill)
    finally:
        spill.close()


def _two_passes(sources: Sequence[Source], fmt: TableFormat, out: Path, seed: int,
                progress: Optional[Callable[[int, int], None]], pool: ThreadPoolExecutor, spill: IdSpill) -> dict:
    src_names = fmt.sources
    tables = [FieldTable(i, spill) for i in range(len(fmt.fields))]
    memos: List[dict] = [{} for _ in fmt.fields]
    chunks: List[_Chunk] = []
    file_rows: List[int] = []
    n = 0
    workers = parse_workers()
    with open(out / "codes.tmp", "wb") as codes_f, open(out / "labels.tmp", "wb") as labels_f:
        for src in sources:
            work = functools.partial(_count_chunk, fmt, memos, src.split in (None, "train"))
            rows_before, consumed = n, 0
            try:
                for part, rows, nbytes in read_chunks(src.path, fmt, CHUNK_BYTES, pool, 2 * workers, work):
                    consumed += nbytes
                    if progress:
                        progress(nbytes, rows)
                    if part is None:
                        continue
                    for table, tokens, weights in zip(tables, part.tokens, part.weights):
                        table.add(len(chunks), tokens, weights)
                    chunks.append(_Chunk(n, rows, [len(t) for t in part.tokens], codes_f.tell(), part.codes.dtype))
                    labels_f.write(part.labels)
                    codes_f.write(part.codes)
                    n += rows
            except _Malformed:
                raise locate_error(src.path, fmt) or DataFormatError(
                    f"{src.path}: a malformed value after byte {consumed}") from None
            file_rows.append(n - rows_before)
            if file_rows[-1] == 0:
                raise DataFormatError(f"{src.path}: no data rows")
    # Arrow's allocator keeps what the chunks used; each phase's peak is lower when it starts
    # without that.
    pa.default_memory_pool().release_unused()
    layout = pool.submit(_split_layout, sources, file_rows, n, seed)  # meanwhile: the vocabularies
    specs, vocabs, remaps = _vocabularies(fmt, tables, pool)
    del tables, memos
    schema = FeatureSchema(specs)
    split_of, ranges = layout.result()
    sources_of = [src_names[1:].index(c.source) for c in fmt.fields]
    pa.default_memory_pool().release_unused()

    def lookup(k: int) -> np.ndarray:
        """Chunk ``k``'s vocabulary ids of its dictionary entries, field after field (a 'multi'
        field: max_len ids per entry)."""
        return np.concatenate([remap[spill.read(i, k)].ravel() for i, remap in enumerate(remaps)])

    _encode(out, schema, sources_of, chunks, lookup, split_of, ranges, pool)
    for tmp in _TEMPORARY:
        (out / tmp).unlink()
    del split_of, remaps
    # The Python dictionaries are the largest copy of the vocabularies: made last.
    single = [k for k, s in enumerate(specs) if s.kind != "multi"]
    _python_vocabularies([specs[k] for k in single], [vocabs[k] for k in single])
    return {"rows": n, "num_slots": schema.num_slots, "splits": ranges, "schema": schema}


def _vocabularies(fmt: TableFormat, tables: List[FieldTable], pool: ThreadPoolExecutor):
    """(each field's spec, its vocabulary, the vocabulary id(s) of each field-wide id: (n,), or
    (n, max_len) for a 'multi' field, whose spec gets its Python dictionary here)."""
    def one(i: int):
        c = fmt.fields[i]
        if c.kind != "multi":
            vocab, ids = tables[i].vocabulary(c.min_count)
            return c.field_spec(), vocab, ids
        vocab, longest = tables[i].multi_vocabulary(c.sep, c.min_count)
        spec = c.field_spec(max_len=c.max_len or longest)
        # A raw list's ids: made once per distinct list, with the Python dictionary.
        _python_vocabularies([spec], [vocab])
        ids = np.asarray([spec.encode_one(raw) for raw in tables[i].tokens.to_pylist()], np.int32)
        return spec, vocab, ids.reshape(-1, spec.max_len)

    return tuple(map(list, zip(*pool.map(one, range(len(fmt.fields))))))


def _python_vocabularies(specs, vocabs: Sequence[pa.Array]) -> None:
    for spec, vocab in zip(specs, vocabs):
        spec.vocab = {t: k + 1 for k, t in enumerate(vocab.to_pylist())}


def _split_layout(sources: Sequence[Source], file_rows: List[int], n: int, seed: int):
    """The split of each row (file order) and each split's range in the grouped output."""
    if sources[0].split is None:
        split_of = split_of_rows(n, seed)
    else:
        split_of, start = np.empty(n, np.int8), 0
        for src, rows in zip(sources, file_rows):
            split_of[start:start + rows] = SPLITS.index(src.split)
            start += rows
    sizes = np.bincount(split_of, minlength=3)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return split_of, {s: (bounds[k], bounds[k + 1]) for k, s in enumerate(SPLITS)}


def _pread(fd: int, dtype, count: int, offset: int) -> np.ndarray:
    """``count`` items of ``dtype`` from byte ``offset``."""
    size = np.dtype(dtype).itemsize
    data = os.pread(fd, size * count, offset)
    if len(data) != size * count:
        raise OSError(f"short read of a temporary preprocessing file ({len(data)} of {size * count} bytes)")
    return np.frombuffer(data, dtype)


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    """Write ``array`` at ``offset`` (counted in its items)."""
    view, offset = memoryview(np.ascontiguousarray(array)).cast("B"), offset * array.itemsize
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _encode(out: Path, schema: FeatureSchema, sources_of: List[int], chunks: List[_Chunk],
            lookup: Callable[[int], np.ndarray], split_of: np.ndarray, ranges, pool: ThreadPoolExecutor) -> None:
    """Pass 2: dictionary indices -> vocabulary ids (``lookup(k)``: chunk k's), rows grouped by
    split, chunks encoded in parallel. Plain positioned reads and writes (no memory maps), so
    memory stays that of a chunk per thread."""
    ncols, slots = max(sources_of) + 1, schema.num_slots
    widths = [f.max_len for f in schema.fields]
    slot = np.cumsum([0] + widths).tolist()
    # Where each chunk's rows of each split go: after the earlier chunks' rows of that split.
    fill = np.array([ranges[s][0] for s in SPLITS], np.int64)
    dest = []
    for chunk in chunks:
        dest.append(fill.tolist())
        fill += np.bincount(split_of[chunk.start:chunk.start + chunk.rows], minlength=len(SPLITS))

    def encode(k: int) -> None:
        chunk, ids = chunks[k], lookup(k)
        rows = chunk.rows
        local = _pread(codes_fd, chunk.codes_dtype, ncols * rows, chunk.codes_at).reshape(ncols, rows)
        labels = _pread(labels_fd, np.float32, rows, 4 * chunk.start)
        part = split_of[chunk.start:chunk.start + rows]
        # This chunk's rows grouped by split, in file order.
        order = np.concatenate([np.flatnonzero(part == s) for s in range(len(SPLITS))])
        seg = np.cumsum([0] + [size * w for size, w in zip(chunk.sizes, widths)]).tolist()
        if slots == len(widths):  # one slot per field: contiguous gathers, then whole rows in split order
            encoded = np.empty((slots, rows), np.int32)
            for i, src in enumerate(sources_of):
                np.take(ids[seg[i]:seg[i + 1]], local[src], out=encoded[i], mode="clip")
            block = encoded.T[order]  # the transpose and the reordering in one copy
        else:
            block = np.empty((rows, slots), np.int32)
            for i, src in enumerate(sources_of):
                field_ids = ids[seg[i]:seg[i + 1]].reshape(-1, widths[i])
                block[:, slot[i]:slot[i + 1]] = field_ids[local[src][order]]
        labels = labels[order]
        lo = 0
        for s, m in enumerate(np.bincount(part, minlength=len(SPLITS)).tolist()):
            if m:
                _pwrite(x_fd, block[lo:lo + m], slots * dest[k][s])
                _pwrite(y_fd, labels[lo:lo + m], dest[k][s])
                lo += m

    with open(out / "codes.tmp", "rb") as codes_f, open(out / "labels.tmp", "rb") as labels_f, \
            open(out / "x.int32", "wb") as x_f, open(out / "y.float32", "wb") as y_f:
        codes_fd, labels_fd, x_fd, y_fd = (f.fileno() for f in (codes_f, labels_f, x_f, y_f))
        x_f.truncate(4 * slots * len(split_of))
        y_f.truncate(4 * len(split_of))
        with flushed_while_written(x_fd, y_fd):
            done = [pool.submit(encode, k) for k in range(len(chunks))]
            for future in done:
                future.result()
