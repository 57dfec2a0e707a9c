"""Serving the distilled student: a ``torch.export`` program over encoded slots, plus its schema.

What is exported (``export_student``) is ``Scorer``: encoded rows (B, num_slots) int64 -> logits
(B,), i.e. the shared field embedding (per-field offsets, mean pooling of multi-valued fields),
field mixing, the fused propagation (``dagfm_ext::propagate_fwd``) and the readout. The batch
dimension is dynamic. Raw values become slots on the Python side with the training vocabularies
(``FeatureSchema.encode``); the schema travels inside the .pt2 as the extra file ``schema.json``.

Multi-valued fields (MovieLens genres) have a fixed width in the graph: ``max_len`` slots each,
the ids of the first ``max_len`` tokens followed by ``-1`` padding (a row without tokens is one
OOV id 0). The graph masks ``-1`` slots and averages the rest, so padding never reaches a lookup.

Loading (``load_student``, ``dagfm-ext predict``) first checks the archive (``safe_load.read_pt2``:
nothing torch.export.load would unpickle or execute), then needs only torch and this package's ops: the
model classes and the training stack are not imported, and this module imports none of them
(exporting a training run's checkpoint is ``dagfm_ext.export``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, TextIO, Tuple

import numpy as np
import torch
from torch import nn

from .data import DataFormatError, FeatureSchema
from .data.derive import DERIVATIONS
from .fileio import atomic_write, make_dirs
from .safe_load import check_program_ops, read_pt2
from .scorer import Scorer

__all__ = ["Scorer", "export_student", "load_student", "read_raw_rows", "predict_file", "export_onnx",
           "SCHEMA_FILE", "META_FILE"]

SCHEMA_FILE = "schema.json"
META_FILE = "meta.json"
FORMAT = 1


def __getattr__(name: str):
    # The ONNX export needs the optional onnx package: imported on first use only.
    if name == "export_onnx":
        from . import onnx_export
        return getattr(onnx_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_student(embedding: nn.Module, student: nn.Module, schema: FeatureSchema, output,
                   aoti_output=None, meta: Optional[dict] = None) -> torch.export.ExportedProgram:
    """Write ``Scorer(embedding, student)`` (on CPU, eval mode) as a torch.export program to
    ``output`` with the schema inside; with ``aoti_output`` also an AOTInductor package (a
    compiled .so for this CPU, loadable from C++ with ``torch::inductor::AOTIModelPackageLoader``)."""
    scorer = Scorer(embedding, student).to("cpu").eval()
    # Batch 2 as the example: export specialises sizes 0 and 1. Id 0 (OOV) is valid in every slot.
    example = torch.zeros(2, schema.num_slots, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.export.export(scorer, (example,), dynamic_shapes={"x": {0: batch}})
    info = {"format": FORMAT, "num_slots": schema.num_slots, "num_fields": schema.num_fields,
            "slot_fields": schema.slot_fields(), **(meta or {})}
    output = Path(output)
    make_dirs(output.parent, needed_for=output)
    extra = {SCHEMA_FILE: json.dumps(schema.to_dict()), META_FILE: json.dumps(info)}
    atomic_write(output, lambda f: torch.export.save(program, f, extra_files=extra))
    if aoti_output is not None:
        make_dirs(Path(aoti_output).parent, needed_for=aoti_output)
        # The custom op has no C shim: the package calls it through the dispatcher by name, so the
        # loading process must have the ops registered (dagfm_ext._C, or libdagfm_ops in C++).
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(aoti_output),
            inductor_configs={"aot_inductor.metadata": {"num_slots": str(schema.num_slots)}})
    return program


def load_student(path) -> Tuple[nn.Module, FeatureSchema, dict]:
    """(callable: encoded rows -> logits, schema, metadata) from a file written by export_student, or
    from an .onnx file written by ``export_onnx`` (run by onnxruntime)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":  # scored by onnxruntime; the schema is in the model's metadata
        from .onnx_scorer import OnnxStudent
        onnx_student = OnnxStudent(path)
        return (lambda x: torch.from_numpy(onnx_student(x.numpy())), FeatureSchema.from_dict(onnx_student.schema),
                onnx_student.meta)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file: {path}")
    checked = read_pt2(path)  # refuses what torch.export.load would unpickle or execute
    extra = {SCHEMA_FILE: "", META_FILE: ""}
    try:
        program = torch.export.load(checked, extra_files=extra)
    except Exception as e:  # noqa: BLE001  (any unreadable file is reported the same way)
        raise ValueError(f"model: {path} is not a torch.export program written by "
                         f"'dagfm-ext export' ({type(e).__name__}: {e})") from None
    check_program_ops(program, path)
    if not extra[SCHEMA_FILE]:
        raise ValueError(f"model: {path} has no {SCHEMA_FILE}; write it with 'dagfm-ext export'")
    try:
        schema, meta = FeatureSchema.from_dict(json.loads(extra[SCHEMA_FILE])), json.loads(extra[META_FILE] or "{}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"model: {path} has an unreadable {SCHEMA_FILE} or {META_FILE} ({e})") from None
    return program.module(), schema, meta


def _delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() == ".csv":
        return ","
    if path.suffix.lower() in (".tsv", ".txt"):
        return "\t"
    return "\t" if "\t" in first_line else ","


def read_raw_rows(path, schema: FeatureSchema) -> Iterator[Dict[str, str]]:
    """Raw records (raw column name -> raw string) from a TSV/CSV file, streamed.

    With a header row naming every raw column the schema reads, columns are matched by name
    (others, such as a label, are ignored); a derived field (Avazu's hour-of-day and weekday)
    reads its source column (``hour``). Without a header, the columns are the fields in schema
    order, optionally preceded by a label column, as in Criteo's files (label, I1-I13, C1-C26).
    Multi-valued fields hold space-separated tokens; empty cells are missing values (OOV)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input: {'not a file' if path.exists() else 'no such file'}: {path}")
    names = schema.names
    wanted = list(dict.fromkeys(f.raw_column for f in schema.fields))
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        first = f.readline()
        delim = _delimiter(path, first)
        f.seek(0)
        reader = csv.reader(f, delimiter=delim, quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
        columns: Optional[List[int]] = None
        width = None
        for row in reader:
            lineno = reader.line_num
            if not row or row == [""]:
                continue
            if columns is None:
                if set(wanted) <= set(row):  # a header
                    columns, width = [row.index(f.raw_column) for f in schema.fields], len(row)
                    continue
                if len(row) not in (len(names), len(names) + 1):
                    raise DataFormatError(
                        f"{path}:{lineno}: expected a header naming the columns {wanted}, or "
                        f"{len(names)} columns (the fields in order) or {len(names) + 1} (a label "
                        f"first), got {len(row)} columns")
                skip = len(row) - len(names)
                columns, width = list(range(skip, skip + len(names))), len(row)
            if len(row) != width:
                raise DataFormatError(f"{path}:{lineno}: expected {width} columns, got {len(row)}")
            record = {}
            for spec, c in zip(schema.fields, columns):
                value = row[c]
                if (spec.kind == "integer" or spec.derive is not None) and value != "":
                    try:
                        spec.token(value)
                    except ValueError:
                        expected = DERIVATIONS[spec.derive][1] if spec.derive else "an integer"
                        raise DataFormatError(f"{path}:{lineno}: {spec.raw_column}: expected {expected} or "
                                              f"empty, got {value!r}") from None
                record[spec.raw_column] = value
            yield record


def predict_file(model_path, input_path, output: Optional[TextIO] = None,
                 chunk_rows: int = 65536) -> np.ndarray:
    """Score every row of ``input_path`` with an exported student; writes ``logit,probability``
    lines (with a header) to ``output`` when given and returns the logits."""
    module, schema, _ = load_student(model_path)
    if output is not None:
        output.write("logit,probability\n")
    parts = []
    rows = read_raw_rows(input_path, schema)
    with torch.no_grad():
        while True:
            chunk = [r for _, r in zip(range(chunk_rows), rows)]
            if not chunk:
                break
            logits = module(torch.from_numpy(schema.encode(chunk))).float()
            if output is not None:
                for z, p in zip(logits.tolist(), torch.sigmoid(logits).tolist()):
                    output.write(f"{z:.9g},{p:.9g}\n")
            parts.append(logits.numpy())
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
