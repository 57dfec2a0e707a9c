"""The student as a standard-op ONNX graph, built node by node with ``onnx.helper``.

Input ``slots`` (batch, num_slots) int64, the encoded rows of ``FeatureSchema.encode`` (multi-valued
fields padded with -1); outputs ``logit`` and ``probability`` (batch,) float32. The batch axis is
dynamic; the feature schema and the run's metadata are in the model's ``metadata_props``.

Why a hand-built graph rather than ``torch.onnx.export`` of the eager student: the exporter turns
each masked einsum into an ONNX ``Einsum`` that onnxruntime evaluates with its generic einsum
kernel (transposes and small products around every call), and it keeps the mask multiply in the
graph. Here every layer is one or two ``MatMul`` nodes in a layout chosen so that onnxruntime's
GEMM sees large, contiguous operands, and the upper-triangle mask is applied to the weights once,
at export time:

* embedding: ``Gather`` of the transposed ids gives (S, B, D); the mean pooling of multi-valued
  fields is a per-slot weight (valid / count of valid slots of its field), and pooling and field
  mixing together are one (F, S) matrix ``connect_layer @ slot_to_field``, applied by a single GEMM
  to (S, B*D). The result is h0 in field-major layout (F, B, D).
* ``inner``: layout (D, B, F); a layer is one batched ``MatMul`` (D, B, F) @ (D, F, F).
* ``outer`` and ``kernel``: layout (B, F*D); a layer is one ``MatMul`` (B, F*D) @ (F*D, F*D) whose
  (i, j) block is the edge's (D, D) matrix (``p_ij q_ij^T`` for outer), zero below the diagonal.
  For outer this is the one dense GEMM ONNX Runtime runs best (measured against a batched
  (F, B, D) @ (F, D, F), transpose, (F, B, F) @ (F, F, D) decomposition, see the serving table).
* readout: DAGFM's linear layer over the t-major states, or DAGFM+'s MLP (``Gemm``/``Relu``)
  over h0 + sum_t h^t.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np

from .data import FeatureSchema
from .onnx_scorer import INPUT_NAME, META_KEY, OUTPUT_NAMES, SCHEMA_KEY

__all__ = ["build_onnx_student", "export_onnx", "OPSET"]

OPSET = 17


def _f32(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy().copy()


class _Graph:
    """Nodes and constant initializers with unique names."""

    def __init__(self):
        from onnx import helper, numpy_helper
        self._helper, self._numpy_helper = helper, numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self._numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: List[str], name: str, **attrs) -> str:
        self._count += 1
        out = f"{name}_{self._count}"
        self.nodes.append(self._helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _upper_mask(F: int) -> np.ndarray:
    # Edge i -> j exists for i <= j (self-loops included).
    return np.triu(np.ones((F, F), dtype=np.float32))


def _embed_mixed(g: _Graph, embedding, connect_layer: np.ndarray, num_slots: int) -> str:
    """h0 = connect_layer @ pooled embeddings, as (F, B, D)."""
    table = _f32(embedding.table.weight)
    offsets = embedding.offsets.to("cpu").numpy().astype(np.int64)
    slot_field = embedding.slot_field.to("cpu").numpy()
    F, D = connect_layer.shape[0], table.shape[1]
    if offsets.shape != (num_slots,):
        raise ValueError(f"embedding: expected {num_slots} slots, has {offsets.shape[0]}")
    slot_to_field = (slot_field[None, :] == np.arange(F)[:, None]).astype(np.float32)  # (F, S)
    ids_t = g.op("Transpose", [INPUT_NAME], "ids_t", perm=[1, 0])  # (S, B)
    if embedding.pooled:
        valid = g.op("Cast", [g.op("GreaterOrEqual", [ids_t, g.const("zero_id", np.array(0, np.int64))], "valid")],
                     "valid_f", to=1)
        same_field = slot_to_field.T @ slot_to_field  # (S, S)
        count = g.op("MatMul", [g.const("same_field", same_field), valid], "count")  # valid slots of the field
        weight = g.op("Div", [valid, g.op("Max", [count, g.const("one", np.array(1, np.float32))], "count1")],
                      "pool_weight")
        ids_t = g.op("Max", [ids_t, g.const("zero_id_max", np.array(0, np.int64))], "ids_clamped")
    rows = g.op("Add", [ids_t, g.const("offsets", offsets[:, None])], "rows")
    emb = g.op("Gather", [g.const("table", table), rows], "emb", axis=0)  # (S, B, D)
    if embedding.pooled:
        emb = g.op("Mul", [emb, g.op("Unsqueeze", [weight, g.const("axis_last", np.array([2], np.int64))],
                                     "pool_weight3")], "emb_pooled")
    flat = g.op("Reshape", [emb, g.const("shape_s_bd", np.array([num_slots, -1], np.int64))], "emb_flat")
    mixed = g.op("MatMul", [g.const("mix", connect_layer @ slot_to_field), flat], "h0_flat")  # (F, B*D)
    return g.op("Reshape", [mixed, g.const("shape_fbd", np.array([F, -1, D], np.int64))], "h0_fbd")


def _edge_gemm_weights(student) -> List[np.ndarray]:
    """Per layer the (F*D, F*D) matrix whose (i, j) block is the edge's (D, D) map, 0 for i > j."""
    p = _f32(student.p)
    L, F, D = p.shape[0], p.shape[1], p.shape[3]
    mask = _upper_mask(F)
    out = []
    for t in range(L):
        if student.interaction == "kernel":
            blocks = p[t] * mask[:, :, None, None]
        else:  # outer: the rank-one edge map d -> e is p_ij[d] q_ij[e]
            blocks = np.einsum("ijd,ije->ijde", p[t] * mask[:, :, None], _f32(student.q[t]))
        out.append(blocks.transpose(0, 2, 1, 3).reshape(F * D, F * D))  # rows (i, d), cols (j, e)
    return out


def _propagate(g: _Graph, student, h0_fbd: str):
    """(per-layer states list, pooled-sum tensor builder inputs): returns (states (B, F) names,
    z name in (B, F*D) order for DAGFM+ or None)."""
    F, D, L = student.num_fields, student.embed_dim, student.depth
    want_sum = not hasattr(student, "linear")
    if student.interaction == "inner":
        p = _f32(student.p) * _upper_mask(F)[None, :, :, None]
        h0 = g.op("Transpose", [h0_fbd], "h0_dbf", perm=[2, 1, 0])  # (D, B, F)
        h, states, total = h0, [], h0
        for t in range(L):
            a = g.op("MatMul", [h, g.const(f"w{t}", p[t].transpose(2, 0, 1))], f"a{t}")  # (D, F, F)
            h = g.op("Mul", [h0, a], f"h{t + 1}")
            if want_sum:
                total = g.op("Add", [total, h], f"total{t + 1}")
            else:
                states.append(h)
        if want_sum:
            return None, g.op("Reshape", [g.op("Transpose", [total], "z_bfd", perm=[1, 2, 0]),
                                          g.const("shape_b_fd", np.array([0, F * D], np.int64))], "z")
        sums = [g.op("ReduceSum", [s, g.const(f"axis0_{k}", np.array([0], np.int64))], f"s{k}", keepdims=0)
                for k, s in enumerate([h0] + states)]
        return sums, None
    h0 = g.op("Reshape", [g.op("Transpose", [h0_fbd], "h0_bfd", perm=[1, 0, 2]),
                          g.const("shape_b_fd", np.array([0, F * D], np.int64))], "h0")  # (B, F*D)
    h, hs, total = h0, [h0], h0
    for t, w in enumerate(_edge_gemm_weights(student)):
        h = g.op("Mul", [h0, g.op("MatMul", [h, g.const(f"w{t}", w)], f"a{t}")], f"h{t + 1}")
        if want_sum:
            total = g.op("Add", [total, h], f"total{t + 1}")
        hs.append(h)
    if want_sum:
        return None, total
    return hs, None


def _readout(g: _Graph, student, states, z) -> str:
    F, D, L = student.num_fields, student.embed_dim, student.depth
    if z is None:  # DAGFM: linear over the states s^t_j = sum_d h^t_jd, t-major
        w = _f32(student.linear.weight).reshape(L + 1, F)
        # inner's states are (B, F); the others' are (B, F*D), whose sum over d folds into the weight
        weight = (w if student.interaction == "inner" else np.repeat(w, D, axis=1)).reshape(-1, 1)
        cat = g.op("Concat", states, "states", axis=1)
        logit = g.op("MatMul", [cat, g.const("readout", weight)], "logit2")
        logit = g.op("Add", [logit, g.const("readout_bias", _f32(student.linear.bias))], "logit_b")
    else:  # DAGFM+: MLP over flatten(h0 + sum_t h^t)
        from torch import nn
        x = z
        for k, layer in enumerate(student.mlp):
            if isinstance(layer, nn.Linear):
                x = g.op("Gemm", [x, g.const(f"mlp{k}_w", _f32(layer.weight)), g.const(f"mlp{k}_b", _f32(layer.bias))],
                         f"mlp{k}", transB=1)
            elif isinstance(layer, nn.ReLU):
                x = g.op("Relu", [x], f"relu{k}")
            elif not isinstance(layer, nn.Dropout):  # dropout is the identity in eval
                raise ValueError(f"student: unsupported MLP layer {type(layer).__name__}")
        logit = x
    return logit


def build_onnx_student(embedding, student, schema: FeatureSchema, meta: Optional[dict] = None):
    """The ``onnx.ModelProto`` of ``Scorer(embedding, student)`` (DAGFM or DAGFMPlus, eval mode)."""
    import onnx
    from onnx import TensorProto, helper
    from .modules import DAGFM, DAGFMPlus

    if not isinstance(student, (DAGFM, DAGFMPlus)):
        raise ValueError(f"student: ONNX export supports DAGFM and DAGFMPlus, got {type(student).__name__}")
    if embedding.num_fields != student.num_fields or embedding.embed_dim != student.embed_dim:
        raise ValueError(f"embedding: {embedding.num_fields} fields of size {embedding.embed_dim} do not match "
                         f"the student's {student.num_fields} x {student.embed_dim}")
    g = _Graph()
    h0 = _embed_mixed(g, embedding, _f32(student.connect_layer), schema.num_slots)
    states, z = _propagate(g, student, h0)
    logit2 = _readout(g, student, states, z)  # (B, 1)
    shape_b = g.const("shape_b", np.array([-1], np.int64))
    g.nodes.append(helper.make_node("Reshape", [logit2, shape_b], [OUTPUT_NAMES[0]], name=OUTPUT_NAMES[0]))
    g.nodes.append(helper.make_node("Sigmoid", [OUTPUT_NAMES[0]], [OUTPUT_NAMES[1]], name=OUTPUT_NAMES[1]))
    graph = helper.make_graph(
        g.nodes, "dagfm_student",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT64, ["batch", schema.num_slots])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in OUTPUT_NAMES],
        g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="dagfm_ext", doc_string="DAGFM student: encoded slots -> logit")
    info = {"num_slots": schema.num_slots, "num_fields": schema.num_fields, "slot_fields": schema.slot_fields(),
            "student": "dagfm+" if z is not None else "dagfm", "interaction": student.interaction,
            "depth": student.depth, "embed_dim": student.embed_dim, **(meta or {})}
    helper.set_model_props(model, {SCHEMA_KEY: json.dumps(schema.to_dict()), META_KEY: json.dumps(info)})
    model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime releases of the last years
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(embedding, student, schema: FeatureSchema, output, triton_dir=None,
                model_name: Optional[str] = None, meta: Optional[dict] = None):
    """Write the student as ``output`` (.onnx); with ``triton_dir`` also a Triton model repository
    ``triton_dir/<model_name>/`` (default name: the file's stem). Returns the ``onnx.ModelProto``."""
    import onnx
    model = build_onnx_student(embedding, student, schema, meta)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(output))
    if triton_dir is not None:
        from .triton import write_model_repository
        write_model_repository(model, triton_dir, model_name or output.stem)
    return model
