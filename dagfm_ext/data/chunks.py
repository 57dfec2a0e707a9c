"""Reading a raw file as chunks of dictionary-encoded columns, parsed on all cores.

A delimited file is cut at line ends into chunks of about ``chunk_bytes``; each chunk is parsed by
pyarrow's CSV reader in a worker thread (Arrow releases the GIL), every column dictionary-encoded
while it is parsed, so several chunks are parsed at once while the consumer works on an earlier
one. A Parquet file is read by row groups and encoded the same way. The per-row dictionary
indices, the dictionary (as strings) and how often each entry occurs are all made in the workers,
and so is whatever the caller does next with a chunk (``work``): only the distinct values of a
chunk are left for Python, and the consumer's thread only keeps the results in order.

Integer columns (``TableFormat.integer_sources``) are parsed as int64 rather than hashed as
strings, and bucketed at once (``int_buckets.integer_codes``): cheaper than a dictionary, with the
same tokens. A chunk where that parse fails, or that holds a hexadecimal literal (which Arrow reads
and Python's ``int`` rejects), is parsed again with every column as strings, so its values go
through ``integer_token`` and a malformed one is reported as the row-by-row reader reports it.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .formats import TableFormat, locate_error, read_header
from .int_buckets import HEX_PREFIX, integer_codes
from .schema import DataFormatError

__all__ = ["ColumnChunk", "read_chunks", "parse_workers"]


@dataclass
class ColumnChunk:
    """One column of a chunk: each row's entry in ``dictionary`` (strings) and each entry's count.
    ``bucketed``: the dictionary holds ``integer_token``'s tokens, not raw values."""
    indices: np.ndarray
    dictionary: pa.Array
    counts: np.ndarray
    bucketed: bool = False


def parse_workers() -> int:
    """Threads that parse (and later encode) chunks: Arrow's CPU count, at most 4 (memory grows
    with the chunks in flight)."""
    return max(1, min(pa.cpu_count(), 4))


def _ascii(binary: pa.Array) -> bool:
    """Whether every byte of a binary (int32 offsets) array's values is ASCII."""
    _, offsets, data = binary.buffers()
    if data is None or len(binary) == 0:
        return True
    first, last = np.frombuffer(offsets, np.int32, len(binary) + 1, 4 * binary.offset)[[0, -1]]
    return first == last or int(np.frombuffer(data, np.uint8)[first:last].max()) < 0x80


def _to_strings(dictionary: pa.Array) -> pa.Array:
    """A dictionary as UTF-8 strings; invalid bytes become U+FFFD, as a text-mode read does."""
    if pa.types.is_string(dictionary.type):
        return dictionary
    if pa.types.is_binary(dictionary.type) and _ascii(dictionary):  # valid UTF-8 as it is: a view, no cast
        return dictionary.view(pa.string())
    try:
        return dictionary.cast(pa.string())
    except pa.ArrowInvalid:
        return pa.array([None if b is None else b.decode("utf-8", "replace") for b in dictionary.to_pylist()],
                        pa.string())


def _integer_chunk(col: pa.ChunkedArray) -> ColumnChunk:
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    values = np.frombuffer(col.buffers()[1], np.int64, len(col), 8 * col.offset)
    valid = None
    if col.null_count:
        bits = np.frombuffer(col.buffers()[0], np.uint8)
        valid = np.unpackbits(bits, count=col.offset + len(col), bitorder="little")[col.offset:].view(bool)
    return ColumnChunk(*integer_codes(values, valid), bucketed=True)


def _column_chunks(table: pa.Table, names: Sequence[str],
                   parsed_integers: Sequence[str] = ()) -> Dict[str, ColumnChunk]:
    if any(c.num_chunks > 1 for c in table.columns):  # one block per chunk: one dictionary already
        table = table.unify_dictionaries()
    out = {}
    for name in names:
        col = table.column(name)
        if name in parsed_integers:
            out[name] = _integer_chunk(col)
            continue
        if not pa.types.is_dictionary(col.type):  # Parquet: encode here
            col = pc.fill_null(col.cast(pa.string()), "").dictionary_encode()
        pieces = [c.indices.to_numpy(zero_copy_only=False) for c in col.chunks]
        if not pieces:
            out[name] = ColumnChunk(np.zeros(0, np.int32), pa.array([], pa.string()), np.zeros(0, np.int64))
            continue
        idx = (pieces[0] if len(pieces) == 1 else np.concatenate(pieces)).astype(np.int32, copy=False)
        dictionary = _to_strings(col.chunks[0].dictionary)
        out[name] = ColumnChunk(idx, dictionary, np.bincount(idx, minlength=len(dictionary)))
    return out


def _in_order(work: Callable, items: Iterable, pool: ThreadPoolExecutor, ahead: int) -> Iterator:
    """``work(item)`` of each item in ``pool``, in order, up to ``ahead`` of them submitted ahead
    of the consumer."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _records_end(buf: bytearray, end: int, quoted: bool) -> int:
    """Where the last whole record in ``buf[:end]`` ends (0: none does). In a quoted file a line
    end inside a quoted field ends no record: a line end is outside the quotes when an even number
    of quote characters precede it, since a chunk starts outside any (a quoted field's own quotes,
    doubled ones included, come in pairs)."""
    cut = buf.rfind(b"\n", 0, end) + 1
    if not quoted:
        return cut
    quotes = buf.count(b'"', 0, cut)
    while cut and quotes % 2:
        end = cut
        cut = buf.rfind(b"\n", 0, end - 1) + 1
        quotes -= buf.count(b'"', cut, end)
    return cut


class _Buffers:
    """Read buffers for the chunks: a chunk is read into one that no parse uses any more (the
    parsed columns never point into their input), so the file is read into memory that is
    already mapped instead of fresh pages, which the kernel would zero, for every chunk."""

    def __init__(self):
        self._free: List[bytearray] = []  # list.append and list.pop hold the GIL: thread-safe

    def take(self, size: int) -> bytearray:
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                return buf
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        self._free.append(buf)


def _csv_pieces(path: Path, fmt: TableFormat, chunk_bytes: int,
                buffers: _Buffers) -> Iterator[Tuple[Optional[memoryview], int]]:
    """(whole lines, or None for a header or an empty tail; bytes consumed) through the file. The
    lines are a view of a buffer taken from ``buffers``; whoever parses them gives it back."""
    with open(path, "rb") as f:
        pos = len(f.readline()) if fmt.columns is None else 0  # past the header
        if pos:
            yield None, pos
        size = path.stat().st_size
        want = chunk_bytes
        while pos < size:
            f.seek(pos)
            buf = buffers.take(want)
            got = f.readinto(memoryview(buf)[:want])
            # Whole records only: the chunk ends after its last record (or at the end of the file);
            # the partial one is read again with the next chunk, so nothing is copied.
            cut = got if pos + got >= size else _records_end(buf, got, fmt.quoted)
            if cut == 0:
                buffers.give(buf)
                want *= 2  # one record longer than a chunk
                continue
            data = memoryview(buf)[:cut]
            if cut < 4096 and not bytes(data).strip(b"\r\n"):
                buffers.give(buf)
                data = None
            yield data, cut
            pos += cut
            want = chunk_bytes


def _has_hex(data: memoryview) -> bool:
    whole = data.obj  # the buffer the piece was cut from, from its start
    # A search for one byte is a memchr; "0" alone is everywhere in hexadecimal tokens.
    return any(whole.find(p[1].encode(), 0, len(data)) >= 0 and whole.find(p.encode(), 0, len(data)) >= 0
               for p in (HEX_PREFIX.lower(), HEX_PREFIX.upper()))


def _csv_chunks(path: Path, fmt: TableFormat, chunk_bytes: int, pool: ThreadPoolExecutor, ahead: int, work):
    names = read_header(path, fmt)
    binary_dict = pa.dictionary(pa.int32(), pa.binary())
    as_strings = {c: binary_dict for c in fmt.sources}
    integers = fmt.integer_sources
    # Strings (and dictionaries of them) are never null; only an empty integer is.
    typed = pacsv.ConvertOptions(column_types={**as_strings, **{c: pa.int64() for c in integers}},
                                 include_columns=fmt.sources, strings_can_be_null=False,
                                 quoted_strings_can_be_null=False, null_values=[""])
    plain = pacsv.ConvertOptions(column_types=as_strings, include_columns=fmt.sources, strings_can_be_null=False,
                                 quoted_strings_can_be_null=False, null_values=[])
    parse = pacsv.ParseOptions(delimiter=fmt.delimiter, quote_char='"' if fmt.quoted else False,
                               double_quote=fmt.quoted, newlines_in_values=fmt.quoted, ignore_empty_lines=True)

    def read(data, convert):
        # One block per chunk: one dictionary per column; the chunks themselves run in parallel.
        options = pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(data) + 1)
        return pacsv.read_csv(pa.py_buffer(data), read_options=options, parse_options=parse, convert_options=convert)

    def parse_chunk(data):
        if integers and not _has_hex(data):
            try:
                return read(data, typed), integers
            except pa.ArrowInvalid:
                pass  # a malformed (or unusual) integer, or a malformed row: read as strings
        return read(data, plain), ()

    def encode(piece):
        data, nbytes = piece
        if data is None:
            return None, 0, nbytes
        try:
            table, parsed = parse_chunk(data)
        except pa.ArrowInvalid as e:
            return e, 0, nbytes
        finally:
            buffers.give(data.obj)
        if table.num_rows == 0:
            return None, 0, nbytes
        return work(_column_chunks(table, fmt.sources, parsed), table.num_rows), table.num_rows, nbytes

    buffers = _Buffers()
    for result, rows, nbytes in _in_order(encode, _csv_pieces(path, fmt, chunk_bytes, buffers), pool, ahead):
        if isinstance(result, pa.ArrowInvalid):
            raise locate_error(path, fmt) or DataFormatError(f"{path}: {result}") from None
        yield result, rows, nbytes


def _parquet_chunks(path: Path, fmt: TableFormat, pool: ThreadPoolExecutor, ahead: int, work,
                    chunk_rows: int = 1 << 16):
    file = pq.ParquetFile(path)
    missing = [c for c in fmt.sources if c not in file.schema_arrow.names]
    if missing:
        raise DataFormatError(f"{path}: missing columns {missing}, got {file.schema_arrow.names}")
    rows = max(file.metadata.num_rows, 1)
    size = path.stat().st_size

    def encode(batch):
        label = batch.column(fmt.label)
        if pa.types.is_floating(label.type) or pa.types.is_boolean(label.type):
            batch = batch.set_column(batch.schema.get_field_index(fmt.label), fmt.label, label.cast(pa.int64()))
        return work(_column_chunks(pa.Table.from_batches([batch]), fmt.sources), batch.num_rows), batch.num_rows, \
            int(size * batch.num_rows / rows)

    yield from _in_order(encode, file.iter_batches(batch_size=chunk_rows, columns=fmt.sources), pool, ahead)


def read_chunks(path: Path, fmt: TableFormat, chunk_bytes: int, pool: ThreadPoolExecutor, ahead: int,
                work: Callable[[Dict[str, ColumnChunk], int], Any]) -> Iterator[Tuple[Any, int, int]]:
    """(``work(the format's source columns, rows)``, or None where a piece holds no rows; rows;
    bytes consumed) for each chunk of a file, in file order; the chunks are parsed and worked on
    in ``pool``, up to ``ahead`` of them at once. An exception ``work`` raises reaches the caller."""
    if fmt.parquet:
        return _parquet_chunks(path, fmt, pool, ahead, work)
    return _csv_chunks(path, fmt, chunk_bytes, pool, ahead, work)
