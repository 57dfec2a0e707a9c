"""Export for serving: the student as a torch.export program (and an AOTInductor package), loaded
in a fresh process, scoring raw rows exactly as the in-memory model does; `dagfm-ext predict`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dagfm_ext.cli import main
from dagfm_ext.data import FeatureSchema, FieldEmbedding, FieldSpec
from dagfm_ext.config import RunConfig
from dagfm_ext.distill import Pipeline
from dagfm_ext.modules import DAGFM, DAGFMPlus
from dagfm_ext.scorer import Scorer
from dagfm_ext.serving import export_student, load_student

SMALL = dict(embed_dim=4, batch_size=128, max_epochs=1, patience=1, depth=2, teacher_depth=2, seed=3,
             progress=False, device="cpu")


def python(*args, **kw):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def in_memory(p: Pipeline, x: np.ndarray) -> np.ndarray:
    scorer = Scorer(p.model.embedding, p.model.student).eval()
    with torch.no_grad():
        return scorer(torch.as_tensor(x, dtype=torch.long)).numpy()


def read_preds(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    assert lines[0] == "logit,probability"
    return np.array([float(l.split(",")[0]) for l in lines[1:]])


FRESH = """
import json, sys
import torch
from dagfm_ext.serving import load_student
module, schema, meta = load_student(sys.argv[1])
records = json.loads(open(sys.argv[2]).read())
with torch.no_grad():
    logits = module(torch.from_numpy(schema.encode(records)))
heavy = [m for m in ("dagfm_ext.modules", "dagfm_ext.distill", "dagfm_ext.teachers", "sklearn") if m in sys.modules]
print(json.dumps({"logits": logits.tolist(), "heavy": heavy, "meta": meta}))
"""


def test_exported_student_in_fresh_process_matches_in_memory(tmp_path):
    p = Pipeline(RunConfig(dataset="synthetic", synthetic_size=1500, output=str(tmp_path / "run"), **SMALL))
    p.run()
    model = tmp_path / "student.pt2"
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(model)]) == 0
    # Raw rows: known values, an unseen one (-> OOV), a missing one, and a label column to ignore.
    rng = np.random.default_rng(0)
    records = [{f"f{j}": str(rng.integers(1, 17)) for j in range(8)} for _ in range(37)]
    records[3]["f2"], records[5]["f0"] = "999", ""
    want = in_memory(p, p.data.schema.encode(records))

    (tmp_path / "rows.json").write_text(json.dumps(records))
    got = json.loads(python("-c", FRESH, str(model), str(tmp_path / "rows.json")).stdout)
    np.testing.assert_allclose(got["logits"], want, rtol=0, atol=1e-6)
    assert got["heavy"] == []  # loading needs torch and the ops, not the model code or sklearn
    assert got["meta"]["student"] == "dagfm" and got["meta"]["num_slots"] == 8

    # The same rows through `dagfm-ext predict`: a CSV whose header lists the columns in another order.
    cols = ["label"] + [f"f{j}" for j in reversed(range(8))]
    lines = [",".join(cols)] + [",".join(["1"] + [r[c] for c in cols[1:]]) for r in records]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    python("-m", "dagfm_ext", "predict", "--model", str(model), "--input", str(tmp_path / "rows.csv"),
           "--output", str(tmp_path / "preds.csv"))
    np.testing.assert_allclose(read_preds(tmp_path / "preds.csv"), want, rtol=0, atol=1e-6)


def _criteo_file(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        ints = ["" if rng.random() < 0.1 else str(int(rng.integers(-1, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 12)):08x}" for _ in range(26)]
        lines.append("\t".join([str(int(rng.random() < 0.3))] + ints + cats))
    path.write_text("\n".join(lines) + "\n")


def test_predict_criteo_file_end_to_end(tmp_path):
    data = tmp_path / "train.tsv"
    _criteo_file(data, 400)
    out = tmp_path / "run"
    p = Pipeline(RunConfig(dataset=f"criteo:{data}", min_count=3, output=str(out), **SMALL))
    p.run()
    model = tmp_path / "criteo.pt2"
    python("-m", "dagfm_ext", "export", "--checkpoint", str(out), "--output", str(model))
    # Criteo's own format (label first, no header), scored from the raw file in a fresh process:
    # the logits must be those of the rows as the training pipeline encoded them.
    python("-m", "dagfm_ext", "predict", "--model", str(model), "--input", str(data),
           "--output", str(tmp_path / "preds.csv"))
    want = in_memory(p, p.data.rows_in_source_order())  # file order; training stores rows by split
    np.testing.assert_allclose(read_preds(tmp_path / "preds.csv"), want, rtol=0, atol=1e-6)
    # Unlabelled rows (Criteo's test-file layout) to stdout.
    unlabelled = tmp_path / "test.tsv"
    unlabelled.write_text("".join(l.split("\t", 1)[1] + "\n" for l in data.read_text().splitlines()[:10]))
    stdout = python("-m", "dagfm_ext", "predict", "--model", str(model), "--input", str(unlabelled)).stdout
    got = np.array([float(l.split(",")[0]) for l in stdout.splitlines()[1:]])
    np.testing.assert_allclose(got, want[:10], rtol=0, atol=1e-6)


def _multi_schema():
    genres = {g: i + 1 for i, g in enumerate(["Action", "Comedy", "Drama", "Horror", "Sci-Fi"])}
    return FeatureSchema([FieldSpec("user", vocab={str(i): i for i in range(1, 9)}),
                          FieldSpec("genres", kind="multi", max_len=3, vocab=genres),
                          FieldSpec("age", kind="integer", vocab={"1": 1, "2": 2, "5": 3, "7": 4}),
                          FieldSpec("item", vocab={str(i): i for i in range(1, 12)})])


MULTI_ROWS = [{"user": "1", "genres": "Action Comedy", "age": "3", "item": "4"},
              {"user": "2", "genres": "", "age": "", "item": "11"},               # no genres -> one OOV id
              {"user": "9", "genres": "Drama Horror Sci-Fi Action", "age": "40", "item": "1"},  # truncated
              {"user": "3", "genres": ["Western", "Drama"], "age": "1", "item": "99"}]  # unknown genre


@pytest.mark.parametrize("student", ["dagfm-kernel", "dagfm+-outer"])
def test_multi_valued_field_padded_in_graph(tmp_path, student):
    """Genres-like fields are max_len padded slots (-1) in the graph; any batch size works."""
    torch.manual_seed(0)
    schema = _multi_schema()
    net = DAGFM(4, 4, 2, "kernel") if student == "dagfm-kernel" else DAGFMPlus(4, 4, 2, "outer", mlp=(8,))
    emb = FieldEmbedding(schema, 4)
    export_student(emb, net, schema, tmp_path / "m.pt2")
    module, loaded_schema, meta = load_student(tmp_path / "m.pt2")
    assert loaded_schema.to_dict() == schema.to_dict() and meta["slot_fields"] == [0, 1, 1, 1, 2, 3]
    x = schema.encode(MULTI_ROWS)
    assert x[1].tolist()[1:4] == [0, -1, -1] and x[2].tolist()[1:4] == [3, 4, 5]
    ref = Scorer(emb, net).eval()
    for rows in (x, x[:1], np.repeat(x, 5, axis=0)):
        t = torch.from_numpy(rows)
        with torch.no_grad():
            torch.testing.assert_close(module(t), ref(t), rtol=0, atol=1e-6)


def test_export_and_predict_errors(tmp_path, capsys):
    p = Pipeline(RunConfig(dataset="synthetic", synthetic_size=600, output=str(tmp_path / "run"),
                           stop_after="teacher", **SMALL))
    p.run()
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "m.pt2")]) == 2
    assert "has not finished (in phase 'distill'" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "m.pt2")]) == 2
    assert "checkpoint: expected a run directory" in capsys.readouterr().err
    export_student(p.model.embedding, p.model.student, p.data.schema, tmp_path / "m.pt2")
    bad = tmp_path / "bad.tsv"
    bad.write_text("\t".join(["1"] * 8) + "\n" + "\t".join(["1"] * 5) + "\n")
    assert main(["predict", "--model", str(tmp_path / "m.pt2"), "--input", str(bad)]) == 2
    assert f"{bad}:2: expected 8 columns, got 5" in capsys.readouterr().err
    assert main(["predict", "--model", str(bad), "--input", str(bad)]) == 2
    assert f"model: {bad} is not a .pt2 archive (not a zip file)" in capsys.readouterr().err


def test_aoti_package_runs_the_custom_op(tmp_path):
    """AOTInductor compiles the student; the op is called through the dispatcher (no C shim)."""
    torch.manual_seed(0)
    schema = _multi_schema()
    emb, net = FieldEmbedding(schema, 4), DAGFM(4, 4, 2, "inner")
    export_student(emb, net, schema, tmp_path / "m.pt2", aoti_output=tmp_path / "m.aoti.pt2")
    runner = torch._inductor.aoti_load_package(str(tmp_path / "m.aoti.pt2"))
    x = torch.from_numpy(schema.encode(MULTI_ROWS * 3))
    ref = Scorer(emb, net).eval()
    with torch.no_grad():
        for rows in (x, x[:1]):
            torch.testing.assert_close(runner(rows), ref(rows), rtol=0, atol=1e-6)
