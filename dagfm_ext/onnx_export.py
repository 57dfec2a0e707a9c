"""The student as a standard-op ONNX graph, built node by node with ``onnx.helper``.

Input ``slots`` (batch, num_slots) int64, the encoded rows of ``FeatureSchema.encode`` (multi-valued
fields padded with -1); outputs ``logit`` and ``probability`` (batch,) float32. The batch axis is
dynamic; the feature schema and the run's metadata are in the model's ``metadata_props``.

Why a hand-built graph rather than ``torch.onnx.export`` of the eager student: the exporter turns
each masked einsum into an ONNX ``Einsum``, which onnxruntime evaluates with its generic einsum
kernel (transposes and small products around every call), and keeps the mask multiply in the graph.
Here every layer is one or two ``MatMul`` nodes in a layout where onnxruntime's GEMM sees large,
contiguous operands, and the upper-triangle mask is applied to the weights once, at export time.
All activations keep the batch as the last axis, so that per-field slices and concatenations move
whole contiguous rows:

* embedding: ``Gather`` of the transposed ids gives (S, B, D); the mean pooling of multi-valued
  fields is a per-slot weight (1 / valid slots of its field, 0 for padding), and pooling and field
  mixing together are one (F, S) matrix ``connect_layer @ slot_to_field``, one GEMM.
* ``inner``, layout (D, F, B): a layer is one batched ``MatMul`` (D, F, F) @ (D, F, B).
* ``outer``, layout (F, D, B): ``c = P @ h`` batched over the source field (F, F, D) @ (F, D, B),
  a transpose of c's first two axes, and ``a = Q @ c`` batched over the target field. Treating
  outer as kernel with the rank-one blocks ``p_ij q_ij^T`` (one dense GEMM per layer, D/2 times the
  work) was 1.6-3x slower (1 thread, CPU time: 0.21 / 1.1 / 17.6 ms against 0.13 / 0.50 / 7.7 ms at
  B = 1 / 64 / 1024, in 3 bands).
* ``kernel``, layout (F*D, B): a layer is ``K @ h`` with K's (j, i) block the edge map p_ij, zero
  for i > j; the product is cut into ``KERNEL_BANDS`` row bands that each read only the source
  fields they can reach, skipping most of the zero upper part of K.
* readout: DAGFM's linear layer over the t-major states (the sum over d folded into its weight),
  or DAGFM+'s MLP (``Gemm``/``Relu``, the first one reading the states transposed) over
  h0 + sum_t h^t.

Measured (onnxruntime 1.32, 1 thread, CPU time, F=39, D=16, L=3, B = 1 / 64 / 1024, ms): inner
0.07 / 0.31 / 5.8 against 0.31 / 1.0 / 11.1 for the exported eager student, outer 0.09 / 0.50 /
10.6 against 0.27 / 2.0 / 44, kernel 0.21 / 1.6 / 24 against 2.9 / 5.9 / 37 (the serving table in
benchmarks/RESULTS.md has the 2-thread wall-clock numbers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np

from .data import FeatureSchema
from .onnx_scorer import INPUT_NAME, META_KEY, OUTPUT_NAMES, SCHEMA_KEY, require

__all__ = ["build_onnx_student", "export_onnx", "OPSET"]

OPSET = 17
# Bands of kernel's block-triangular product: n bands do (n + 1) / 2n of the dense work for n + 1
# extra nodes; 3 was fastest at B = 1..1024 (F=39, D=16). inner's per-d products are too small to gain.
KERNEL_BANDS = 3


def _f32(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


class _Graph:
    """Nodes and constant initializers, every name unique."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def _name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, value) -> str:
        name = self._name(stem)
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def ints(self, stem: str, values) -> str:
        return self.const(stem, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: List[str], stem: str, **attrs) -> str:
        out = self._name(stem)
        self.nodes.append(self._helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _upper_mask(F: int) -> np.ndarray:
    # Edge i -> j exists for i <= j (self-loops included).
    return np.triu(np.ones((F, F), dtype=np.float32))


def _pooled_embeddings(g: _Graph, embedding, num_slots: int) -> str:
    """(S, B, D) slot embeddings, each weighted by 1 / (valid slots of its field), 0 for padding."""
    table = _f32(embedding.table.weight)
    offsets = embedding.offsets.to("cpu").numpy().astype(np.int64)
    if offsets.shape != (num_slots,):
        raise ValueError(f"embedding: expected {num_slots} slots, has {offsets.shape[0]}")
    ids = g.op("Transpose", [INPUT_NAME], "ids_t", perm=[1, 0])  # (S, B): the batch goes last
    if not embedding.pooled:
        return g.op("Gather", [g.const("table", table), g.op("Add", [ids, g.const("offsets", offsets[:, None])],
                                                              "rows")], "emb", axis=0)
    slot_field = embedding.slot_field.to("cpu").numpy()
    same_field = (slot_field[:, None] == slot_field[None, :]).astype(np.float32)  # (S, S)
    valid = g.op("Cast", [g.op("GreaterOrEqual", [ids, g.ints("zero", 0)], "valid")], "valid_f", to=1)
    count = g.op("Max", [g.op("MatMul", [g.const("same_field", same_field), valid], "count"),
                         g.const("one", np.array(1, np.float32))], "count1")
    weight = g.op("Unsqueeze", [g.op("Div", [valid, count], "pool_weight"), g.ints("axis", [2])], "pool_weight3")
    rows = g.op("Add", [g.op("Max", [ids, g.ints("zero", 0)], "ids_clamped"), g.const("offsets", offsets[:, None])],
                "rows")
    return g.op("Mul", [g.op("Gather", [g.const("table", table), rows], "emb", axis=0), weight], "emb_pooled")


def _mixing(embedding, connect_layer: np.ndarray) -> np.ndarray:
    """(F, S): mean pooling over a field's slots (the weights above) then connect_layer, one matrix."""
    F = connect_layer.shape[0]
    slot_field = embedding.slot_field.to("cpu").numpy()
    return connect_layer @ (slot_field[None, :] == np.arange(F)[:, None]).astype(np.float32)


def _triangular_matmul(g: _Graph, weight: np.ndarray, h: str, unit: int, bands: int, stem: str) -> str:
    """``weight @ h`` for a block lower-triangular ``weight`` (..., F*unit, F*unit) (output field j
    reads input fields i <= j) and ``h`` (..., F*unit, B): the output rows are cut into
    ``bands`` bands, each multiplying only the input rows it can read."""
    n = weight.shape[-1] // unit
    bounds = [round(n * k / bands) * unit for k in range(bands + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if lo == hi:
            continue
        rows = h if hi == bounds[-1] else g.op("Slice", [h, g.ints("start", [0]), g.ints("end", [hi]),
                                                          g.ints("axis", [-2])], f"{stem}_in")
        parts.append(g.op("MatMul", [g.const(f"{stem}_w", weight[..., lo:hi, :hi]), rows], stem))
    return parts[0] if len(parts) == 1 else g.op("Concat", parts, f"{stem}_cat", axis=-2)


def _kernel_maps(student) -> np.ndarray:
    """(L, F*D, F*D): row block j, column block i holds the transposed (D, D) edge map p_ij, 0 for i > j."""
    p = _f32(student.p) * _upper_mask(student.num_fields)[None, :, :, None, None]  # (L, i, j, d, e)
    n = student.num_fields * student.embed_dim
    return p.transpose(0, 2, 4, 1, 3).reshape(student.depth, n, n)


def _propagate(g: _Graph, student, emb: str, mix: np.ndarray) -> List[str]:
    """The states h^0..h^L, each (F*D, B) in the order ``_feature_order`` gives (batch last)."""
    F, D = student.num_fields, student.embed_dim
    if student.interaction == "inner":  # (D, F, B): per d, a_d = W_d @ h_d with W_d (F_j, F_i)
        h0 = g.op("MatMul", [g.const("mix", mix), g.op("Transpose", [emb], "emb_dsb", perm=[2, 0, 1])], "h0")
        weights = (_f32(student.p) * _upper_mask(F)[None, :, :, None]).transpose(0, 3, 2, 1)  # (L, D, F_j, F_i)
        layer = lambda t, h: g.op("MatMul", [g.const(f"w{t + 1}", weights[t]), h], f"a{t + 1}")  # noqa: E731
    else:
        emb_flat = g.op("Reshape", [g.op("Transpose", [emb], "emb_sdb", perm=[0, 2, 1]), g.ints("shape", [0, -1])],
                        "emb_flat")  # (S, D*B)
        h0 = g.op("MatMul", [g.const("mix", mix), emb_flat], "h0_flat")  # (F, D*B)
    if student.interaction == "kernel":  # (F*D, B): a = K @ h, K block lower-triangular
        h0 = g.op("Reshape", [h0, g.ints("shape", [F * D, -1])], "h0")
        maps = _kernel_maps(student)
        layer = lambda t, h: _triangular_matmul(g, maps[t], h, D, KERNEL_BANDS, f"a{t + 1}")  # noqa: E731
    elif student.interaction == "outer":  # (F, D, B): c_i = P_i @ h_i, then a_j = Q_j @ c_:j
        h0 = g.op("Reshape", [h0, g.ints("shape", [F, D, -1])], "h0")
        p = _f32(student.p) * _upper_mask(F)[None, :, :, None]  # (L, F_i, F_j, D)
        q = _f32(student.q).transpose(0, 2, 3, 1)  # (L, F_j, D, F_i)

        def layer(t, h):
            c = g.op("MatMul", [g.const(f"p{t + 1}", p[t]), h], f"c{t + 1}")  # (F_i, F_j, B)
            c = g.op("Transpose", [c], f"c{t + 1}_ji", perm=[1, 0, 2])  # moves whole batch rows
            return g.op("MatMul", [g.const(f"q{t + 1}", q[t]), c], f"a{t + 1}")  # (F_j, D, B)
    hs = [h0]
    for t in range(student.depth):
        hs.append(g.op("Mul", [h0, layer(t, hs[-1])], f"h{t + 1}"))
    if student.interaction != "kernel":
        hs = [g.op("Reshape", [h, g.ints("shape", [F * D, -1])], f"h{t}_flat") for t, h in enumerate(hs)]
    return hs


def _feature_order(student) -> np.ndarray:
    """Index into the (F*D) f-major features of each row of the graph's (F*D, B) states."""
    F, D = student.num_fields, student.embed_dim
    grid = np.arange(F * D).reshape(F, D)
    return (grid.T if student.interaction == "inner" else grid).reshape(-1)


def _readout(g: _Graph, student, hs: List[str]) -> str:
    """(B, 1) or (1, B) logits from the states."""
    F, D, L = student.num_fields, student.embed_dim, student.depth
    order = _feature_order(student)
    if hasattr(student, "linear"):  # DAGFM: linear over s^t_j = sum_d h^t_jd, the sum folded into the weight
        w = _f32(student.linear.weight).reshape(L + 1, F)
        terms = [g.op("MatMul", [g.const("readout", np.repeat(w[t], D)[order][None, :]), h], f"readout{t}")
                 for t, h in enumerate(hs)]
        return g.op("Add", [g.op("Sum", terms, "logit_sum"), g.const("readout_bias", _f32(student.linear.bias))],
                    "logit_b")
    from torch import nn  # DAGFM+: MLP over flatten(h0 + sum_t h^t)
    x = g.op("Sum", hs, "hidden_sum")  # (F*D, B): the first Gemm reads it transposed
    first = True
    for k, layer in enumerate(student.mlp):
        if isinstance(layer, nn.Linear):
            w = _f32(layer.weight)
            if first:
                w = w[:, order]
            x = g.op("Gemm", [x, g.const(f"mlp{k}_w", w), g.const(f"mlp{k}_b", _f32(layer.bias))], f"mlp{k}",
                     transA=int(first), transB=1)
            first = False
        elif isinstance(layer, nn.ReLU):
            x = g.op("Relu", [x], f"relu{k}")
        elif not isinstance(layer, nn.Dropout):  # dropout is the identity in eval
            raise ValueError(f"student: unsupported MLP layer {type(layer).__name__}")
    return x


def _student_kind(student) -> str:
    # Told apart by their parts rather than their classes, so that serving (which re-exports this
    # exporter) never loads the model classes.
    common = all(hasattr(student, a) for a in ("p", "q", "connect_layer", "interaction", "depth"))
    if common and hasattr(student, "linear"):
        return "dagfm"
    if common and hasattr(student, "mlp"):
        return "dagfm+"
    raise ValueError(f"student: ONNX export supports DAGFM and DAGFMPlus, got {type(student).__name__}")


def build_onnx_student(embedding, student, schema: FeatureSchema, meta: Optional[dict] = None):
    """The ``onnx.ModelProto`` of ``Scorer(embedding, student)`` (DAGFM or DAGFMPlus, eval mode)."""
    onnx = require("onnx")
    from onnx import TensorProto, helper

    kind = _student_kind(student)
    if embedding.num_fields != student.num_fields or embedding.embed_dim != student.embed_dim:
        raise ValueError(f"embedding: {embedding.num_fields} fields of size {embedding.embed_dim} do not match "
                         f"the student's {student.num_fields} x {student.embed_dim}")
    g = _Graph()
    emb = _pooled_embeddings(g, embedding, schema.num_slots)
    hs = _propagate(g, student, emb, _mixing(embedding, _f32(student.connect_layer)))
    logit2 = _readout(g, student, hs)
    g.nodes.append(helper.make_node("Reshape", [logit2, g.ints("shape", [-1])], [OUTPUT_NAMES[0]],
                                    name=OUTPUT_NAMES[0]))
    g.nodes.append(helper.make_node("Sigmoid", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], name=OUTPUT_NAMES[1]))
    graph = helper.make_graph(
        g.nodes, "dagfm_student",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", schema.num_slots])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in OUTPUT_NAMES],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dagfm_ext", doc_string="DAGFM student: encoded slots -> logit")
    info = {"num_slots": schema.num_slots, "num_fields": schema.num_fields, "slot_fields": schema.slot_fields(),
            "student": kind, "interaction": student.interaction,
            "depth": student.depth, "embed_dim": student.embed_dim, **(meta or {})}
    helper.set_model_props(model, {SCHEMA_KEY: json.dumps(schema.to_dict()), META_KEY: json.dumps(info)})
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last years
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(embedding, student, schema: FeatureSchema, output, triton_dir=None,
                model_name: Optional[str] = None, meta: Optional[dict] = None):
    """Write the student as ``output`` (.onnx); with ``triton_dir`` also a Triton model repository
    ``triton_dir/<model_name>/`` (default name: the file's stem). Returns the ``onnx.ModelProto``."""
    from .fileio import atomic_write, make_dirs
    model = build_onnx_student(embedding, student, schema, meta)
    output = Path(output)
    make_dirs(output.parent, needed_for=output)
    atomic_write(output, lambda f: f.write(model.SerializeToString()))
    if triton_dir is not None:
        from .triton import write_model_repository
        write_model_repository(model, triton_dir, model_name or output.stem)
    return model
