"""Avazu and spec-described CSV/TSV/Parquet samples: their encodings, and a tiny run of each
through `dagfm-ext run`."""
import csv
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dagfm_ext.cli import main
from dagfm_ext.data import DataFormatError, FeatureSchema, load_dataset
from dagfm_ext.data.formats import AVAZU_COLUMNS

TINY = ["--embed-dim", "4", "--batch-size", "16", "--max-epochs", "1", "--patience", "1", "--depth", "2",
        "--teacher-depth", "2", "--quiet", "--device", "cpu", "--min-count", "1"]


def run_tiny(dataset, tmp_path, name):
    out = tmp_path / name
    assert main(["run", "--dataset", dataset, *TINY, "--cache-dir", str(tmp_path / "cache"), "--output", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def write_avazu(path, n=60, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hour = f"1410{21 + i % 3:02d}{i % 24:02d}"
        vals = {"id": str(10**18 + i), "click": str(int(rng.random() < 0.4)), "hour": hour}
        vals.update({c: f"{c}_{rng.integers(0, 4)}" for c in AVAZU_COLUMNS[3:]})
        rows.append(vals)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, AVAZU_COLUMNS, lineterminator="\r\n")
        w.writeheader()
        w.writerows(rows)
    return rows


def decoded(data):
    inv = [{v: k for k, v in f.vocab.items()} for f in data.schema.fields]
    return [[inv[j].get(v, None) for j, v in enumerate(row)] for row in data.rows_in_source_order().tolist()]


def test_avazu_sample_encodes_hour_and_runs(tmp_path):
    rows = write_avazu(tmp_path / "avazu.csv")
    data = load_dataset(f"avazu:{tmp_path / 'avazu.csv'}", min_count=1, cache_dir=tmp_path / "cache")
    assert data.schema.names == ["hour", "weekday"] + AVAZU_COLUMNS[3:]
    got = decoded(data)
    # 2014-10-21 was a Tuesday (weekday 1); the id column is not a feature
    for r, g in zip(rows, got):
        day = int(r["hour"][4:6])
        assert g[:2] == [str(int(r["hour"][6:])), str((day - 21 + 1) % 7)]
        assert g[2:] == [r[c] for c in AVAZU_COLUMNS[3:]]
    np.testing.assert_array_equal(np.sort(data.y), np.sort([float(r["click"]) for r in rows]))
    report = run_tiny(f"avazu:{tmp_path / 'avazu.csv'}", tmp_path, "avazu")
    assert report["config"]["dataset"].startswith("avazu:")


def test_predict_on_raw_avazu_rows_derives_hour_and_weekday(tmp_path, capsys):
    """Raw Avazu rows (with their header, YYMMDDHH hours) given to `dagfm-ext predict` are encoded
    as training encoded them: hour-of-day and weekday derived from ``hour``, not left out of
    vocabulary."""
    from dagfm_ext.serving import load_student, read_raw_rows
    path = tmp_path / "avazu.csv"
    write_avazu(path)
    run_tiny(f"avazu:{path}", tmp_path, "avazu")
    model = tmp_path / "avazu.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "avazu"), "--output", str(model)]) == 0
    module, schema, _ = load_student(model)
    trained = load_dataset(f"avazu:{path}", min_count=1, cache_dir=tmp_path / "cache").rows_in_source_order()
    raw = schema.encode(read_raw_rows(path, schema))
    np.testing.assert_array_equal(raw, trained)
    assert (raw[:, :2] > 0).all()  # every hour and weekday is in the vocabulary
    capsys.readouterr()
    assert main(["predict", "--model", str(model), "--input", str(path)]) == 0
    got = [float(line.split(",")[0]) for line in capsys.readouterr().out.splitlines()[1:]]
    want = module(torch.from_numpy(trained.astype(np.int64))).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_avazu_malformed_hour_names_line(tmp_path):
    write_avazu(tmp_path / "a.csv", n=5)
    text = (tmp_path / "a.csv").read_text().replace("14102103", "1410x103")
    (tmp_path / "a.csv").write_text(text)
    with pytest.raises(DataFormatError, match=r"a.csv:5: hour: expected YYMMDDHH, got '1410x103'"):
        load_dataset(f"avazu:{tmp_path / 'a.csv'}", cache_dir=tmp_path / "cache")


SPEC_FIELDS = [{"name": "user"}, {"name": "age", "kind": "integer"},
               {"name": "tags", "kind": "multi", "sep": "|", "max_len": 3},
               {"name": "city", "source": "city_name", "min_count": 2}]


def spec_records(n=60, seed=1):
    rng = np.random.default_rng(seed)
    tags = ["news", "sport", "a,b", "music", ""]
    out = []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        out.append({"clicked": str(int(rng.random() < 0.5)), "user": f"u{rng.integers(0, 4)}",
                    "age": "" if rng.random() < 0.2 else str(int(rng.integers(0, 80))),
                    "tags": "|".join(rng.choice(tags, size=k).tolist()), "city_name": f"c{rng.integers(0, 6)}"})
    return out


def oracle_schema(records):
    """Vocabularies built the documented way (FieldSpec.build_vocab over every token)."""
    schema = FeatureSchema.from_dict({"fields": [
        {"name": "user", "kind": "categorical", "min_count": 1, "max_len": 1, "vocab": {}},
        {"name": "age", "kind": "integer", "min_count": 1, "max_len": 1, "vocab": {}},
        {"name": "tags", "kind": "multi", "min_count": 1, "max_len": 3, "vocab": {}, "sep": "|"},
        {"name": "city", "kind": "categorical", "min_count": 2, "max_len": 1, "vocab": {}}]})
    for f in schema.fields:
        key = "city_name" if f.name == "city" else f.name
        counts = Counter()
        for r in records:
            counts.update(f.split(r[key]) if f.kind == "multi" else [f.token(r[key])])
        f.build_vocab(counts)
    return schema


def test_spec_csv_sample_matches_schema_encode_and_runs(tmp_path):
    records = spec_records()
    with open(tmp_path / "clicks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["clicked", "user", "age", "tags", "city_name"])
        w.writeheader()
        w.writerows(records)  # "a,b" is quoted by the writer
    (tmp_path / "spec.json").write_text(json.dumps({"format": "csv", "files": "clicks.csv", "label": "clicked",
                                                    "user_field": "user", "fields": SPEC_FIELDS}))
    data = load_dataset(f"spec:{tmp_path / 'spec.json'}", cache_dir=tmp_path / "cache")
    want = oracle_schema(records)
    assert data.schema.to_dict() == want.to_dict()
    renamed = [dict(r, city=r["city_name"]) for r in records]
    np.testing.assert_array_equal(data.rows_in_source_order(), want.encode(renamed))
    assert data.user_field == "user" and len(data.users("test")) == data.size("test")
    report = run_tiny(f"spec:{tmp_path / 'spec.json'}", tmp_path, "csv")
    assert all("test_gauc" in p for p in report["phases"])
    log = json.loads((tmp_path / "csv" / "log.json").read_text())
    assert all("val_gauc" in r for r in log)


def test_spec_parquet_with_given_split_files_runs(tmp_path):
    records = spec_records(n=90, seed=2)
    parts = {"train": records[:60], "valid": records[60:75], "test": records[75:]}
    for name, rows in parts.items():
        table = pa.table({k: [r[k] for r in rows] for k in rows[0]})
        table = table.set_column(0, "clicked", pa.array([int(r["clicked"]) for r in rows], pa.int64()))
        pq.write_table(table, tmp_path / f"{name}.parquet")
    (tmp_path / "spec.json").write_text(json.dumps({
        "format": "parquet", "label": "clicked", "fields": SPEC_FIELDS,
        "files": {k: f"{k}.parquet" for k in parts}}))
    data = load_dataset(f"spec:{tmp_path / 'spec.json'}", cache_dir=tmp_path / "cache")
    assert [data.size(s) for s in ("train", "val", "test")] == [60, 15, 15]
    want = oracle_schema(parts["train"])  # vocabularies from the training file only
    assert data.schema.to_dict() == want.to_dict()
    renamed = [dict(r, city=r["city_name"]) for r in records]
    np.testing.assert_array_equal(np.asarray(data.x), want.encode(renamed))
    np.testing.assert_array_equal(data.y, [float(r["clicked"]) for r in records])
    run_tiny(f"spec:{tmp_path / 'spec.json'}", tmp_path, "parquet")


@pytest.mark.parametrize("spec,msg", [
    ({"format": "xlsx"}, r"format: expected one of \['csv', 'parquet', 'tsv'\]"),
    ({"format": "csv", "label": "y", "fields": [{"name": "a", "kind": "float"}], "files": "x.csv"},
     "field 'a': kind: expected"),
    ({"format": "csv", "label": "y", "fields": [{"name": "a", "sep": "|"}], "files": "x.csv"},
     "field 'a': sep: expected a non-empty string on a 'multi' field"),
    ({"format": "csv", "label": "y", "fields": [{"name": "a"}], "files": {"train": "x.csv"}},
     "files: expected a file name or"),
])
def test_spec_errors_name_the_key(tmp_path, spec, msg):
    (tmp_path / "s.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=msg):
        load_dataset(f"spec:{tmp_path / 's.json'}", cache_dir=tmp_path / "cache")
