"""Data: the feature schema, the shared field embedding, and the built-in datasets.

Encoding. Every sample is a row of integer *slots*: one slot per single-valued field and
``max_len`` slots per multi-valued field (padding ``-1``). Within a field, id 0 is the
out-of-vocabulary / missing id and ids 1..n are the vocabulary. The schema (vocabularies,
minimum counts, slot layout) is plain JSON-able data saved with every checkpoint, so raw
values are mapped the same way at inference (``FeatureSchema.encode``).

Datasets (``load_dataset``):
  * ``ml-100k``  MovieLens-100K, fetched on first use from the RecBole wheel on PyPI (only the
    wheel is downloaded, the library is never imported), checked against pinned sha256 sums and
    cached under ``$DAGFM_EXT_CACHE`` (default ``$XDG_CACHE_HOME/dagfm_ext`` or
    ``~/.cache/dagfm_ext``). The data is not redistributable: it is never stored in this repo.
  * ``criteo:PATH`` Criteo-format TSV, streamed twice (count, then encode).
  * ``synthetic`` labels from planted interactions up to order 4.
Splits are a seeded random permutation cut 80/10/10 (train/val/test).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["FieldSpec", "FeatureSchema", "FieldEmbedding", "TabularData", "DataFormatError",
           "cache_dir", "fetch_ml100k", "read_ml100k_dir", "load_ml100k", "load_criteo",
           "make_synthetic", "load_dataset", "criteo_int_bucket", "split_indices"]

KINDS = ("categorical", "multi", "integer")


class DataFormatError(ValueError):
    """A malformed input row; the message names the file and line."""


# --------------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------------

def criteo_int_bucket(value: int) -> int:
    """The public Criteo preprocessing of integer features: v > 2 -> ceil(ln(v)^2 + 1)."""
    return int(math.ceil(math.log(value) ** 2 + 1)) if value > 2 else value


@dataclass
class FieldSpec:
    """One field. ``kind``: 'categorical' (one token), 'multi' (up to ``max_len`` tokens,
    mean-pooled into one embedding) or 'integer' (bucketed with ``criteo_int_bucket`` first).
    ``vocab`` maps a raw token (str) to its id 1..n; anything else (or a token seen fewer than
    ``min_count`` times when the vocabulary was built) is id 0."""
    name: str
    kind: str = "categorical"
    min_count: int = 1
    max_len: int = 1
    vocab: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS} for field {self.name!r}, got {self.kind!r}")
        if self.kind != "multi" and self.max_len != 1:
            raise ValueError(f"max_len: only 'multi' fields may have max_len != 1 ({self.name!r})")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1  # + the OOV id 0

    def token(self, raw) -> str:
        """The vocabulary key of one raw value."""
        if self.kind == "integer":
            if raw is None or raw == "":
                return ""
            return str(criteo_int_bucket(int(raw)))
        return "" if raw is None else str(raw)

    def build_vocab(self, counts: Mapping[str, int]) -> None:
        # Sorted by (-count, token) so the vocabulary does not depend on reading order.
        kept = sorted((t for t, c in counts.items() if c >= self.min_count and t != ""),
                      key=lambda t: (-counts[t], t))
        self.vocab = {t: i + 1 for i, t in enumerate(kept)}

    def encode_one(self, raw) -> List[int]:
        if self.kind == "multi":
            tokens = [] if raw is None else (raw.split() if isinstance(raw, str) else list(raw))
            ids = [self.vocab.get(str(t), 0) for t in tokens[: self.max_len]] or [0]
            return ids + [-1] * (self.max_len - len(ids))
        return [self.vocab.get(self.token(raw), 0)]


class FeatureSchema:
    """An ordered list of fields; the slot layout of the encoded rows follows that order."""

    def __init__(self, fields: Sequence[FieldSpec]):
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"fields: duplicate names in {names}")
        self.fields = list(fields)

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    @property
    def names(self) -> List[str]:
        return [f.name for f in self.fields]

    @property
    def num_slots(self) -> int:
        return sum(f.max_len for f in self.fields)

    def slot_fields(self) -> List[int]:
        """Field index of every slot."""
        return [i for i, f in enumerate(self.fields) for _ in range(f.max_len)]

    def encode(self, records: Iterable[Mapping[str, object]]) -> np.ndarray:
        """Map raw records (dicts by field name; multi fields: list or space-separated str) to
        encoded rows (N, num_slots) int64, exactly as the training data was encoded."""
        rows = []
        for r in records:
            row: List[int] = []
            for f in self.fields:
                row += f.encode_one(r.get(f.name))
            rows.append(row)
        return np.asarray(rows, dtype=np.int64).reshape(len(rows), self.num_slots)

    def to_dict(self) -> dict:
        return {"fields": [dict(name=f.name, kind=f.kind, min_count=f.min_count,
                                max_len=f.max_len, vocab=f.vocab) for f in self.fields]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "FeatureSchema":
        return cls([FieldSpec(**f) for f in d["fields"]])

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path) -> "FeatureSchema":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{f.name}:{f.kind}[{f.vocab_size}]" for f in self.fields)
        return f"FeatureSchema({inner})"


class FieldEmbedding(nn.Module):
    """One table for all fields (per-field offsets); multi-valued fields are mean-pooled.
    forward(x (B, num_slots) int) -> (B, num_fields, embed_dim)."""

    def __init__(self, schema: FeatureSchema, embed_dim: int):
        super().__init__()
        self.num_fields, self.embed_dim = schema.num_fields, embed_dim
        sizes = [f.vocab_size for f in schema.fields]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        slot_field = schema.slot_fields()
        self.table = nn.Embedding(int(sum(sizes)), embed_dim)
        with torch.no_grad():  # xavier-uniform per field, as the public code initialises each table
            for s, n in zip(starts, sizes):
                bound = math.sqrt(6.0 / (n + embed_dim))
                self.table.weight[s:s + n].uniform_(-bound, bound)
        self.register_buffer("offsets", torch.as_tensor(starts[slot_field]), persistent=False)
        self.register_buffer("slot_field", torch.as_tensor(slot_field, dtype=torch.long), persistent=False)
        self.pooled = len(slot_field) != schema.num_fields

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.offsets.numel():
            raise ValueError(f"x: expected encoded rows (B, {self.offsets.numel()}), got {tuple(x.shape)}")
        ids = x.long()
        if not self.pooled:
            return self.table(ids + self.offsets)
        valid = ids >= 0
        e = self.table(ids.clamp_min(0) + self.offsets) * valid.unsqueeze(-1).to(self.table.weight.dtype)
        B = ids.shape[0]
        out = e.new_zeros(B, self.num_fields, self.embed_dim).index_add_(1, self.slot_field, e)
        count = e.new_zeros(B, self.num_fields).index_add_(1, self.slot_field, valid.to(e.dtype))
        return out / count.clamp_min(1.0).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# dataset container and splits
# --------------------------------------------------------------------------------------------

def split_indices(n: int, seed: int, fractions=(0.8, 0.1, 0.1)) -> Dict[str, np.ndarray]:
    """Seeded random permutation cut into train/val/test."""
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {"train": np.sort(perm[:n_train]), "val": np.sort(perm[n_train:n_train + n_val]),
            "test": np.sort(perm[n_train + n_val:])}


@dataclass
class TabularData:
    """Encoded rows ``x`` (N, num_slots) (an array or a memmap), labels ``y`` (N,) in {0, 1}."""
    name: str
    schema: FeatureSchema
    x: np.ndarray
    y: np.ndarray
    splits: Dict[str, np.ndarray]

    def size(self, split: str) -> int:
        return len(self.splits[split])

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                rng: Optional[np.random.Generator] = None, rank: int = 0,
                world_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``batch_size`` rows in split order (or shuffled by ``rng``). With
        ``world_size`` > 1 each batch is dealt round-robin across the ranks and only this
        ``rank``'s rows (r, r + W, ...) are yielded, so the global batch is unchanged."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        idx = self.splits[split]
        if shuffle:
            idx = (rng or np.random.default_rng()).permutation(idx)
        for start in range(0, len(idx), batch_size):
            part = idx[start:start + batch_size]
            if shuffle:
                part = np.sort(part)  # locality for memmaps; order inside a batch is irrelevant
            part = part[rank::world_size]
            yield (torch.from_numpy(np.asarray(self.x[part], dtype=np.int64)),
                   torch.from_numpy(np.asarray(self.y[part], dtype=np.float32)))


# --------------------------------------------------------------------------------------------
# MovieLens-100K
# --------------------------------------------------------------------------------------------

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
ML100K_FIELDS = ("user_id", "item_id", "age", "gender", "occupation", "release_year", "genres")


def cache_dir() -> Path:
    """``$DAGFM_EXT_CACHE``, else ``$XDG_CACHE_HOME/dagfm_ext``, else ``~/.cache/dagfm_ext``."""
    env = os.environ.get("DAGFM_EXT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dagfm_ext"


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
    return TabularData("ml-100k", schema, x.astype(np.int32), y, split_indices(len(y), seed))


def load_ml100k(seed: int = 2022, root: Optional[Path] = None) -> TabularData:
    return read_ml100k_dir(fetch_ml100k(root), seed=seed)


# --------------------------------------------------------------------------------------------
# Criteo
# --------------------------------------------------------------------------------------------

CRITEO_INT = [f"I{i}" for i in range(1, 14)]
CRITEO_CAT = [f"C{i}" for i in range(1, 27)]


def _criteo_rows(path: Path) -> Iterator[Tuple[int, int, List[str]]]:
    """(line number, label, 39 tokens) for each row, validated; streams the file."""
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 40:
                raise DataFormatError(f"{path}:{lineno}: expected 40 tab-separated columns "
                                      f"(label, I1-I13, C1-C26), got {len(parts)}")
            if parts[0] not in ("0", "1"):
                raise DataFormatError(f"{path}:{lineno}: label: expected 0 or 1, got {parts[0]!r}")
            tokens = []
            for k in range(13):
                v = parts[1 + k]
                if v == "":
                    tokens.append("")
                    continue
                try:
                    tokens.append(str(criteo_int_bucket(int(v))))
                except ValueError:
                    raise DataFormatError(f"{path}:{lineno}: {CRITEO_INT[k]}: expected an integer "
                                          f"or empty, got {v!r}") from None
            tokens.extend(parts[14:])
            yield lineno, int(parts[0]), tokens


def load_criteo(path, min_count: int = 10, seed: int = 2022, work_dir=None) -> TabularData:
    """Criteo-format TSV (label, I1-I13, C1-C26), streamed in two passes (counts, then encode).

    Integer features are bucketed by ``criteo_int_bucket``; categories seen fewer than
    ``min_count`` times (and missing values) map to id 0. With ``work_dir`` the encoded rows go
    to a memmap there, so files larger than memory work."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"criteo: no such file: {path}")
    if min_count < 1:
        raise ValueError(f"min_count: expected >= 1, got {min_count}")
    fields = ([FieldSpec(n, kind="integer") for n in CRITEO_INT] +
              [FieldSpec(n, kind="categorical", min_count=min_count) for n in CRITEO_CAT])
    counts = [Counter() for _ in fields]
    n = 0
    for _, _, tokens in _criteo_rows(path):
        for c, t in zip(counts, tokens):
            c[t] += 1
        n += 1
    if n == 0:
        raise DataFormatError(f"{path}: no data rows")
    for f, c in zip(fields, counts):
        f.build_vocab(c)
    schema = FeatureSchema(fields)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        x = np.lib.format.open_memmap(Path(work_dir) / "criteo_x.npy", mode="w+", dtype=np.int32, shape=(n, 39))
    else:
        x = np.empty((n, 39), dtype=np.int32)
    y = np.empty(n, dtype=np.float32)
    vocabs = [f.vocab for f in fields]
    chunk, rows, start = 65536, [], 0
    for i, (_, label, tokens) in enumerate(_criteo_rows(path)):
        y[i] = label
        rows.append([v.get(t, 0) for v, t in zip(vocabs, tokens)])
        if len(rows) == chunk:
            x[start:start + chunk] = rows
            start, rows = start + chunk, []
    if rows:
        x[start:start + len(rows)] = rows
    if isinstance(x, np.memmap):
        x.flush()
    return TabularData(f"criteo:{path}", schema, x, y, split_indices(n, seed))


# --------------------------------------------------------------------------------------------
# synthetic data with planted interactions
# --------------------------------------------------------------------------------------------

def make_synthetic(n: int = 20000, num_fields: int = 8, vocab: int = 16, max_order: int = 4,
                   seed: int = 0, split_seed: Optional[int] = None) -> TabularData:
    """Labels drawn from sigmoid(sum_k w_k prod_{f in S_k} z_f[x_f]): each id has a hidden
    scalar z ~ N(0, 1) and the planted field sets S_k cover every order 1..max_order (two sets
    per order, over random distinct fields), so a model limited to order 2 cannot fit them."""
    if num_fields < max_order:
        raise ValueError(f"num_fields: expected >= max_order ({max_order}), got {num_fields}")
    rng = np.random.default_rng(seed)
    x = rng.integers(1, vocab + 1, size=(n, num_fields))
    z = rng.normal(size=(num_fields, vocab + 1))
    logit = np.full(n, -0.2)
    for order in range(1, max_order + 1):
        for _ in range(2):
            fs = rng.choice(num_fields, size=order, replace=False)
            term = np.ones(n)
            for f in fs:
                term *= z[f, x[:, f]]
            logit += rng.choice([-1.0, 1.0]) * (0.5 if order == 1 else 0.8 if order == 2 else 1.2) * term
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    fields = [FieldSpec(f"f{i}", vocab={str(v): v for v in range(1, vocab + 1)}) for i in range(num_fields)]
    return TabularData("synthetic", FeatureSchema(fields), x.astype(np.int32), y,
                       split_indices(n, seed if split_seed is None else split_seed))


def load_dataset(spec: str, seed: int = 2022, min_count: int = 10, work_dir=None,
                 synthetic_size: int = 20000) -> TabularData:
    """``ml-100k``, ``criteo:PATH`` or ``synthetic``."""
    if spec == "ml-100k":
        return load_ml100k(seed=seed)
    if spec == "synthetic":
        return make_synthetic(n=synthetic_size, seed=0, split_seed=seed)
    if isinstance(spec, str) and spec.startswith("criteo:"):
        return load_criteo(spec[len("criteo:"):], min_count=min_count, seed=seed, work_dir=work_dir)
    raise ValueError(f"dataset: expected 'ml-100k', 'criteo:PATH' or 'synthetic', got {spec!r}")
