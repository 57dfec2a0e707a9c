"""MovieLens-100K, fetched on first use from the RecBole wheel on PyPI (only the wheel is
downloaded, the library is never imported), checked against pinned sha256 sums and cached under
``cache_dir()``. The data is not redistributable: it is never stored in this repository.
Label: rating >= 4."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections import Counter
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .cache import cache_dir
from .container import TabularData, split_indices
from .schema import DataFormatError, FeatureSchema, FieldSpec

__all__ = ["fetch_ml100k", "read_ml100k_dir", "load_ml100k", "ML100K_FIELDS"]

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
ML100K_FIELDS = ("user_id", "item_id", "age", "gender", "occupation", "release_year", "genres")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(dest: Path) -> Path:
    """The pinned RecBole wheel via pip (honours the user's pip index/proxy config), falling
    back to PyPI's JSON API."""
    errors = []
    cmd = [sys.executable, "-m", "pip", "download", f"recbole=={RECBOLE_VERSION}", "--no-deps",
           "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 and (dest / RECBOLE_WHEEL).exists():
            return dest / RECBOLE_WHEEL
        errors.append(f"pip download: {proc.stderr.strip()[-500:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        errors.append(f"pip download: {e}")
    try:
        with urllib.request.urlopen(f"https://pypi.org/pypi/recbole/{RECBOLE_VERSION}/json", timeout=60) as r:
            meta = json.load(r)
        url = next(u["url"] for u in meta["urls"] if u["filename"] == RECBOLE_WHEEL)
        with urllib.request.urlopen(url, timeout=300) as r:
            (dest / RECBOLE_WHEEL).write_bytes(r.read())
        return dest / RECBOLE_WHEEL
    except Exception as e:  # noqa: BLE001  (reported below with the pip error)
        errors.append(f"PyPI JSON API: {e}")
    raise RuntimeError("ml-100k: could not download the RecBole wheel that ships MovieLens-100K "
                       f"(recbole=={RECBOLE_VERSION}): " + " | ".join(errors) +
                       f". Put the files {sorted(ML100K_FILES)} in {cache_dir() / 'ml-100k'} "
                       "or set DAGFM_EXT_CACHE.")


def _verify_dir(path: Path) -> bool:
    try:
        return all(_sha256((path / n).read_bytes()) == h for n, h in ML100K_FILES.items())
    except OSError:
        return False


def fetch_ml100k(root: Optional[Path] = None) -> Path:
    """Directory with the verified MovieLens-100K atomic files, downloading them on first use."""
    target = Path(root) if root is not None else cache_dir() / "ml-100k"
    if _verify_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheel = _download_wheel(tmp)
        blob = wheel.read_bytes()
        if _sha256(blob) != RECBOLE_WHEEL_SHA256:
            raise RuntimeError(f"ml-100k: sha256 mismatch for {RECBOLE_WHEEL}: expected "
                               f"{RECBOLE_WHEEL_SHA256}, got {_sha256(blob)}")
        staged = tmp / "ml-100k"
        staged.mkdir()
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for name, digest in ML100K_FILES.items():
                data = z.read(f"recbole/dataset_example/ml-100k/{name}")
                if _sha256(data) != digest:
                    raise RuntimeError(f"ml-100k: sha256 mismatch for {name} in {RECBOLE_WHEEL}")
                (staged / name).write_bytes(data)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # atomic: a concurrent reader sees all files or none
    return target


def _read_atomic(path: Path) -> Tuple[List[str], List[List[str]]]:
    """A RecBole atomic file: header 'name:type' tab-separated, then rows."""
    if not path.exists():
        raise FileNotFoundError(f"ml-100k: missing file {path}")
    with open(path, encoding="utf-8", errors="replace") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        rows = []
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != len(header):
                raise DataFormatError(f"{path}:{lineno}: expected {len(header)} tab-separated "
                                      f"columns {header}, got {len(parts)}")
            rows.append(parts)
    return header, rows


def read_ml100k_dir(path, seed: int = 2022) -> TabularData:
    """Encode a directory holding ml-100k.{inter,user,item} (RecBole atomic format)."""
    path = Path(path)
    ih, inter = _read_atomic(path / "ml-100k.inter")
    uh, users = _read_atomic(path / "ml-100k.user")
    th, items = _read_atomic(path / "ml-100k.item")
    try:
        iu, ii, ir = ih.index("user_id"), ih.index("item_id"), ih.index("rating")
        ua, ug, uo = uh.index("age"), uh.index("gender"), uh.index("occupation")
        ty, tc = th.index("release_year"), th.index("class")
    except ValueError as e:
        raise DataFormatError(f"ml-100k: unexpected header in {path}: {e}") from None
    user_rec = {u[0]: {"age": u[ua], "gender": u[ug], "occupation": u[uo]} for u in users}
    item_rec = {t[0]: {"release_year": t[ty], "genres": t[tc].split()} for t in items}
    max_genres = max((len(r["genres"]) for r in item_rec.values()), default=1) or 1
    fields = [FieldSpec("user_id"), FieldSpec("item_id"), FieldSpec("age"), FieldSpec("gender"),
              FieldSpec("occupation"), FieldSpec("release_year"),
              FieldSpec("genres", kind="multi", max_len=max_genres)]
    counts = {f.name: Counter() for f in fields}
    for r in inter:
        counts["user_id"][r[iu]] += 1
        counts["item_id"][r[ii]] += 1
        u, t = user_rec.get(r[iu], {}), item_rec.get(r[ii], {})
        for k in ("age", "gender", "occupation"):
            counts[k][u.get(k, "")] += 1
        counts["release_year"][t.get("release_year", "")] += 1
        counts["genres"].update(t.get("genres", []))
    for f in fields:
        f.build_vocab(counts[f.name])
    schema = FeatureSchema(fields)
    # Encode each user and item once, then gather per interaction.
    user_ids = sorted({r[iu] for r in inter})
    item_ids = sorted({r[ii] for r in inter})
    uenc = schema.encode([{"user_id": u, **user_rec.get(u, {})} for u in user_ids])
    ienc = schema.encode([{"item_id": t, **item_rec.get(t, {})} for t in item_ids])
    upos = {u: k for k, u in enumerate(user_ids)}
    ipos = {t: k for k, t in enumerate(item_ids)}
    ucol = np.array([upos[r[iu]] for r in inter], dtype=np.int64)
    icol = np.array([ipos[r[ii]] for r in inter], dtype=np.int64)
    user_slots = [0, 2, 3, 4]  # user_id, age, gender, occupation
    x = ienc[icol].copy()  # item_id, release_year, genres come from the item encoding
    x[:, user_slots] = uenc[ucol][:, user_slots]
    try:
        rating = np.array([float(r[ir]) for r in inter], dtype=np.float64)
    except ValueError as e:
        raise DataFormatError(f"{path / 'ml-100k.inter'}: rating: expected a number ({e})") from None
    y = (rating >= 4).astype(np.float32)
    return TabularData("ml-100k", schema, x.astype(np.int32), y, split_indices(len(y), seed), user_field="user_id")


def load_ml100k(seed: int = 2022, root: Optional[Path] = None) -> TabularData:
    return read_ml100k_dir(fetch_ml100k(root), seed=seed)
