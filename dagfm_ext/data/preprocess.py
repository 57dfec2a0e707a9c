"""Columnar preprocessing: raw files -> encoded int32 rows, float32 labels and the schema.

Pass 1 reads each file in chunks (``chunks.py``: pyarrow's CSV parser in worker threads, each
string column dictionary-encoded while it is parsed, each integer column parsed as int64 and
bucketed). The worker that parsed a chunk also makes its labels, its per-row dictionary indices
(column after column, uint16 when the dictionaries allow) and each field's tokens and token counts
(``_count_chunk``); the consuming thread only appends them to the spill files in file order and
adds the counts to per-field totals, so it never holds the parsing back. Once every count is known
each field's vocabulary is fixed exactly as ``FieldSpec.build_vocab`` does it (count >= min_count,
ordered by (-count, token)). The lookup then maps the chunks' token dictionaries to vocabulary ids
in groups of chunks holding at least as many tokens as the vocabularies, so each vocabulary's hash
table is built once per group rather than once per chunk (work proportional to the data, however
large the vocabularies). Pass 2 encodes the chunks on all cores (numpy's gathers and the file I/O
release the GIL), each group's chunks while the next group is looked up, grouping each chunk's
rows by split so that each split is one contiguous range of the output.

Why this shape: the parse is most of the time, and hashing the values is most of the parse, so
each value is hashed once, in the parser, and only the distinct values of a chunk ever reach
Python (integer bucketing, derived fields, counting). Integers skip the hashing: parsing int64 and
bucketing from a table costs less than hashing the same column as strings. Two passes, because an
id needs the counts of the whole file; the dictionary indices are spilled to disk in between so
memory is a few chunks, the count tables (distinct tokens) and one byte per row for the split,
not the file. Chunks of a few MiB: smaller ones parse a little faster per byte (cache) but give
more dictionary entries, so more tokens to count and look up, and more Python work per byte.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.acero  # noqa: F401  (Table.group_by's engine: imported here, not mid-run holding the GIL)
import pyarrow.compute as pc

from .cache import flushed_while_written
from .chunks import parse_workers, read_chunks
from .container import split_of_rows
from .formats import TableFormat, integer_token, locate_error
from .int_buckets import integer_tokens
from .schema import DataFormatError, FeatureSchema

__all__ = ["SPLITS", "Source", "preprocess_files"]

CHUNK_BYTES = 4 << 20
SPLITS = ("train", "val", "test")
_TOKENS = pa.schema([("v", pa.string())])
_TEMPORARY = ("codes.tmp", "labels.tmp", "tokens.tmp")


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
    tokens: pa.Array  # each field's token of each dictionary entry, one field after another
    sizes: List[int]  # each field's dictionary size
    counts: List[Optional[Tuple[pa.Array, np.ndarray]]]  # each field's (token, count) pairs, count > 0
    longest: List[int]  # each field's longest list of tokens (1 unless 'multi')


class _Malformed(Exception):
    """A malformed value in a chunk: the file is scanned row by row to name its line."""


class _Counts:
    """Running token counts of one field; merged by Arrow's hash aggregation, lazily, so the
    work stays proportional to the tokens seen."""

    def __init__(self):
        self.values, self.counts = pa.array([], pa.string()), np.zeros(0, np.int64)
        self.pending: List[Tuple[pa.Array, np.ndarray]] = []
        self.pending_rows = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        """Tokens and their counts (all > 0)."""
        self.pending.append((values, counts))
        self.pending_rows += len(counts)
        if self.pending_rows > max(len(self.values), 1 << 18):  # pending: at most the table itself, or small
            self._merge()

    def _merge(self) -> None:
        if not self.pending:
            return
        table = pa.table({"v": pa.concat_arrays([self.values] + [v for v, _ in self.pending]),
                          "c": np.concatenate([self.counts] + [c for _, c in self.pending])})
        merged = table.group_by("v").aggregate([("c", "sum")])
        self.values, self.counts = merged.column("v").combine_chunks(), merged.column("c_sum").to_numpy()
        self.pending, self.pending_rows = [], 0

    def vocabulary(self, min_count: int) -> pa.Array:
        """Tokens with count >= min_count, "" (missing) excluded, ordered by (-count, token)."""
        self._merge()
        table = pa.table({"v": self.values, "c": self.counts})
        table = table.filter(pc.and_(pc.greater_equal(table["c"], min_count), pc.not_equal(table["v"], "")))
        order = pc.sort_indices(table, sort_keys=[("c", "descending"), ("v", "ascending")])
        return table["v"].take(order).combine_chunks()


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


def _present(values: pa.Array, counts: np.ndarray) -> Tuple[pa.Array, np.ndarray]:
    keep = counts > 0
    return (values, counts) if keep.all() else (values.filter(pa.array(keep)), counts[keep])


def _multi_counts(column, dictionary: pa.Array, counts: np.ndarray):
    """(tokens, their counts, the longest list) of a 'multi' field's raw lists."""
    tokens, weights, longest = [], [], 1
    for raw, c in zip(dictionary.to_pylist(), counts.tolist()):
        if c:
            parts = raw.split(column.sep)
            longest = max(longest, len(parts))
            tokens += parts
            weights += [c] * len(parts)
    return pa.array(tokens, pa.string()), np.asarray(weights, np.int64), longest


def _count_chunk(fmt: TableFormat, memos: List[dict], counted: bool, cols: dict, rows: int) -> _CountedChunk:
    """Labels, dictionary indices, tokens and token counts of one chunk; runs in a worker."""
    labels = cols[fmt.label]
    lab_values = labels.dictionary.to_pylist()
    if any(v not in ("0", "1") for v in lab_values):
        raise _Malformed(fmt.label)
    tokens, counts, longest = [], [], []
    try:
        for i, c in enumerate(fmt.fields):
            col = cols[c.source]
            field_tokens = col.dictionary if col.bucketed else _tokens(c, col.dictionary, memos[i])
            tokens.append(field_tokens)
            if c.kind == "multi":
                values, weights, most = _multi_counts(c, field_tokens, col.counts)
                counts.append((values, weights) if counted else None)
                longest.append(most)
            else:
                counts.append(_present(field_tokens, col.counts) if counted else None)
                longest.append(1)
    except ValueError as e:
        raise _Malformed(str(e)) from None
    sources = fmt.sources[1:]
    wide = any(len(cols[s].dictionary) > 1 << 16 for s in sources)
    codes = np.empty((len(sources), rows), np.int32 if wide else np.uint16)
    for j, s in enumerate(sources):  # column after column: pass 2 gathers each contiguously
        codes[j] = cols[s].indices
    # One array, so the consumer spills a chunk's tokens in one write.
    return _CountedChunk(np.asarray([v == "1" for v in lab_values], np.float32)[labels.indices], codes,
                         pa.concat_arrays(tokens), [len(t) for t in tokens], counts, longest)


def _lookup(spec, tokens: pa.Array, vocab: pa.Array) -> np.ndarray:
    """Vocabulary ids of each dictionary entry: (n,) or, for a 'multi' field, (n, max_len)."""
    if spec.kind != "multi":
        found = pc.index_in(tokens, value_set=vocab)
        return (pc.fill_null(found, -1).to_numpy(zero_copy_only=False) + 1).astype(np.int32)
    return np.asarray([spec.encode_one(raw) for raw in tokens.to_pylist()], np.int32).reshape(-1, spec.max_len)


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
    src_names = fmt.sources
    counts = [_Counts() for _ in fmt.fields]
    memos: List[dict] = [{} for _ in fmt.fields]
    field_max = [1] * len(fmt.fields)
    chunks: List[_Chunk] = []
    file_rows: List[int] = []
    n = 0
    workers = parse_workers()
    with open(out / "codes.tmp", "wb") as codes_f, open(out / "labels.tmp", "wb") as labels_f, \
            pa.ipc.new_stream(out / "tokens.tmp", _TOKENS) as spill:
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
                    spill.write_batch(pa.record_batch([part.tokens], schema=_TOKENS))
                    for i, pairs in enumerate(part.counts):
                        if pairs is not None:
                            counts[i].add(*pairs)
                    field_max = [max(a, b) for a, b in zip(field_max, part.longest)]
                    chunks.append(_Chunk(n, rows, part.sizes, codes_f.tell(),
                                         part.codes.dtype))
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
    vocabs = list(pool.map(lambda i: counts[i].vocabulary(fmt.fields[i].min_count), range(len(fmt.fields))))
    del counts, memos
    specs = [(c.field_spec(max_len=c.max_len or field_max[i]), vocabs[i]) for i, c in enumerate(fmt.fields)]
    schema = FeatureSchema([s for s, _ in specs])
    # The Python dictionaries are the largest copy of the vocabularies: made last, except for the
    # 'multi' fields, whose lookup encodes each raw value with them.
    _python_vocabularies([(s, v) for s, v in specs if s.kind == "multi"])
    split_of, ranges = layout.result()
    sources_of = [src_names[1:].index(c.source) for c in fmt.fields]
    pa.default_memory_pool().release_unused()
    _encode(out, schema, sources_of, chunks, _chunk_lookups(out, specs, chunks, pool), split_of, ranges, pool)
    for tmp in _TEMPORARY:
        (out / tmp).unlink()
    del split_of
    _python_vocabularies([(s, v) for s, v in specs if s.kind != "multi"])
    return {"rows": n, "num_slots": schema.num_slots, "splits": ranges, "schema": schema}


def _python_vocabularies(specs) -> None:
    for spec, vocab in specs:
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


def _group_ids(spec_vocab, tokens: Sequence[pa.Array]) -> List[np.ndarray]:
    """One field's vocabulary ids of the dictionaries of a group of chunks, chunk by chunk."""
    spec, vocab = spec_vocab
    ids = _lookup(spec, pa.concat_arrays(tokens), vocab)
    return np.split(ids, np.cumsum([len(t) for t in tokens])[:-1])


def _group_entries(specs) -> int:
    """How many dictionary entries a look-up group gathers: at least as many as the vocabularies
    hold, since a group hashes each vocabulary once, and no fewer than 2**18."""
    return max(sum(len(v) for _, v in specs), 1 << 18)


def _chunk_lookups(out: Path, specs, chunks: List[_Chunk], pool: ThreadPoolExecutor) -> Iterator[np.ndarray]:
    """Each chunk's vocabulary ids of its dictionary entries, field after field (a 'multi' field:
    max_len ids per entry), chunk after chunk; made for a group of chunks at a time."""
    budget = _group_entries(specs)
    reader = pa.ipc.open_stream(out / "tokens.tmp")
    group, pending = [], 0
    for k, chunk in enumerate(chunks):
        tokens = reader.read_next_batch().column(0)
        bounds = np.cumsum([0] + chunk.sizes).tolist()
        group.append([tokens.slice(a, b - a) for a, b in zip(bounds, bounds[1:])])
        pending += sum(chunk.sizes)
        if pending < budget and k + 1 < len(chunks):
            continue
        per_field = list(pool.map(_group_ids, specs, zip(*group)))
        for j in range(len(group)):
            yield np.concatenate([field[j].ravel() for field in per_field])
        group, pending = [], 0


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
            lookups: Iterator[np.ndarray], split_of: np.ndarray, ranges, pool: ThreadPoolExecutor) -> None:
    """Pass 2: dictionary indices -> vocabulary ids (``lookups``: each chunk's, in order), rows
    grouped by split, chunks encoded in parallel while the next group's ids are looked up (both
    in ``pool``: the look-ups queue behind the chunks already submitted, so only about two groups'
    ids are held). Plain positioned reads and writes (no memory maps), so memory stays that of a
    chunk per thread."""
    ncols, slots = max(sources_of) + 1, schema.num_slots
    widths = [f.max_len for f in schema.fields]
    slot = np.cumsum([0] + widths).tolist()
    # Where each chunk's rows of each split go: after the earlier chunks' rows of that split.
    fill = np.array([ranges[s][0] for s in SPLITS], np.int64)
    dest = []
    for chunk in chunks:
        dest.append(fill.tolist())
        fill += np.bincount(split_of[chunk.start:chunk.start + chunk.rows], minlength=len(SPLITS))

    def encode(k: int, lookup: np.ndarray) -> None:
        chunk = chunks[k]
        rows = chunk.rows
        local = _pread(codes_fd, chunk.codes_dtype, ncols * rows, chunk.codes_at).reshape(ncols, rows)
        labels = _pread(labels_fd, np.float32, rows, 4 * chunk.start)
        part = split_of[chunk.start:chunk.start + rows]
        # This chunk's rows grouped by split, in file order.
        order = np.concatenate([np.flatnonzero(part == s) for s in range(len(SPLITS))])
        seg = np.cumsum([0] + [size * w for size, w in zip(chunk.sizes, widths)]).tolist()
        if slots == len(widths):  # one slot per field: contiguous gathers, a transpose, then whole rows
            encoded = np.empty((slots, rows), np.int32)
            for i, src in enumerate(sources_of):
                np.take(lookup[seg[i]:seg[i + 1]], local[src], out=encoded[i], mode="clip")
            block = np.ascontiguousarray(encoded.T)[order]
        else:
            block = np.empty((rows, slots), np.int32)
            for i, src in enumerate(sources_of):
                ids = lookup[seg[i]:seg[i + 1]].reshape(-1, widths[i])
                block[:, slot[i]:slot[i + 1]] = ids[local[src][order]]
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
            done = [pool.submit(encode, k, lookup) for k, lookup in enumerate(lookups)]
            for future in done:
                future.result()

