"""Feature schema, field embedding, datasets (ml-100k on a fake directory, Criteo TSV, synthetic)."""
import math

import numpy as np
import pytest
import torch

from dagfm_ext import data as D
from dagfm_ext.data import movielens
from dagfm_ext.data import (DataFormatError, FeatureSchema, FieldEmbedding, FieldSpec, criteo_int_bucket,
                            load_criteo, make_synthetic, read_ml100k_dir, split_indices)
from dagfm_ext import metrics


def write_fake_ml100k(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t24\tM\twriter\t32067\n")
    (root / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n"
        "20\tGoldenEye\t1995\tAction Adventure Thriller\n"
        "30\tFour Rooms\t1994\tThriller\n")
    rows = [(1, 10, 5), (1, 20, 3), (2, 10, 4), (2, 30, 1), (3, 20, 2), (3, 30, 4), (1, 30, 2), (2, 20, 5),
            (3, 10, 3), (1, 10, 4)]
    (root / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(f"{u}\t{i}\t{r}\t88125{k}\n" for k, (u, i, r) in enumerate(rows)))
    return rows


def test_ml100k_loader_on_fake_directory(tmp_path):
    rows = write_fake_ml100k(tmp_path / "ml")
    d = read_ml100k_dir(tmp_path / "ml", seed=1)
    assert d.schema.names == ["user_id", "item_id", "age", "gender", "occupation", "release_year", "genres"]
    genres = d.schema.fields[6]
    assert genres.kind == "multi" and genres.max_len == 3
    np.testing.assert_array_equal(d.y, [1.0 if r >= 4 else 0.0 for _, _, r in rows])
    # the row of (user 2, item 30) decodes to that user's and that item's side features
    inv = [{v: k for k, v in f.vocab.items()} for f in d.schema.fields]
    x = d.x[3]
    assert [inv[k][x[k]] for k in range(6)] == ["2", "30", "53", "F", "other", "1994"]
    assert [inv[6][v] for v in x[6:] if v >= 0] == ["Thriller"]
    assert list(x[7:]) == [-1, -1]
    # the same mapping is available for raw records at inference time
    enc = d.schema.encode([{"user_id": "2", "item_id": "30", "age": "53", "gender": "F", "occupation": "other",
                            "release_year": "1994", "genres": ["Thriller"]}])
    np.testing.assert_array_equal(enc[0], x)
    # splits: 80/10/10, disjoint, seeded
    s = d.splits
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (8, 1, 1)
    assert len(set(np.concatenate(list(s.values())))) == 10
    assert all(np.array_equal(s[k], read_ml100k_dir(tmp_path / "ml", seed=1).splits[k]) for k in s)


def test_ml100k_malformed_and_missing(tmp_path):
    write_fake_ml100k(tmp_path / "ml")
    with open(tmp_path / "ml" / "ml-100k.user", "a") as f:
        f.write("4\t30\tM\n")
    with pytest.raises(DataFormatError, match=r"ml-100k.user:5: expected 5 tab-separated columns"):
        read_ml100k_dir(tmp_path / "ml")
    with pytest.raises(FileNotFoundError, match="ml-100k.inter"):
        read_ml100k_dir(tmp_path / "nowhere")


def test_ml100k_fetch_verifies_pinned_checksums(tmp_path, monkeypatch):
    # An existing, intact cache is used as is; a corrupted one is re-fetched (here: from a fake
    # wheel, whose checksum does not match the pin, so the fetch must refuse it).
    import zipfile
    write_fake_ml100k(tmp_path / "ml-100k")

    def fake_download(dest):
        wheel = dest / movielens.RECBOLE_WHEEL
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", "x")
        return wheel

    monkeypatch.setattr(movielens, "_download_wheel", fake_download)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        D.fetch_ml100k(tmp_path / "ml-100k")
    monkeypatch.setenv("DAGFM_EXT_CACHE", str(tmp_path / "c"))
    assert D.cache_dir() == tmp_path / "c"


def test_ml100k_real_download():
    """The one networked test: skipped when the wheel cannot be fetched."""
    try:
        root = D.fetch_ml100k()
    except RuntimeError as e:
        pytest.skip(f"ml-100k unavailable: {e}")
    d = read_ml100k_dir(root, seed=2022)
    assert d.x.shape == (100000, d.schema.num_slots) and d.schema.num_fields == 7
    assert 0.5 < d.y.mean() < 0.6  # 55,375 ratings >= 4
    assert [f.vocab_size for f in d.schema.fields][:2] == [944, 1683]


def _criteo_line(label="1", ints=None, cats=None):
    ints = ints if ints is not None else ["1", "", "5", "100", "0", "-1", "3", "", "2", "7", "", "1", "20"]
    cats = cats if cats is not None else [f"{k:08x}" for k in range(26)]
    return "\t".join([label] + ints + cats) + "\n"


def test_criteo_preprocessing(tmp_path):
    p = tmp_path / "train.txt"
    lines = [_criteo_line("1"), _criteo_line("0"), _criteo_line("1", cats=["rare"] + [f"{k:08x}" for k in range(1, 26)])]
    p.write_text("".join(lines))
    d = load_criteo(p, min_count=2, seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(d.x, np.memmap) and d.x.shape == (3, 39)
    # rows are stored grouped by split: train, val, test, each in file order
    source_row = np.concatenate(list(split_indices(3, 0).values()))
    np.testing.assert_array_equal(np.concatenate([d.splits[s] for s in ("train", "val", "test")]), np.arange(3))
    np.testing.assert_array_equal(d.y, np.array([1, 0, 1])[source_row])
    x = d.rows_in_source_order()
    np.testing.assert_array_equal(x[source_row], d.x)
    assert criteo_int_bucket(100) == math.ceil(math.log(100) ** 2 + 1) == 23
    assert criteo_int_bucket(2) == 2 and criteo_int_bucket(-1) == -1
    i4 = d.schema.fields[3]  # I4 = 100 -> bucket 23
    assert i4.kind == "integer" and i4.vocab == {"23": 1}
    assert x[0, 1] == 0  # I2 missing -> id 0
    c1 = d.schema.fields[13]
    assert "rare" not in c1.vocab and x[2, 13] == 0  # seen once < min_count -> OOV
    assert x[0, 13] == c1.vocab["00000000"] > 0
    # the schema maps raw values at inference exactly as the file was mapped
    raw = {f"I{k + 1}": v for k, v in enumerate(["1", "", "5", "100", "0", "-1", "3", "", "2", "7", "", "1", "20"])}
    raw.update({f"C{k + 1}": f"{k:08x}" for k in range(26)})
    np.testing.assert_array_equal(FeatureSchema.from_dict(d.schema.to_dict()).encode([raw])[0], x[0])


@pytest.mark.parametrize("line,msg", [
    (_criteo_line()[:-1] + "\textra\n", r"train.txt:2: expected 40 tab-separated columns \(label, I1-I13, C1-C26\), got 41"),
    (_criteo_line(label="yes"), r"train.txt:2: label: expected 0 or 1, got 'yes'"),
    (_criteo_line(ints=["x"] + [""] * 12), r"train.txt:2: I1: expected an integer or empty, got 'x'"),
])
def test_criteo_malformed_rows_name_file_and_line(tmp_path, line, msg):
    p = tmp_path / "train.txt"
    p.write_text(_criteo_line() + line)
    with pytest.raises(DataFormatError, match=msg):
        load_criteo(p, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "preprocessed").iterdir())  # nothing half-built is left


def test_criteo_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"criteo: no such file: .*nope.tsv"):
        load_criteo(tmp_path / "nope.tsv")
    with pytest.raises(ValueError, match="dataset: expected"):
        D.load_dataset("avazu")


def test_field_embedding_pools_multi_valued_fields():
    schema = FeatureSchema([FieldSpec("a", vocab={"x": 1, "y": 2}),
                            FieldSpec("g", kind="multi", max_len=3, vocab={"p": 1, "q": 2, "r": 3})])
    emb = FieldEmbedding(schema, 4)
    x = torch.as_tensor(schema.encode([{"a": "y", "g": "p r"}, {"a": "zz", "g": []}]))
    np.testing.assert_array_equal(x.numpy(), [[2, 1, 3, -1], [0, 0, -1, -1]])  # unknown -> 0, empty -> OOV
    out = emb(x)
    w = emb.table.weight
    assert out.shape == (2, 2, 4)
    torch.testing.assert_close(out[0, 0], w[2])
    torch.testing.assert_close(out[0, 1], (w[3 + 1] + w[3 + 3]) / 2)  # field g starts at offset 3
    torch.testing.assert_close(out[1, 1], w[3])
    with pytest.raises(ValueError, match=r"x: expected encoded rows \(B, 4\)"):
        emb(x[:, :2])
    assert set(emb.state_dict()) == {"table.weight"}


def test_schema_roundtrip_and_min_count(tmp_path):
    f = FieldSpec("c", min_count=2)
    f.build_vocab({"a": 5, "b": 1, "c": 2})
    assert f.vocab == {"a": 1, "c": 2}
    schema = FeatureSchema([f, FieldSpec("n", kind="integer", vocab={"23": 1})])
    schema.save(tmp_path / "s.json")
    again = FeatureSchema.load(tmp_path / "s.json")
    assert again.to_dict() == schema.to_dict()
    np.testing.assert_array_equal(again.encode([{"c": "b", "n": 100}]), [[0, 1]])
    with pytest.raises(ValueError, match="kind"):
        FieldSpec("z", kind="float")


def test_synthetic_and_splits():
    d = make_synthetic(n=2000, num_fields=6, vocab=5, seed=0, split_seed=3)
    assert d.x.shape == (2000, 6) and d.schema.num_fields == 6
    assert 0.2 < d.y.mean() < 0.8
    again = make_synthetic(n=2000, num_fields=6, vocab=5, seed=0, split_seed=3)
    np.testing.assert_array_equal(d.x, again.x)
    np.testing.assert_array_equal(d.y, again.y)
    s = split_indices(1000, seed=7)
    assert [len(s[k]) for k in ("train", "val", "test")] == [800, 100, 100]
    assert len(np.unique(np.concatenate(list(s.values())))) == 1000
    batches = list(d.batches("train", 512, shuffle=True, rng=np.random.default_rng(0)))
    assert sum(len(y) for _, y in batches) == 1600 and batches[0][0].dtype == torch.int64


@pytest.mark.parametrize("n, seed", [(1, 0), (10, 3), (1000, 7), (100_003, 2022)])
def test_split_is_the_seeded_permutation_cut_8_1_1(n, seed):
    """The split of each row stays what earlier caches and checkpoints were made with: the rows
    of ``Generator.permutation(n)`` cut 8:1:1."""
    perm = np.random.default_rng(seed).permutation(n)
    cut = [int(round(0.8 * n)), int(round(0.8 * n)) + int(round(0.1 * n))]
    for name, rows in zip(("train", "val", "test"), np.split(perm, cut)):
        np.testing.assert_array_equal(split_indices(n, seed)[name], np.sort(rows))


def test_metrics_use_sklearn_values():
    y = np.array([0, 1, 1, 0, 1])
    z = np.array([-1.0, 2.0, 0.5, 0.3, -0.2])
    m = metrics.evaluate_logits(y, z)
    p = 1 / (1 + np.exp(-z))
    assert m["auc"] == pytest.approx(5 / 6)
    assert m["logloss"] == pytest.approx(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert math.isnan(metrics.auc([1, 1], [0.1, 0.2]))
