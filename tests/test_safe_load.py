"""Files we load never run code: crafted checkpoints and .pt2 archives are refused by every loader
with one line and nothing executed; a changed byte in a checkpoint is an error; the older
checkpoint format converts only on an explicit opt-in."""
import io
import json
import shutil
import zipfile

import numpy as np
import pytest
import torch

from dagfm_ext.checkpoint import CHECKPOINT, convert_checkpoint, load_finished_run, read_checkpoint
from dagfm_ext.cli import main
from dagfm_ext.safe_load import UnsafeFileError
from dagfm_ext.serving import load_student


class CreatesFile:
    """Unpickling this opens (creates) ``path``: the stand-in for any payload."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_error_line(capsys, *fragments):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.fixture()
def crafted_run(tmp_path, finished_run):
    """A copy of a finished run whose checkpoint.pt unpickles into creating ``marker``."""
    run = tmp_path / "crafted"
    shutil.copytree(finished_run[0], run)
    marker = tmp_path / "created-by-unpickling"
    state = read_checkpoint(run / CHECKPOINT)
    state["rng"] = CreatesFile(marker)
    state["teacher_test_logits"] = torch.from_numpy(state["teacher_test_logits"])
    torch.save(state, run / CHECKPOINT)
    return run, marker


def test_crafted_checkpoint_refused_by_every_loader(crafted_run, tmp_path, capsys):
    run, marker = crafted_run
    ckpt = str(run / CHECKPOINT)
    assert main(["run", "--output", str(run), "--resume", "--quiet"]) == 2
    one_error_line(capsys, ckpt, "refused", "io.open", "convert-checkpoint --trust-pickle")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.pt2")]) == 2
    one_error_line(capsys, ckpt, "refused")
    for load in (read_checkpoint, load_finished_run):
        with pytest.raises(UnsafeFileError, match="holds objects other than tensors"):
            load(run / CHECKPOINT)
    assert not marker.exists() and not (tmp_path / "m.pt2").exists()
    # The payload is live: full unpickling does run it.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def _flip_one_float(file, tensor):
    data = bytearray(file.read_bytes())
    raw = tensor.contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at >= 0 and data.find(raw, at + 1) < 0
    data[at + 1] ^= 0x40  # one byte of the first float
    file.write_bytes(bytes(data))


def test_changed_float_in_checkpoint_is_an_error(finished_run, tmp_path, capsys):
    run = tmp_path / "rot"
    shutil.copytree(finished_run[0], run)
    _flip_one_float(run / CHECKPOINT, read_checkpoint(run / CHECKPOINT)["model"]["student.linear.weight"])
    with pytest.raises(ValueError, match="is damaged: its contents do not match their sha256 digest"):
        read_checkpoint(run / CHECKPOINT)
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.pt2")]) == 2
    one_error_line(capsys, str(run / CHECKPOINT), "damaged")


def _old_format(state: dict) -> dict:
    """``state`` as the earlier format wrote it: numpy RNG state and arrays, no digest."""
    old = dict(state)
    old.pop("digest", None)  # read_checkpoint has checked and dropped it
    n = state["rng"]["numpy"]
    version, py_state, gauss = state["rng"]["python"]
    old["rng"] = {"torch": state["rng"]["torch"],
                  "numpy": ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]),
                  "python": (version, tuple(py_state), gauss), "cuda": None}
    old["teacher_test_logits"] = np.asarray(state["teacher_test_logits"])
    old["format"] = 1
    return old


def test_old_format_converts_only_on_explicit_trust(finished_run, tmp_path, capsys):
    state = read_checkpoint(finished_run[0] / CHECKPOINT)
    old_file, new_file = tmp_path / "old.pt", tmp_path / "new.pt"
    torch.save(_old_format(state), old_file)
    with pytest.raises(UnsafeFileError, match=f"convert-checkpoint --trust-pickle {old_file} NEW"):
        read_checkpoint(old_file)
    with pytest.raises(SystemExit):  # --trust-pickle is required
        main(["convert-checkpoint", str(old_file), str(new_file)])
    assert "--trust-pickle" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pass --trust-pickle"):
        convert_checkpoint(old_file, new_file)
    assert main(["convert-checkpoint", "--trust-pickle", str(old_file), str(new_file)]) == 0
    new = read_checkpoint(new_file)
    for k, v in state["model"].items():
        assert torch.equal(new["model"][k], v)
    assert np.array_equal(new["teacher_test_logits"], state["teacher_test_logits"])
    assert torch.equal(new["rng"]["numpy"]["key"], state["rng"]["numpy"]["key"])
    assert new["rng"]["python"] == state["rng"]["python"]


# -- .pt2 ------------------------------------------------------------------------------------
def _rewrite(src, dst, change):
    """Copy the zip ``src`` to ``dst``; ``change(rel, data)`` returns new data (None: drop) and may add
    entries through the returned dict."""
    added = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for name in zin.namelist():
            data = change(name[len(root) + 1:], zin.read(name), added)
            if data is not None:
                zout.writestr(name, data)
        for rel, data in added.items():
            zout.writestr(f"{root}/{rel}", data)


def _pickled(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sample_inputs(marker):
    return lambda rel, data, added: _pickled(CreatesFile(marker)) if rel.startswith("data/sample_inputs/") else data


def _pickled_weight(marker):
    def change(rel, data, added):
        if rel.endswith("_weights_config.json"):
            config = json.loads(data)
            entry = next(iter(config["config"].values()))
            entry["use_pickle"] = True
            added["data/weights/" + entry["path_name"] + "_p"] = _pickled(CreatesFile(marker))
            entry["path_name"] += "_p"
            return json.dumps(config)
        return data
    return change


def _model_json(key, value):
    def change(rel, data, added):
        if rel.startswith("models/"):
            program = json.loads(data)
            if key == "guards_code":
                program["guards_code"] = [value]
            else:
                tv = program["graph_module"]["graph"]["tensor_values"]
                sizes = next(v["sizes"] for v in tv.values() if any("as_expr" in s for s in v["sizes"]))
                next(s for s in sizes if "as_expr" in s)["as_expr"]["expr_str"] = value
            return json.dumps(program)
        return data
    return change


def _extra_entry(rel_name):
    def change(rel, data, added):
        added[rel_name] = b"\x7fELF"
        return data
    return change


CRAFTED = {
    "pickled sample inputs": (_sample_inputs, "data/sample_inputs/"),
    "pickled weight": (_pickled_weight, "a pickled payload"),
    "shape expression": (lambda m: _model_json("expr_str", f"__import__('io').open('{m}', 'w')"), "shape expression"),
    "power that never ends": (lambda m: _model_json("expr_str", "9**9**9**9"), "shape expression"),
    "guard code": (lambda m: _model_json("guards_code", f"open('{m}', 'w')"), "guard code"),
    "compiled library": (lambda m: _extra_entry("data/aotinductor/model/model.so"), "not an entry an export writes"),
}


@pytest.mark.parametrize("kind", list(CRAFTED))
def test_crafted_pt2_refused_by_load_student_and_predict(finished_run, tmp_path, capsys, kind):
    make, reason = CRAFTED[kind]
    marker = tmp_path / "created-by-loading"
    crafted = tmp_path / "crafted.pt2"
    _rewrite(finished_run[1], crafted, make(marker))
    rows = tmp_path / "rows.tsv"
    rows.write_text("\t".join(["1"] * 8) + "\n")
    with pytest.raises(UnsafeFileError, match=reason):
        load_student(crafted)
    assert main(["predict", "--model", str(crafted), "--input", str(rows), "--output", str(tmp_path / "p.csv")]) == 2
    one_error_line(capsys, str(crafted), "refused", reason)
    assert not marker.exists() and not (tmp_path / "p.csv").exists()


def test_crafted_pt2_payload_is_live_for_torch_export_load(finished_run, tmp_path):
    """The refusals above are needed: torch.export.load itself runs these payloads."""
    marker = tmp_path / "created-by-torch"
    crafted = tmp_path / "crafted.pt2"
    _rewrite(finished_run[1], crafted, _sample_inputs(marker))
    try:
        torch.export.load(crafted)
    except Exception:  # noqa: BLE001  (whatever happens after the payload ran)
        pass
    assert marker.exists()


def test_exported_student_still_loads(finished_run):
    module, schema, meta = load_student(finished_run[1])
    assert meta["student"] == "dagfm" and schema.num_fields == 8


def test_random_bit_flips_are_errors_or_harmless(finished_run, tmp_path):
    """Any one flipped bit either leaves the loaded checkpoint identical (zip padding, timestamps)
    or is a one-line ValueError naming the file: never a different model."""
    import random
    src = (finished_run[0] / CHECKPOINT).read_bytes()
    want = read_checkpoint(finished_run[0] / CHECKPOINT)
    rng, file, errors = random.Random(0), tmp_path / CHECKPOINT, 0
    for _ in range(60):
        data = bytearray(src)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        file.write_bytes(bytes(data))
        try:
            got = read_checkpoint(file)
        except ValueError as e:
            assert str(file) in str(e) and "\n" not in str(e)
            errors += 1
            continue
        assert all(torch.equal(got["model"][k], v) for k, v in want["model"].items())
        assert got["config"] == want["config"] and got["history"] == want["history"]
    assert errors >= 40


def test_damaged_archive_is_a_value_error_and_a_missing_file_an_oserror(tmp_path, monkeypatch):
    """torch's zip reader reports some damaged archives as OSError (EINVAL); once the file is open
    that is the file's fault, while a file that cannot be opened stays an OSError."""
    from dagfm_ext.safe_load import load_plain

    with pytest.raises(FileNotFoundError):
        load_plain(tmp_path / "missing.pt", "checkpoint")
    file = tmp_path / "damaged.pt"
    torch.save({"a": torch.ones(2)}, file)

    def zip_reader_refuses(*args, **kwargs):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(torch, "load", zip_reader_refuses)
    with pytest.raises(ValueError, match=r"^checkpoint: .*damaged\.pt is not a readable torch file \(OSError"):
        load_plain(file, "checkpoint")
