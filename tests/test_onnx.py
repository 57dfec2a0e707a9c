"""ONNX export of the student: the graph is standard ops and checked, a process with onnxruntime and
numpy but no torch scores rows exactly as the in-memory student, the Triton repository matches the
graph, and `dagfm-ext predict` on the .onnx file agrees with the .pt2 path."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")  # the optional "onnx" extra (installed by requirements-dev.txt)
pytest.importorskip("onnxruntime")

from dagfm_ext.cli import main  # noqa: E402
from dagfm_ext.data import FeatureSchema, FieldEmbedding, cache_dir, load_criteo, read_ml100k_dir  # noqa: E402
from dagfm_ext.distill import Pipeline, RunConfig  # noqa: E402
from dagfm_ext.modules import DAGFM, DAGFMPlus  # noqa: E402
from dagfm_ext.onnx_export import build_onnx_student, export_onnx  # noqa: E402
from dagfm_ext.onnx_scorer import OnnxStudent  # noqa: E402
from dagfm_ext.serving import Scorer, read_raw_rows  # noqa: E402
from test_export import _criteo_file as write_criteo  # noqa: E402  (a Criteo-format file)

STUDENTS = [("dagfm", "inner"), ("dagfm", "outer"), ("dagfm", "kernel"),
            ("dagfm+", "inner"), ("dagfm+", "outer"), ("dagfm+", "kernel")]


def make_student(schema: FeatureSchema, student: str, interaction: str, embed_dim: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    F = schema.num_fields
    net = (DAGFM(F, embed_dim, 3, interaction) if student == "dagfm"
           else DAGFMPlus(F, embed_dim, 3, interaction, mlp=(32, 16), dropout=0.1))
    with torch.no_grad():  # a trained-looking field mixing, not the identity it starts as
        net.connect_layer.add_(0.2 * torch.randn(F, F))
    return FieldEmbedding(schema, embed_dim).eval(), net.eval()


def in_memory(embedding, net, slots: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return Scorer(embedding, net).eval()(torch.from_numpy(slots)).numpy()


def criteo_rows(tmp_path):
    """Schema from a Criteo-format file, and rows of another file with unseen and missing values."""
    write_criteo(tmp_path / "train.tsv", 300, seed=0)
    schema = load_criteo(tmp_path / "train.tsv", min_count=3).schema
    write_criteo(tmp_path / "serve.tsv", 200, seed=1)
    records = list(read_raw_rows(tmp_path / "serve.tsv", schema))
    records[0]["C1"], records[1]["I5"] = "unseen-category", "123456789"
    return schema, schema.encode(records)


def movielens_rows(tmp_path):
    """MovieLens-100K (the cached copy, else a small directory in its format): its encoded rows and
    records with unknown users, unknown genres, too many genres and none."""
    cached = cache_dir() / "ml-100k"
    if not (cached / "ml-100k.inter").exists():
        from test_data import write_fake_ml100k
        write_fake_ml100k(tmp_path / "ml")
        cached = tmp_path / "ml"
    data = read_ml100k_dir(cached)
    schema = data.schema
    genres = schema.fields[schema.names.index("genres")]
    assert genres.kind == "multi" and genres.max_len > 1
    known = sorted(genres.vocab)
    extra = [{"user_id": "no-such-user", "item_id": "1", "age": "24", "gender": "M", "occupation": "writer",
              "release_year": "1995", "genres": [known[0], "Not-A-Genre"]},
             {"user_id": "1", "item_id": "no-such-item", "age": "", "gender": "", "occupation": "",
              "release_year": "", "genres": []},
             {"user_id": "2", "item_id": "3", "age": "53", "gender": "F", "occupation": "other",
              "release_year": "1994", "genres": known * 3}]
    rows = np.concatenate([np.asarray(data.x[:300], dtype=np.int64), schema.encode(extra)])
    assert (rows == -1).any() and (rows == 0).any()  # padded multi-valued slots and OOV ids
    return schema, rows


# The child imports onnxruntime, numpy and json only: no torch, no dagfm_ext.
CHILD = """
import json, sys
import numpy as np
import onnxruntime as ort
out = []
for model, rows in json.loads(sys.argv[1]):
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    logits, probs = session.run(["logit", "probability"], {"slots": np.load(rows)})
    out.append({"logits": logits.tolist(), "probs": probs.tolist(), "schema": json.loads(props["dagfm_ext.schema"])})
assert "torch" not in sys.modules and "dagfm_ext" not in sys.modules, sorted(sys.modules)
print(json.dumps(out))
"""


@pytest.mark.parametrize("source", ["criteo", "ml-100k"])
def test_onnxruntime_without_torch_matches_student(tmp_path, source):
    schema, rows = (criteo_rows if source == "criteo" else movielens_rows)(tmp_path)
    np.save(tmp_path / "rows.npy", rows)
    jobs, want = [], []
    for k, (student, interaction) in enumerate(STUDENTS):
        embedding, net = make_student(schema, student, interaction, seed=k)
        export_onnx(embedding, net, schema, tmp_path / f"{student}-{interaction}.onnx")
        jobs.append([str(tmp_path / f"{student}-{interaction}.onnx"), str(tmp_path / "rows.npy")])
        want.append(in_memory(embedding, net, rows))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (student, interaction), got, ref in zip(STUDENTS, json.loads(proc.stdout), want):
        np.testing.assert_allclose(got["logits"], ref, rtol=0, atol=1e-5, err_msg=f"{student} {interaction}")
        np.testing.assert_allclose(got["probs"], 1 / (1 + np.exp(-ref.astype(np.float64))), rtol=0, atol=1e-6)
        assert got["schema"] == schema.to_dict()
        assert np.std(ref) > 1e-3  # the rows do not all score the same


@pytest.mark.parametrize("student,interaction", STUDENTS)
def test_graph_is_checked_standard_ops_with_dynamic_batch(tmp_path, student, interaction):
    schema, rows = criteo_rows(tmp_path)
    embedding, net = make_student(schema, student, interaction)
    model = build_onnx_student(embedding, net, schema, meta={"dataset": "test"})
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert "MatMul" in ops and not ops & {"Einsum", "Trilu", "Loop", "If"}  # mask folded, no control flow
    (slots,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in slots.type.tensor_type.shape.dim] == ["batch", schema.num_slots]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["dagfm_ext.schema"]) == schema.to_dict()
    meta = json.loads(props["dagfm_ext.meta"])
    assert (meta["student"], meta["interaction"], meta["dataset"]) == (student, interaction, "test")
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    scorer = OnnxStudent(tmp_path / "m.onnx", threads=1)
    for batch in (rows[:1], rows[:7], np.repeat(rows, 6, axis=0)):
        np.testing.assert_allclose(scorer(batch), in_memory(embedding, net, batch), rtol=0, atol=1e-5)


def parse_pbtxt(text: str):
    """A protobuf text-format message as dicts; repeated fields (``key [ ... ]`` or a key seen twice)
    become lists."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    pos = 0

    def value():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "{":
            return message("}")
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                pos += tokens[pos] == ","
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        return int(tok) if re.fullmatch(r"-?\d+", tok) else tok

    def message(end):
        nonlocal pos
        out = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            pos += tokens[pos] == ":"
            v = value()
            out[key] = out[key] + [v] if key in out and isinstance(out[key], list) else v
        pos += 1
        return out

    return message(None)


TRITON_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}


def test_triton_repository_matches_graph(tmp_path):
    schema, rows = movielens_rows(tmp_path)
    embedding, net = make_student(schema, "dagfm", "outer")
    export_onnx(embedding, net, schema, tmp_path / "ctr.onnx", triton_dir=tmp_path / "repo")
    assert (tmp_path / "repo" / "ctr" / "1" / "model.onnx").read_bytes() == (tmp_path / "ctr.onnx").read_bytes()
    config = parse_pbtxt((tmp_path / "repo" / "ctr" / "config.pbtxt").read_text())
    assert config["name"] == "ctr" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] > 0 and "max_queue_delay_microseconds" in config["dynamic_batching"]
    model = onnx.load(str(tmp_path / "ctr.onnx"))
    for declared, tensors in ((config["input"], model.graph.input), (config["output"], model.graph.output)):
        assert [t["name"] for t in declared] == [t.name for t in tensors]
        for entry, tensor in zip(declared, tensors):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.type.tensor_type.shape.dim]
            assert dims[0] == -1  # the batch axis, implicit in Triton's dims since max_batch_size > 0
            assert entry["data_type"] == TRITON_TYPES[tensor.type.tensor_type.elem_type]
            if len(dims) == 1:  # batch-only tensors: one element per row, reshaped to the model's shape
                assert entry["dims"] == [1] and entry["reshape"] == {"shape": []}
            else:
                assert entry["dims"] == dims[1:] and "reshape" not in entry
    assert [t["name"] for t in config["input"]] == ["slots"] and config["input"][0]["dims"] == [schema.num_slots]
    assert [t["name"] for t in config["output"]] == ["logit", "probability"]


SMALL = dict(embed_dim=4, batch_size=128, max_epochs=1, patience=1, depth=2, teacher_depth=2, seed=3,
             progress=False, device="cpu")


@pytest.mark.parametrize("student", ["dagfm", "dagfm+"])
def test_cli_export_and_predict_onnx_equals_pt2(tmp_path, student):
    data = tmp_path / "train.tsv"
    write_criteo(data, 400, seed=2)
    run = tmp_path / "run"
    Pipeline(RunConfig(dataset=f"criteo:{data}", min_count=3, student=student, interaction="kernel",
                       output=str(run), **SMALL)).run()
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.pt2"),
                 "--onnx", str(tmp_path / "m.onnx"), "--triton", str(tmp_path / "repo")]) == 0
    assert (tmp_path / "repo" / "m" / "config.pbtxt").is_file()
    preds = {}
    for suffix in ("pt2", "onnx"):
        out = tmp_path / f"preds-{suffix}.csv"
        assert main(["predict", "--model", str(tmp_path / f"m.{suffix}"), "--input", str(data),
                     "--output", str(out)]) == 0
        lines = out.read_text().splitlines()
        assert lines[0] == "logit,probability" and len(lines) == 401
        preds[suffix] = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    np.testing.assert_allclose(preds["onnx"], preds["pt2"], rtol=0, atol=1e-5)
    assert np.std(preds["onnx"][:, 1]) > 0
    meta = OnnxStudent(tmp_path / "m.onnx").meta
    assert (meta["student"], meta["interaction"], meta["dataset"]) == (student, "kernel", f"criteo:{data}")


def test_export_errors(tmp_path, capsys):
    schema, _ = criteo_rows(tmp_path)
    embedding = FieldEmbedding(schema, 4)
    with pytest.raises(ValueError, match="student: ONNX export supports DAGFM and DAGFMPlus"):
        build_onnx_student(embedding, torch.nn.Linear(3, 1), schema)
    with pytest.raises(ValueError, match="embedding: 39 fields of size 4 do not match"):
        build_onnx_student(embedding, DAGFM(39, 8, 2), schema)
    with pytest.raises(ValueError, match="name: expected a Triton model name"):
        export_onnx(embedding, DAGFM(39, 4, 2), schema, tmp_path / "m.onnx", tmp_path / "repo", model_name="a/b")
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(tmp_path), "--triton", str(tmp_path / "repo")])
    assert "expected --output FILE.pt2, --onnx FILE.onnx or both" in capsys.readouterr().err
    (tmp_path / "bad.onnx").write_text("not a model")
    assert main(["predict", "--model", str(tmp_path / "bad.onnx"), "--input", str(tmp_path / "bad.onnx")]) == 2
    assert "is not an ONNX model onnxruntime can load" in capsys.readouterr().err
