"""Write a demo student for examples/cpp/serve_student.cpp (and its ctest): an AOTInductor
package, encoded rows and the logits Python computes for them.

    python examples/cpp/make_demo_package.py OUT_DIR
    # -> OUT_DIR/student.aoti.pt2, student.pt2, rows.csv, expected.csv

A trained student comes from `dagfm-ext export --checkpoint RUN --output student.pt2 --aoti
student.aoti.pt2`; this script uses a seeded, untrained one so the C++ check needs no training.
"""
import sys
from pathlib import Path

import torch

from dagfm_ext.data import FeatureSchema, FieldEmbedding, FieldSpec
from dagfm_ext.modules import DAGFM
from dagfm_ext.serving import Scorer, export_student


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    genres = {g: i + 1 for i, g in enumerate(["Action", "Comedy", "Drama", "Horror"])}
    schema = FeatureSchema([FieldSpec("user", vocab={str(i): i for i in range(1, 9)}),
                            FieldSpec("genres", kind="multi", max_len=3, vocab=genres),
                            FieldSpec("item", vocab={str(i): i for i in range(1, 12)})])
    embedding, student = FieldEmbedding(schema, 8), DAGFM(3, 8, 3, "outer")
    export_student(embedding, student, schema, out / "student.pt2", aoti_output=out / "student.aoti.pt2")
    rows = schema.encode([{"user": "1", "genres": "Action Comedy", "item": "4"},
                          {"user": "2", "genres": "", "item": "11"},
                          {"user": "9", "genres": "Drama Horror Action Comedy", "item": "1"},
                          {"user": "3", "genres": "Western", "item": "7"},
                          {"user": "5", "genres": "Horror", "item": "99"}])
    with torch.no_grad():
        logits = Scorer(embedding, student).eval()(torch.from_numpy(rows))
    (out / "rows.csv").write_text("".join(",".join(map(str, r)) + "\n" for r in rows.tolist()))
    (out / "expected.csv").write_text("".join(f"{v:.9g}\n" for v in logits.tolist()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_demo_package.py OUT_DIR")
    main(Path(sys.argv[1]))
