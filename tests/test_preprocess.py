"""The columnar preprocessing and its cache: encodings identical to the row-by-row reader,
malformed rows named by file and line, a cache keyed on the file and the options, and a build
killed mid-way that leaves nothing a later run would use."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from criteo_oracle import load_criteo_rows
from dagfm_ext.cli import main
from dagfm_ext.data import DataFormatError, load_criteo, load_dataset
from dagfm_ext.data import field_tables, preprocess
from dagfm_ext.data.cache import open_entry
from dagfm_ext.data.int_buckets import integer_codes
from dagfm_ext.data.schema import criteo_int_bucket

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def assert_same_encoding(fast, oracle):
    assert fast.schema.to_dict() == oracle.schema.to_dict()
    np.testing.assert_array_equal(fast.rows_in_source_order(), oracle.x)
    for s in SPLITS:
        rows = fast.splits[s]
        np.testing.assert_array_equal(fast.x[rows.start:rows.stop], oracle.x[oracle.splits[s]])
        np.testing.assert_array_equal(fast.y[rows.start:rows.stop], oracle.y[oracle.splits[s]])


# A value pool with heavy repeats (some tokens pass min_count, some stay rare), odd but legal
# integers, and missing values.
# Integers span the parser's int64 path (table, binary search, far negatives) and the values only
# Python's int reads (a sign, spaces, beyond int64).
INTS = st.sampled_from(["", "", "0", "1", "2", "3", "-1", "-7", "15", "100", "99999", "+4", " 8", "007", "-64", "-65",
                        "65535", "65536", "-1000000000000", "9223372036854775807", "9223372036854775808", "1_000"])
CATS = st.sampled_from(["", "a", "a", "b", "c", "Z", "0x1f", "é", "a b", "long-token-1", "x\"y", "68fd1e64"])


@st.composite
def criteo_files(draw):
    rows = draw(st.lists(st.tuples(st.sampled_from("01"), st.lists(INTS, min_size=13, max_size=13),
                                   st.lists(CATS, min_size=26, max_size=26)), min_size=1, max_size=40))
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join("\t".join([lab, *ints, *cats]) for lab, ints, cats in rows)
    ending = draw(st.sampled_from(["", eol, eol + eol]))  # no final line end, one, an empty last line
    return text + ending, draw(st.integers(1, 4)), draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=criteo_files())
def test_columnar_encoding_equals_row_by_row_reader(tmp_path, case):
    text, min_count, seed = case
    path = tmp_path / f"c{abs(hash(case))}.tsv"
    path.write_bytes(text.encode())
    fast = load_criteo(path, min_count=min_count, seed=seed, cache_dir=tmp_path / "cache")
    assert_same_encoding(fast, load_criteo_rows(path, min_count=min_count, seed=seed))


@pytest.mark.parametrize("merge_early", [False, True])
def test_encoding_equals_reader_across_chunks(tmp_path, monkeypatch, merge_early):
    """Many small chunks: vocabulary counts merged across chunks, dictionaries remapped per chunk
    (each field's table merged once at the end, or many times along the way, so that later merges
    must keep the field-wide ids already given out)."""
    path = tmp_path / "c.tsv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_criteo_sample.py"), "--rows", "3000",
                    "--output", str(path)], check=True, capture_output=True)
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 20_000)
    if merge_early:
        monkeypatch.setattr(field_tables, "MERGE_ENTRIES", 0)
        monkeypatch.setattr(field_tables, "MERGE_CHUNKS", 3)
    fast = load_criteo(path, min_count=3, seed=1, cache_dir=tmp_path / "cache")
    assert_same_encoding(fast, load_criteo_rows(path, min_count=3, seed=1))


def test_cache_reused_and_keyed_on_file_and_options(tmp_path, capsys):
    path = tmp_path / "c.tsv"
    row = "\t".join(["1"] + ["5"] * 13 + ["a"] * 26)
    path.write_text("\n".join([row, row.replace("1", "0", 1), row]) + "\n")
    cache = tmp_path / "cache"
    args = ["preprocess", "--dataset", f"criteo:{path}", "--cache-dir", str(cache), "--quiet", "--min-count", "1"]
    assert main(args) == 0
    assert "preprocessed 3 rows" in capsys.readouterr().out
    assert main(args) == 0
    assert "already preprocessed" in capsys.readouterr().out
    entries = lambda: sorted(p.name for p in (cache / "preprocessed").iterdir())  # noqa: E731
    assert len(entries()) == 1
    assert main([*args[:-1], "2"]) == 0  # another min_count: another entry
    assert "preprocessed 3 rows" in capsys.readouterr().out and len(entries()) == 2
    with open(path, "a") as f:  # an appended row changes size, mtime and tail
        f.write(row + "\n")
    assert main(args) == 0
    assert "preprocessed 4 rows" in capsys.readouterr().out and len(entries()) == 3
    assert load_criteo(path, min_count=1, seed=2022, cache_dir=cache).x.shape == (4, 39)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_while_preprocessing_then_rerun(tmp_path):
    path = tmp_path / "c.tsv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_criteo_sample.py"), "--rows", "150000",
                    "--output", str(path)], check=True, capture_output=True)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "dagfm_ext", "preprocess", "--dataset", f"criteo:{path}", "--cache-dir", str(cache),
           "--quiet", "--min-count", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, killed = time.time() + 120, False
    while time.time() < deadline and proc.poll() is None:
        building = list((cache / "preprocessed").glob(".building-*/codes.tmp"))
        if building and building[0].stat().st_size > 0:  # pass 1 under way
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait(timeout=30)
    assert killed and proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    left = list((cache / "preprocessed").iterdir())
    assert left and all(p.name.startswith(".building-") and open_entry(p) is None for p in left)
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "preprocessed 150,000 rows" in rerun.stdout
    assert [p.name.startswith(".building-") for p in (cache / "preprocessed").iterdir()] == [False]  # orphan gone
    fresh = load_criteo(path, min_count=2, seed=2022, cache_dir=tmp_path / "fresh")
    again = load_criteo(path, min_count=2, seed=2022, cache_dir=cache)
    assert again.schema.to_dict() == fresh.schema.to_dict()
    np.testing.assert_array_equal(again.x, fresh.x)
    np.testing.assert_array_equal(again.y, fresh.y)


def test_malformed_row_in_a_later_chunk_is_named(tmp_path, monkeypatch):
    good = "\t".join(["0"] + ["1"] * 13 + ["a"] * 26)
    path = tmp_path / "c.tsv"
    path.write_text("\n".join([good] * 500 + ["\t".join(["1"] + ["1"] * 12 + ["1.5"] + ["a"] * 26)] + [good]) + "\n")
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", 4096)
    with pytest.raises(DataFormatError, match=r"c.tsv:501: I13: expected an integer or empty, got '1.5'"):
        load_criteo(path, cache_dir=tmp_path / "cache")
    path.write_text("")
    with pytest.raises(DataFormatError, match="no data rows"):
        load_criteo(path, cache_dir=tmp_path / "cache")



@pytest.mark.parametrize("value", ["0x10", " 0X1f"])
def test_integer_that_python_rejects_is_named(tmp_path, value):
    """Arrow's integer parser reads hexadecimal; the row-by-row reader rejects it, and so must the
    fast path (and name the line)."""
    good = "\t".join(["0"] + ["1"] * 13 + ["a"] * 26)
    path = tmp_path / "c.tsv"
    path.write_text("\n".join([good, "\t".join(["1"] + ["1"] * 12 + [value] + ["a"] * 26), good]) + "\n")
    with pytest.raises(DataFormatError, match=rf"c.tsv:2: I13: expected an integer or empty, got '{value}'"):
        load_criteo(path, cache_dir=tmp_path / "cache")


def test_integer_codes_are_the_row_by_row_buckets():
    """The parsed-integer path's tokens are ``criteo_int_bucket``'s, at the table's edges, at each
    bucket's threshold and beyond int64's middle, with and without missing values."""
    table, negative = 1 << 16, 64
    near_thresholds = [int(math.exp(math.sqrt(b - 2))) + d for b in range(4, 80) for d in (-1, 0, 1)]
    values = np.array([-negative, -negative + 1, -1, 0, 1, 2, 3, table - 1, table, table + 1, 2**62, 2**63 - 1]
                      + near_thresholds, np.int64)
    for v in (values, np.append(values, [-negative - 1, -2**63])):
        for valid in (None, np.arange(len(v)) % 3 > 0):
            codes, tokens, counts = integer_codes(v, valid)
            want = [str(criteo_int_bucket(int(x))) if valid is None or ok else "" for x, ok in
                    zip(v, valid if valid is not None else [True] * len(v))]
            assert [tokens.to_pylist()[c] for c in codes] == want
            np.testing.assert_array_equal(counts, np.bincount(codes, minlength=len(tokens)))


@pytest.mark.parametrize("values", [[b"a", b"bc", b""], [b""], ["\u00e9".encode(), b"a"], [b"a", b"\xff\xfe"]])
def test_dictionary_bytes_read_as_text(values):
    """ASCII dictionaries are viewed as strings as they are; others decode as a text-mode read does."""
    import pyarrow as pa
    from dagfm_ext.data.chunks import _to_strings
    for arr in (pa.array(values, pa.binary()), pa.array(values, pa.large_binary())):
        for part in (arr, arr.slice(1)):
            assert _to_strings(part).to_pylist() == [b.decode("utf-8", "replace") for b in part.to_pylist()]


def test_rows_longer_than_a_chunk(tmp_path, monkeypatch):
    """Every row longer than a chunk: each read grows its buffer until a whole row fits, and the
    buffers are reused from chunk to chunk; the encoding is still the row-by-row one."""
    path = tmp_path / "c.tsv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_criteo_sample.py"), "--rows", "300",
                    "--output", str(path)], check=True, capture_output=True)
    shortest = min(len(line) for line in path.read_bytes().splitlines(keepends=True))
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", shortest // 3)
    fast = load_criteo(path, min_count=2, seed=3, cache_dir=tmp_path / "cache")
    assert_same_encoding(fast, load_criteo_rows(path, min_count=2, seed=3))


@pytest.mark.parametrize("past_inner_line_end", [-3, 0, 1, 4])
def test_quoted_line_end_across_a_chunk_boundary(tmp_path, monkeypatch, past_inner_line_end):
    """A quoted CSV field holding a line end, a chunk's bytes ending near it (before it: a
    control): the chunk ends at the record before, and the encoding is that of a single chunk."""
    value = 'two\nlines, ""quoted""'
    rows = [[str(i % 2), f"u{i % 3}", f'"{value}"' if i == 50 else f"c{i % 4}"] for i in range(120)]
    text = "clicked,user,city\n" + "".join(",".join(r) + "\n" for r in rows)
    (tmp_path / "clicks.csv").write_text(text)
    (tmp_path / "spec.json").write_text(json.dumps({"format": "csv", "files": "clicks.csv", "label": "clicked",
                                                    "fields": [{"name": "user"}, {"name": "city"}]}))
    whole = load_dataset(f"spec:{tmp_path / 'spec.json'}", cache_dir=tmp_path / "whole")
    inner, header = text.index("two\n") + 3, text.index("\n") + 1
    monkeypatch.setattr(preprocess, "CHUNK_BYTES", inner + 1 - header + past_inner_line_end)
    chunked = load_dataset(f"spec:{tmp_path / 'spec.json'}", cache_dir=tmp_path / "chunked")
    assert chunked.schema.to_dict() == whole.schema.to_dict()
    assert 'two\nlines, "quoted"' in chunked.schema.fields[1].vocab
    np.testing.assert_array_equal(chunked.rows_in_source_order(), whole.rows_in_source_order())
    np.testing.assert_array_equal(np.sort(chunked.y), np.sort(whole.y))


def test_preprocess_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["preprocess", "--dataset", "synthetic"])
    assert "only files are preprocessed" in capsys.readouterr().err
    assert main(["preprocess", "--dataset", f"avazu:{tmp_path / 'none.csv'}", "--cache-dir", str(tmp_path)]) == 2
    assert "avazu: no such file" in capsys.readouterr().err


def test_resume_on_preprocessed_data_replays_the_same_batches(tmp_path):
    """A run stopped after a phase and resumed from its checkpoint (memory-mapped cache reopened,
    block-shuffled batches) logs exactly what an uninterrupted run logs."""
    from dagfm_ext.distill import Pipeline, RunConfig
    path = tmp_path / "c.tsv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_criteo_sample.py"), "--rows", "1500",
                    "--output", str(path)], check=True, capture_output=True)
    base = dict(dataset=f"criteo:{path}", min_count=2, embed_dim=4, batch_size=64, max_epochs=2, patience=2,
                depth=2, teacher_depth=2, seed=3, progress=False, device="cpu", cache_dir=str(tmp_path / "cache"))
    Pipeline(RunConfig(output=str(tmp_path / "a"), stop_after="teacher", **base)).run()
    resumed = Pipeline(RunConfig(output=str(tmp_path / "a"), **base), resume=True)
    resumed.cfg.stop_after = "finetune"  # the checkpoint's config said: stop after the teacher
    resumed.run()
    whole = Pipeline(RunConfig(output=str(tmp_path / "b"), **base))
    whole.run()
    got = [(r["phase"], r["epoch"], r["train_loss"], r["val_auc"]) for r in resumed.history]
    want = [(r["phase"], r["epoch"], r["train_loss"], r["val_auc"]) for r in whole.history]
    assert [g[:2] for g in got] == [w[:2] for w in want] and len(got) == 6
    np.testing.assert_allclose([g[2:] for g in got], [w[2:] for w in want], rtol=0, atol=1e-6)
