"""Columnar preprocessing: raw files -> encoded int32 rows, float32 labels and the schema.

The file is read in chunks of ``CHUNK_BYTES`` by pyarrow's multi-threaded CSV parser (or by
Parquet row groups), each column dictionary-encoded while it is parsed. Pass 1 keeps, per chunk,
the per-row dictionary indices (on disk), the chunk's dictionaries turned into tokens (spilled to
an Arrow stream on disk) and adds the token counts to per-field totals. Once every count is known
each field's vocabulary is fixed exactly as ``FieldSpec.build_vocab`` does it (count >= min_count,
ordered by (-count, token)); pass 2 maps every chunk's dictionary to vocabulary ids and gathers
them into the final rows, grouped by split so that each split is one contiguous range.
Memory: one chunk, the count tables (distinct tokens) and one byte per row for the split.
Only the distinct values of a chunk ever reach Python (integer bucketing, derived fields).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .prefetch import Prefetcher
from .container import split_indices
from .formats import TableFormat, locate_error, read_header
from .schema import DataFormatError, FeatureSchema

__all__ = ["SPLITS", "Source", "preprocess_files", "read_chunks"]

CHUNK_BYTES = 32 << 20
SPLITS = ("train", "val", "test")
_TOKENS = pa.schema([("v", pa.string())])


@dataclass
class Source:
    """One input file; ``split`` is None when the rows are split at random, else the split the
    whole file is (only 'train' files count towards the vocabularies then)."""
    path: Path
    split: Optional[str] = None


def _to_strings(dictionary: pa.Array) -> pa.Array:
    """A dictionary as UTF-8 strings; invalid bytes become U+FFFD, as a text-mode read does."""
    if pa.types.is_string(dictionary.type):
        return dictionary
    try:
        return dictionary.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if b is None else b.decode("utf-8", "replace") for b in dictionary.to_pylist()],
                        pa.string())


def _dict_columns(table: pa.Table, names: Sequence[str]) -> Dict[str, Tuple[np.ndarray, pa.Array]]:
    """(row indices int32, dictionary as strings) of each column."""
    table = table.unify_dictionaries()
    out = {}
    for name in names:
        col = table.column(name)
        if not pa.types.is_dictionary(col.type):  # Parquet: encode here
            col = pc.fill_null(col.cast(pa.string()), "").dictionary_encode()
        chunks = col.chunks
        if not chunks:
            out[name] = (np.zeros(0, np.int32), pa.array([], pa.string()))
            continue
        idx = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in chunks]).astype(np.int32, copy=False)
        out[name] = (idx, _to_strings(chunks[0].dictionary))
    return out


def _csv_chunks(path: Path, fmt: TableFormat, chunk_bytes: int) -> Iterator[Tuple[pa.Table, int]]:
    names = read_header(path, fmt)
    binary_dict = pa.dictionary(pa.int32(), pa.binary())
    convert = pacsv.ConvertOptions(column_types={c: binary_dict for c in fmt.sources}, include_columns=fmt.sources,
                                   strings_can_be_null=False, quoted_strings_can_be_null=False, null_values=[])
    parse = pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char='"' if fmt.quoted else False,
                               double_quote=fmt.quoted, ignore_empty_lines=True)
    read = pacsv.ReadOptions(column_names=names, use_threads=True, block_size=min(chunk_bytes, 8 << 20))
    with open(path, "rb") as f:
        pos = len(f.readline()) if fmt.columns is None else 0  # past the header
        if pos:
            yield None, pos
        size = path.stat().st_size
        want = chunk_bytes
        while pos < size:
            f.seek(pos)
            buf = f.read(want)
            # Whole lines only: the chunk ends after its last line end (or at the end of the file);
            # the partial line is read again with the next chunk, so nothing is copied.
            cut = len(buf) if pos + len(buf) >= size else buf.rfind(b"\n") + 1
            if cut == 0:
                want *= 2  # one line longer than a chunk
                continue
            data = memoryview(buf)[:cut]
            if cut < 4096 and not bytes(data).strip(b"\r\n"):
                yield None, cut  # only line ends (an empty tail)
            else:
                try:
                    table = pacsv.read_csv(pa.py_buffer(data), read_options=read, parse_options=parse,
                                           convert_options=convert)
                except pa.ArrowInvalid as e:
                    raise locate_error(path, fmt) or DataFormatError(f"{path}: {e}") from None
                yield table, cut
            pos += cut
            want = chunk_bytes


def _parquet_chunks(path: Path, fmt: TableFormat, chunk_rows: int = 1 << 18) -> Iterator[Tuple[pa.Table, int]]:
    file = pq.ParquetFile(path)
    missing = [c for c in fmt.sources if c not in file.schema_arrow.names]
    if missing:
        raise DataFormatError(f"{path}: missing columns {missing}, got {file.schema_arrow.names}")
    rows = max(file.metadata.num_rows, 1)
    size = path.stat().st_size
    for batch in file.iter_batches(batch_size=chunk_rows, columns=fmt.sources):
        label = batch.column(fmt.label)
        if pa.types.is_floating(label.type) or pa.types.is_boolean(label.type):
            batch = batch.set_column(batch.schema.get_field_index(fmt.label), fmt.label, label.cast(pa.int64()))
        yield pa.Table.from_batches([batch]), int(size * batch.num_rows / rows)


def read_chunks(path: Path, fmt: TableFormat, chunk_bytes: int = CHUNK_BYTES) -> Iterator[Tuple[pa.Table, int]]:
    """(table of the format's source columns, or None; bytes consumed) for each chunk of a file."""
    return _parquet_chunks(path, fmt) if fmt.parquet else _csv_chunks(path, fmt, chunk_bytes)


class _Counts:
    """Running token counts of one field; merged by Arrow's hash aggregation, lazily, so the
    work stays proportional to the tokens seen."""

    def __init__(self):
        self.values, self.counts = pa.array([], pa.string()), np.zeros(0, np.int64)
        self.pending: List[Tuple[pa.Array, np.ndarray]] = []
        self.pending_rows = 0

    def add(self, values: pa.Array, counts: np.ndarray) -> None:
        keep = counts > 0
        self.pending.append((values.filter(pa.array(keep)), counts[keep]))
        self.pending_rows += int(keep.sum())
        if self.pending_rows > max(len(self.values), 1 << 20):
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
    """The token of each dictionary entry; ``derive`` runs once per distinct value."""
    if column.derive is None or column.kind == "multi":
        return dictionary
    values = dictionary.to_pylist()
    for v in values:
        if v not in memo:
            memo[v] = column.derive(v)  # ValueError: reported with the file and line
    return pa.array([memo[v] for v in values], pa.string())


def _multi_counts(column, dictionary: pa.Array, counts: np.ndarray, field_max: List[int], i: int):
    tokens, weights = [], []
    for raw, c in zip(dictionary.to_pylist(), counts.tolist()):
        if c:
            parts = raw.split(column.sep)
            field_max[i] = max(field_max[i], len(parts))
            tokens += parts
            weights += [c] * len(parts)
    return pa.array(tokens, pa.string()), np.asarray(weights, np.int64)


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
    src_names = fmt.sources
    col_of = {s: j for j, s in enumerate(src_names[1:])}
    counts = [_Counts() for _ in fmt.fields]
    memos: List[dict] = [{} for _ in fmt.fields]
    field_max = [1] * len(fmt.fields)
    chunk_rows: List[int] = []
    file_rows: List[int] = []
    with open(out / "codes.tmp", "wb") as codes_f, open(out / "labels.tmp", "wb") as labels_f, \
            pa.ipc.new_stream(out / "tokens.tmp", _TOKENS) as spill:
        for src in sources:
            counted = src.split in (None, "train")
            rows_before = sum(chunk_rows)
            # The next chunk is parsed (by Arrow's threads, without the GIL) while this one is counted.
            for table, nbytes in Prefetcher(read_chunks(src.path, fmt), depth=1):
                if table is None or table.num_rows == 0:
                    if progress:
                        progress(nbytes, 0)
                    continue
                cols = _dict_columns(table, src_names)
                lab_idx, lab_dict = cols[fmt.label]
                lab_values = lab_dict.to_pylist()
                try:
                    if any(v not in ("0", "1") for v in lab_values):
                        raise ValueError(fmt.label)
                    for i, c in enumerate(fmt.fields):
                        idx, dictionary = cols[c.source]
                        tokens = _tokens(c, dictionary, memos[i])
                        spill.write_batch(pa.record_batch([tokens], schema=_TOKENS))
                        if counted:
                            n = np.bincount(idx, minlength=len(dictionary)).astype(np.int64)
                            counts[i].add(*(_multi_counts(c, tokens, n, field_max, i) if c.kind == "multi"
                                            else (tokens, n)))
                except ValueError:
                    raise locate_error(src.path, fmt) or DataFormatError(
                        f"{src.path}: a malformed value in the chunk that ends at byte {nbytes}") from None
                labels_f.write(np.asarray([v == "1" for v in lab_values], np.float32)[lab_idx].tobytes())
                for s in src_names[1:]:  # column after column: pass 2 reads each contiguously
                    codes_f.write(cols[s][0].tobytes())
                chunk_rows.append(table.num_rows)
                if progress:
                    progress(nbytes, table.num_rows)
            file_rows.append(sum(chunk_rows) - rows_before)
            if file_rows[-1] == 0:
                raise DataFormatError(f"{src.path}: no data rows")
    specs = []
    for i, c in enumerate(fmt.fields):
        spec = c.field_spec(max_len=c.max_len or field_max[i])
        specs.append((spec, counts[i].vocabulary(c.min_count)))
        spec.vocab = {t: k + 1 for k, t in enumerate(specs[-1][1].to_pylist())}
    schema = FeatureSchema([s for s, _ in specs])
    n = sum(chunk_rows)
    split_of, ranges = _split_layout(sources, file_rows, n, seed)
    _encode(out, fmt, schema, specs, col_of, chunk_rows, split_of, ranges)
    for tmp in ("codes.tmp", "labels.tmp", "tokens.tmp"):
        (out / tmp).unlink()
    return {"rows": n, "num_slots": schema.num_slots, "splits": ranges, "schema": schema}


def _split_layout(sources: Sequence[Source], file_rows: List[int], n: int, seed: int):
    """The split of each row (file order) and each split's range in the grouped output."""
    split_of = np.empty(n, np.int8)
    if sources[0].split is None:
        for k, idx in enumerate(split_indices(n, seed).values()):
            split_of[idx] = k
    else:
        start = 0
        for src, rows in zip(sources, file_rows):
            split_of[start:start + rows] = SPLITS.index(src.split)
            start += rows
    sizes = np.bincount(split_of, minlength=3)
    bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    return split_of, {s: (bounds[k], bounds[k + 1]) for k, s in enumerate(SPLITS)}


def _encode(out: Path, fmt: TableFormat, schema: FeatureSchema, specs, col_of, chunk_rows, split_of, ranges):
    """Pass 2: dictionary indices -> vocabulary ids, rows grouped by split. Plain positioned
    reads and writes (no memory maps), so memory stays that of one chunk."""
    ncols, slots = len(col_of), schema.num_slots
    fill = [ranges[s][0] for s in SPLITS]
    slot = np.concatenate([[0], np.cumsum([f.max_len for f in schema.fields])]).tolist()
    reader = pa.ipc.open_stream(out / "tokens.tmp")
    start = 0
    with open(out / "codes.tmp", "rb") as codes_f, open(out / "labels.tmp", "rb") as labels_f, \
            open(out / "x.int32", "wb") as x_f, open(out / "y.float32", "wb") as y_f:
        x_f.truncate(4 * slots * len(split_of))
        y_f.truncate(4 * len(split_of))
        for rows in chunk_rows:
            local = np.fromfile(codes_f, np.int32, ncols * rows).reshape(ncols, rows)
            labels = np.fromfile(labels_f, np.float32, rows)
            part = split_of[start:start + rows]
            order = np.argsort(part, kind="stable")  # this chunk's rows grouped by split, in file order
            block = np.empty((rows, slots), np.int32)
            for i, (spec, vocab) in enumerate(specs):
                lut = _lookup(spec, reader.read_next_batch().column(0), vocab)
                block[:, slot[i]:slot[i + 1]] = lut[local[col_of[fmt.fields[i].source]][order]].reshape(rows, -1)
            labels = labels[order]
            counts = np.bincount(part, minlength=len(SPLITS))
            lo = 0
            for k, m in enumerate(counts.tolist()):
                if m:
                    os.pwrite(x_f.fileno(), block[lo:lo + m].tobytes(), 4 * slots * fill[k])
                    os.pwrite(y_f.fileno(), labels[lo:lo + m].tobytes(), 4 * fill[k])
                    fill[k] += m
                    lo += m
            start += rows
