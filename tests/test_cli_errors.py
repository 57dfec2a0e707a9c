"""Every error a user can cause is one line on stderr and exit status 2, never a traceback; the
CLI's outputs are written atomically; resuming follows explicit rules."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dagfm_ext.checkpoint import CHECKPOINT, read_checkpoint
from dagfm_ext.cli import main
from dagfm_ext.config import RunConfig
from dagfm_ext.fileio import atomic_write_text
from dagfm_ext.safe_load import digest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def criteo_rows(labels):
    return "".join(f"{y}\t" + "\t".join([str(i % 7)] * 13 + [f"c{i % 3}"] * 26) + "\n" for i, y in enumerate(labels))


@pytest.fixture(scope="module")
def bad(tmp_path_factory, finished_run):
    """Paths for the bad inputs: ``d`` holds everything, ``run`` and ``model`` are good ones."""
    d = tmp_path_factory.mktemp("bad")
    run, model = finished_run
    (d / "file").write_text("x")
    (d / "dir").mkdir()
    (d / "empty").mkdir()
    (d / "rows.tsv").write_text("\t".join(["1"] * 8) + "\n")
    (d / "few.tsv").write_text(criteo_rows([0, 1, 1]))
    (d / "oneclass.tsv").write_text(criteo_rows([0] * 60))
    (d / "binary.tsv").write_bytes(b"\xff\xfe\x00\x81" * 50)
    for name, content in (("zero", b""), ("garbage", b"not a checkpoint\n" * 10)):
        (d / name).mkdir()
        (d / name / CHECKPOINT).write_bytes(content)
    (d / "zero.pt2").write_bytes(b"")
    (d / "garbage.pt2").write_text("no zip here\n")
    state = read_checkpoint(run / CHECKPOINT)
    del state["rng"]
    state["teacher_test_logits"] = torch.from_numpy(state["teacher_test_logits"])
    state["digest"] = digest(state)
    (d / "norng").mkdir()
    torch.save(state, d / "norng" / CHECKPOINT)
    shutil.copytree(run, d / "run")
    return d, run, model


# name -> (argv builder, fragment of the expected message)
CASES = {
    "run output under a file": (lambda d, r, m: ["run", "--output", f"{d}/file/sub"], "file: is a file, so"),
    "run output is a file": (lambda d, r, m: ["run", "--output", f"{d}/file"], "is a file"),
    "resume missing dir": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/missing"], "holds no run to resume"),
    "resume empty dir": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/empty"], "holds no run to resume"),
    "resume new settings": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/run", "--interaction", "outer",
                                             "--depth", "2", "--seed", "5"],
                            "interaction 'inner' (given 'outer'); seed 3 (given 5)"),
    "device meta": (lambda d, r, m: ["run", "--device", "meta", "--output", f"{d}/o1"], "device: expected 'cpu'"),
    "device cuda:7": (lambda d, r, m: ["run", "--device", "cuda:7", "--output", f"{d}/o2"], "device: 'cuda:7'"),
    "criteo is a dir": (lambda d, r, m: ["run", "--dataset", f"criteo:{d}/dir", "--output", f"{d}/o3"], "criteo"),
    "criteo 3 rows": (lambda d, r, m: ["run", "--dataset", f"criteo:{d}/few.tsv", "--min-count", "1",
                                       "--output", f"{d}/o4"], "has no rows"),
    "criteo one class": (lambda d, r, m: ["run", "--dataset", f"criteo:{d}/oneclass.tsv", "--min-count", "1",
                                          "--output", f"{d}/o5"], "has only label 0"),
    "criteo binary": (lambda d, r, m: ["run", "--dataset", f"criteo:{d}/binary.tsv", "--output", f"{d}/o6"],
                      "binary.tsv"),
    "resume zero-byte checkpoint": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/zero"],
                                    "not a readable torch file (it is empty or cut short)"),
    "resume garbage checkpoint": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/garbage"], "not a readable"),
    "resume checkpoint without rng": (lambda d, r, m: ["run", "--resume", "--output", f"{d}/norng"], "lacks rng"),
    "export zero-byte checkpoint": (lambda d, r, m: ["export", "--checkpoint", f"{d}/zero", "--output",
                                                     f"{d}/x.pt2"], "not a readable"),
    "export garbage checkpoint": (lambda d, r, m: ["export", "--checkpoint", f"{d}/garbage", "--output",
                                                   f"{d}/x.pt2"], "not a readable"),
    "export checkpoint without rng": (lambda d, r, m: ["export", "--checkpoint", f"{d}/norng", "--output",
                                                       f"{d}/x.pt2"], "lacks rng"),
    "export output under a file": (lambda d, r, m: ["export", "--checkpoint", str(r), "--output",
                                                    f"{d}/file/x.pt2"], "/file/x.pt2 cannot be written"),
    "export output is a dir": (lambda d, r, m: ["export", "--checkpoint", str(r), "--output", f"{d}/dir"],
                               "expected a file path, got a directory"),
    "export missing checkpoint": (lambda d, r, m: ["export", "--checkpoint", f"{d}/missing", "--output",
                                                   f"{d}/x.pt2"], "checkpoint: expected a run directory"),
    "predict output is a dir": (lambda d, r, m: ["predict", "--model", str(m), "--input", f"{d}/rows.tsv",
                                                 "--output", f"{d}/dir"], "expected a file path, got a directory"),
    "predict output under a file": (lambda d, r, m: ["predict", "--model", str(m), "--input", f"{d}/rows.tsv",
                                                     "--output", f"{d}/file/p.csv"], "file: is a file, so"),
    "predict zero-byte model": (lambda d, r, m: ["predict", "--model", f"{d}/zero.pt2", "--input",
                                                 f"{d}/rows.tsv"], "not a .pt2 archive"),
    "predict garbage model": (lambda d, r, m: ["predict", "--model", f"{d}/garbage.pt2", "--input",
                                               f"{d}/rows.tsv"], "not a .pt2 archive"),
    "predict checkpoint as model": (lambda d, r, m: ["predict", "--model", str(r / CHECKPOINT), "--input",
                                                     f"{d}/rows.tsv"], "refused"),
    "predict missing input": (lambda d, r, m: ["predict", "--model", str(m), "--input", f"{d}/missing.tsv"],
                              "input: no such file"),
    "predict input is a dir": (lambda d, r, m: ["predict", "--model", str(m), "--input", f"{d}/dir"],
                               "input: not a file"),
    "convert garbage": (lambda d, r, m: ["convert-checkpoint", "--trust-pickle", f"{d}/garbage", f"{d}/n.pt"],
                        "not a readable torch file"),
    "convert present format": (lambda d, r, m: ["convert-checkpoint", "--trust-pickle", str(r), f"{d}/n.pt"],
                               "not a checkpoint of an older dagfm_ext"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_status_2(bad, capsys, case):
    argv, fragment = CASES[case]
    d, run, model = bad
    assert main(argv(d, run, model)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"dagfm-ext {argv(d, run, model)[0]}: error: ") and fragment in err, err


def test_bad_input_in_a_real_process(bad):
    d, run, model = bad
    for argv in (["run", "--resume", "--output", f"{d}/missing"],
                 ["export", "--checkpoint", str(run), "--output", f"{d}/dir"],
                 ["predict", "--model", f"{d}/garbage.pt2", "--input", f"{d}/rows.tsv"]):
        proc = subprocess.run([sys.executable, "-m", "dagfm_ext", *argv], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def test_predict_output_is_atomic(bad, tmp_path, capsys):
    """A malformed row after the first chunk leaves the previous preds.csv as it was and no temp file."""
    d, run, model = bad
    rows = tmp_path / "rows.tsv"
    good = "\t".join(["1"] * 8) + "\n"
    rows.write_text(good * 70_000 + "1\t2\n")
    out = tmp_path / "preds.csv"
    out.write_text("previous\n")
    assert main(["predict", "--model", str(model), "--input", str(rows), "--output", str(out)]) == 2
    assert f"{rows}:70001: expected 8 columns, got 2" in capsys.readouterr().err
    assert out.read_text() == "previous\n" and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv", "rows.tsv"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "log.json"
    stale = tmp_path / f"log.json.{dead}.abc123.tmp"  # what a write killed mid-way leaves
    alive = tmp_path / f"log.json.{os.getppid()}.def456.tmp"  # another process writing right now
    other = tmp_path / f"report.json.{dead}.x.tmp"
    for p in (stale, alive, other):
        p.write_text("partial")
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}" and not stale.exists() and alive.exists() and other.exists()


def test_resume_rules():
    saved = RunConfig(dataset="synthetic", depth=2, seed=3)
    with pytest.raises(ValueError, match=r"depth 2 \(given 3\)"):
        saved.continued_by(RunConfig(dataset="synthetic", depth=3, seed=3), given={"depth"})
    # Only the settings given are compared; where and how the run executes may change.
    resumed = saved.continued_by(RunConfig(dataset="synthetic", depth=3, seed=9, device="cpu", output="x"),
                                 given={"device", "output"})
    assert resumed.depth == 2 and resumed.seed == 3 and resumed.output == "x"
    with pytest.raises(ValueError, match="seed 3 \\(given 9\\)"):  # the Python API compares every setting
        saved.continued_by(RunConfig(dataset="synthetic", depth=2, seed=9))


def test_criteo_path_is_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RunConfig(dataset="criteo:data/train.txt").validate().dataset == f"criteo:{tmp_path}/data/train.txt"


def test_setup_without_torch_says_how_to_install():
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "install torch first" in proc.stderr and "--no-build-isolation" in proc.stderr
