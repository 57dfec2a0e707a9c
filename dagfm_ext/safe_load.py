"""Reading files a user hands us without running anything they contain.

* ``load_plain``: a ``torch.save`` file read by torch's weights-only unpickler (tensors and plain
  data only); anything else is refused with one line naming the file.
* ``digest``: a sha256 of a nested structure of tensors and plain data, so a checkpoint whose
  bytes changed is an error, not a different model.
* ``read_pt2``: the bytes of a ``.pt2`` written by ``dagfm-ext export``, checked before
  ``torch.export.load`` sees them. That loader unpickles (weights, constants and sample inputs can
  be pickles, the last with a fallback to full unpickling), loads compiled libraries (AOTInductor
  entries), evaluates shape expressions with sympy's ``eval`` and executes guard code. The
  archive may hold only the entries an export writes: JSON, raw tensor bytes, sample inputs the
  weights-only unpickler accepts, shape expressions of a small grammar and no guard code.
* ``check_program_ops``: the loaded graph calls only aten and dagfm_ext operators.
"""
from __future__ import annotations

import hashlib
import io
import json
import operator
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeFileError", "load_plain", "load_failure", "digest", "read_pt2", "check_program_ops"]


class UnsafeFileError(ValueError):
    """A file holds something that loading could execute; it was not loaded."""


def _refused_global(err: Exception):
    """The global a weights-only load refused, or None when the bytes are simply not a pickle."""
    m = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", str(err))
    return (m.group(1) or m.group(2)) if m else None


def _unpickler_reason(err: Exception) -> str:
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
    return (m.group(1) if m else str(err).strip().splitlines()[0])[:200]


def load_plain(source, what: str, name=None) -> Any:
    """``torch.load`` with the weights-only unpickler; one-line errors name the file.

    ``source`` is a path or a binary file object; ``name`` is the path to put in messages."""
    name = name if name is not None else source
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:  # a missing or unreadable file stays an OSError
            return load_plain(f, what, name)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except OSError as e:  # the file is open: torch's zip reader refuses a damaged archive this way
        raise ValueError(f"{what}: {name} is not a readable torch file ({load_failure(e)})") from None
    except pickle.UnpicklingError as e:
        if _refused_global(e):
            raise UnsafeFileError(f"{what}: {name} holds objects other than tensors and plain data "
                                  f"({_refused_global(e)}); refused, since loading it could run code") from None
        raise ValueError(f"{what}: {name} is not a readable torch file ({_unpickler_reason(e)})") from None
    except Exception as e:  # noqa: BLE001  (torch.load of arbitrary bytes fails in many ways)
        raise ValueError(f"{what}: {name} is not a readable torch file ({load_failure(e)})") from None


def load_failure(e: Exception) -> str:
    """Why torch.load failed, in a few words."""
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    if isinstance(e, EOFError):
        return "it is empty or cut short"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


_SCALARS = (type(None), bool, int, float, str)


def _feed(h, obj, path: str) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"{path}=tensor{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, _SCALARS):
        h.update(f"{path}={type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, dict):
        h.update(f"{path}=dict{len(obj)};".encode())
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{path}: dict key {k!r} is neither str nor int")
            _feed(h, v, f"{path}/{k!r}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{path}={type(obj).__name__}{len(obj)};".encode())
        for i, v in enumerate(obj):
            _feed(h, v, f"{path}[{i}]")
    else:
        raise TypeError(f"{path}: {type(obj).__name__} is not a tensor or plain data")


def digest(obj) -> str:
    """sha256 (hex) of nested dicts, lists and tuples of tensors and plain scalars, in order."""
    h = hashlib.sha256()
    _feed(h, obj, "")
    return h.hexdigest()


# -- .pt2 ------------------------------------------------------------------------------------
_PT2_PLAIN = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                        r"|extra/[^/]+|models/\w+\.json|data/weights/weight_\d+|data/constants/tensor_\d+")
_PT2_CONFIG = re.compile(r"data/(weights/\w+_weights|constants/\w+_constants)_config\.json")
_PT2_SAMPLE = re.compile(r"data/sample_inputs/\w+\.pt")
# Shape expressions: symbols, numbers, arithmetic, comparisons and torch's sympy functions, called
# with symbols and numbers only (no attribute access, no strings but quoted symbol names). No
# powers or shifts: Pow(9, 10**18) would not run code but would never finish.
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<num>\d{1,20}(?:\.\d{1,20})?)|(?P<name>[A-Za-z_]\w*)|(?P<quoted>'[a-z]+\d+')"
                         r"|(?P<op>//|<=|>=|==|!=|[-+*/%(),<>=]))")
_EXPR_NAMES = frozenset("""Symbol Integer Rational Float True False positive integer nonnegative real oo int_oo
    Add Mul Equality Unequality LessThan StrictLessThan GreaterThan StrictGreaterThan BooleanTrue
    BooleanFalse true false zoo nan Infinity NegativeInfinity IntInfinity NegativeIntInfinity floor ceiling
    Eq Ne Lt Le Gt Ge And Or Not Max Min Abs Mod FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt
    FloorToInt CeilDiv RShift FloatTrueDiv IntTrueDiv TruncToFloat TruncToInt
    RoundToInt RoundDecimal ToFloat Identity IsNonOverlappingAndDenseIndicator""".split())
_SYMBOL = re.compile(r"[a-z]+\d+")


def _check_expr(expr: str) -> bool:
    if len(expr) > 2000 or re.search(r"\*\s*\*", expr):
        return False
    pos = 0
    while pos < len(expr):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None:
            return False
        name = m.group("name")
        if name is not None and name not in _EXPR_NAMES and not _SYMBOL.fullmatch(name):
            return False
        pos = m.end()
    return True


class _Refused(Exception):
    """Why an archive entry is refused (becomes part of an UnsafeFileError)."""


def _check_model_json(data: bytes) -> None:
    try:
        program = json.loads(data)
    except ValueError:
        raise _Refused("not JSON") from None
    if not isinstance(program, dict) or program.get("guards_code", []) != []:
        raise _Refused("guard code, which loading would execute")
    stack = [program]
    while stack:
        obj = stack.pop()
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            if key == "expr_str" and not (isinstance(value, str) and _check_expr(value)):
                raise _Refused(f"a shape expression outside the expected grammar, {str(value)[:60]!r}")
            if isinstance(value, (dict, list)):
                stack.append(value)


def _check_payload_config(data: bytes) -> None:
    try:
        entries = list(json.loads(data)["config"].values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise _Refused("not a payload config") from None
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use_pickle", True):
            raise _Refused("a pickled payload")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(entry.get("path_name", ""))):
            raise _Refused(f"a payload that is not a tensor, {entry.get('path_name')!r}")


def _check_entry(zf: zipfile.ZipFile, name: str, rel) -> None:
    if rel is None:
        raise _Refused("outside the archive's root folder")
    if _PT2_CONFIG.fullmatch(rel):
        _check_payload_config(zf.read(name))
    elif _PT2_SAMPLE.fullmatch(rel):
        try:
            load_plain(io.BytesIO(zf.read(name)), "model", name)
        except ValueError:
            raise _Refused("objects other than tensors and plain data") from None
    elif not _PT2_PLAIN.fullmatch(rel):
        raise _Refused("not an entry an export writes")
    elif rel.startswith("models/"):
        _check_model_json(zf.read(name))


def read_pt2(path) -> io.BytesIO:
    """The bytes of an exported program, checked to hold only what ``dagfm-ext export`` writes
    (see the module docstring); load them with ``torch.export.load`` from the returned buffer, so
    what was checked is what is loaded."""
    path = Path(path)
    data = path.read_bytes()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise ValueError(f"model: {path} is not a .pt2 archive (not a zip file)") from None
    root = names[0].split("/", 1)[0] if names else ""
    for i, name in enumerate(names):
        rel = name[len(root) + 1:] if name.startswith(root + "/") else None
        try:
            if name in names[:i]:
                raise _Refused("a second entry of that name")
            _check_entry(zf, name, rel)
        except _Refused as e:
            raise UnsafeFileError(f"model: {path} is refused ({name}: {e}): it is not a program written by "
                                  "'dagfm-ext export' and loading it could run code") from None
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"model: {path} is a damaged archive ({name}: {e})") from None
    if not names:
        raise ValueError(f"model: {path} is an empty archive")
    return io.BytesIO(data)


def check_program_ops(program: torch.export.ExportedProgram, path) -> None:
    """Every call in the program's graph is an aten or dagfm_ext operator (or a shape op)."""
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        t = node.target
        if node.op != "call_function" or not (t is operator.getitem or (
                isinstance(t, torch._ops.OpOverload) and t.namespace in ("aten", "dagfm_ext"))):
            raise UnsafeFileError(f"model: {path} is refused: its graph calls {t!r}, not an aten or "
                                  "dagfm_ext operator")
