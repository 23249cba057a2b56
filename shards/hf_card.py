"""The Hugging Face `datasets` features of a build, written with it: `features.json` and a dataset card.

`datasets.load_dataset("webdataset", ...)` infers a build's column types from its first five samples.
A field that is null there (a cot record's `camera`, an object's `object_id`) becomes type `null` and the
first later sample that sets it fails to cast; a `KEY.points.npy` (N, 5) array becomes a list of lists.
So every finalized build carries its types, computed from ALL its samples (`build_features`):
- each JSON record field gets the one Arrow type that holds every value the build has in it (nulls
  merge into the type of the non-null values, integers into floats where both occur, struct keys are
  the union of the keys seen);
- each `.npy` member is a fixed-shape `ArrayND` with a free first dimension when its trailing
  dimensions are the same in every sample (`points.npy` -> Array2D (None, 5)), else nested lists;
- each image member is an `Image`.

Written next to `manifest.json`:
- `features.json`: `datasets.Features.to_dict()` form, for
  `load_dataset("webdataset", data_files=..., features=Features.from_dict(json.load(...)))`;
- `README.md`: a dataset card whose YAML names the shards and the same features, so
  `load_dataset(BUILD_DIR, split="train")` needs nothing else.
Generated here without importing `datasets` (a test dependency only); tests/test_hf_datasets.py loads
real builds with the real package. Format notes: docs/interfaces.md "Hugging Face datasets".
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from shards.layout import CARD_FILE, FEATURES_FILE

__all__ = ["ShardFeatures", "build_features", "card_text", "features_to_dict", "features_to_yaml",
           "load_record", "member_ext", "merge_features", "write_hf_files"]

_IMAGE_EXTS = {"jpg", "jpeg", "png"}
_META = ("__key__", "__url__")

# A feature here is a small tree: ("value", dtype) | ("image",) | ("array", ndim, shape, dtype)
# | ("list", feature) | ("struct", {name: feature}).
Feature = tuple[Any, ...]

_ARROW_DTYPES = {
    pa.null(): "null", pa.bool_(): "bool", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32",
    pa.int64(): "int64", pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64",
    pa.float16(): "float16", pa.float32(): "float32", pa.float64(): "float64", pa.string(): "string",
    pa.large_string(): "large_string", pa.binary(): "binary",
}
_DTYPE_ARROW = {v: k for k, v in _ARROW_DTYPES.items()}


def _from_arrow(t: pa.DataType) -> Feature:
    if pa.types.is_struct(t):
        return ("struct", {t.field(i).name: _from_arrow(t.field(i).type) for i in range(t.num_fields)})
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _from_arrow(t.value_type))
    if t not in _ARROW_DTYPES:
        raise TypeError(f"no datasets dtype for Arrow type {t}")
    return ("value", _ARROW_DTYPES[t])


def _wanted(ext: str) -> bool:
    return ext == "json" or ext.endswith("npy")


def _tar_members(tar: Path) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, extension, data) of every file member, the way webdataset splits names; data only for
    records and arrays (None for images: their pixels are never needed here).

    Walks the 512-byte ustar headers of the mapped file directly (with PAX `path`/`size` records, as our
    writer may emit them): `tarfile`'s per-member header objects were most of this step's time
    (bench/hf_card.md). A member type our writer never writes (links, GNU long names) is an error.
    """
    import mmap

    with open(tar, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            pos, pax = 0, {}
            while pos + 512 <= len(mm):
                h = mm[pos:pos + 512]
                if h.count(0) == 512:
                    break
                size = int(pax["size"]) if "size" in pax else int(h[124:136].rstrip(b"\0 ") or b"0", 8)
                typ = h[156:157]
                start, pos = pos + 512, pos + 512 + -(-size // 512) * 512
                if typ == b"x":  # PAX header of the next member
                    pax = _pax_records(mm[start:start + size])
                    continue
                if typ in (b"g", b"5"):  # global PAX header, directory
                    pax = {}
                    continue
                if typ not in (b"0", b"\0"):
                    raise ValueError(f"{tar}: tar member type {typ!r} at byte {start - 512} (not written by GR3D)")
                name = pax.get("path") or _ustar_name(h)
                pax = {}
                base = name.rpartition("/")[2]
                dot = base.find(".")
                if dot >= 0:
                    ext = member_ext(name)
                    yield name[: len(name) - len(base) + dot], ext, mm[start:start + size] if _wanted(ext) else None


def _ustar_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0].decode("utf-8")
    prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8") if h[257:262] == b"ustar" else ""
    return f"{prefix}/{name}" if prefix else name


def _pax_records(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        sp = data.index(b" ", i)
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        i += n
    return out


def _npy_header(fh: io.BufferedIOBase) -> tuple[tuple[int, ...], np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(fh)  # fh: a BytesIO of the member
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read(fh)  # header only, never the data
    return tuple(shape), dtype


def member_ext(name: str) -> str:
    """The extension webdataset groups a tar member under: what follows the first dot of its base name, lower case."""
    base = name.rpartition("/")[2]
    dot = base.find(".")
    return base[dot + 1:].lower() if dot >= 0 else ""


def load_record(data: bytes) -> Any:
    """`json.loads` of a record as the writer wrote it; orjson when it reads the text the same way (faster).

    orjson refuses what it would read differently (integers past 64 bits, lone surrogates), so those go to
    `json.loads`; the writer never writes NaN or Infinity, which both would read differently."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class ShardFeatures:
    """One shard's share of the build's features: its records' Arrow type, its `.npy` headers (member, ndim,
    trailing dimensions, dtype) and its image kinds.

    The shard writer fills one from the very member bytes it puts in the tar (`add_member`) and stores it in
    the shard's stats file (`to_json`), so `finalize` merges small summaries (`merge_features`) instead of
    reading every record of the build again in the driver; a shard whose stats carry none (written by an
    older version) is read from its tar (`of_tar`), with the same result by construction.
    """

    __slots__ = ("_records", "record_type", "npy", "images")

    def __init__(self) -> None:
        self._records: list[Any] = []
        self.record_type: pa.DataType | None = None
        self.npy: dict[str, set[tuple[int, tuple[int, ...], str]]] = {}
        self.images: set[str] = set()

    def add_member(self, ext: str, data: bytes | None) -> None:
        """One tar member (`member_ext` of its name; data needed for records and arrays only)."""
        if ext == "json":
            self.add_record(load_record(data))  # type: ignore[arg-type]
        elif _wanted(ext):
            shape, dtype = _npy_header(io.BytesIO(data))  # type: ignore[arg-type]
            self.npy.setdefault(ext, set()).add((len(shape), tuple(shape[1:]), np.dtype(dtype).name))
        elif ext in _IMAGE_EXTS:
            self.images.add(ext)

    def add_record(self, record: Any) -> None:
        """A record as `load_record` read it, in tar order (Arrow orders struct fields by first appearance)."""
        self._records.append(record)

    def finish(self) -> ShardFeatures:
        """Type the records added so far (one Arrow type holding them all); raises if Arrow cannot."""
        if self._records:
            t = pa.array(self._records).type
            self.record_type = t if self.record_type is None else _unify([self.record_type, t])
            self._records = []
        return self

    @classmethod
    def of_tar(cls, tar: str | os.PathLike[str]) -> ShardFeatures:
        """Read a shard's records and npy headers (not its pixels)."""
        f = cls()
        for _, ext, data in _tar_members(Path(tar)):
            f.add_member(ext, data)
        return f.finish()

    def to_json(self) -> dict[str, Any]:
        """The stats-file form (plain JSON; struct fields keep their order as lists)."""
        self.finish()
        return {
            "json": None if self.record_type is None else _feature_to_json(_from_arrow(self.record_type)),
            "npy": {k: [[n, list(t), d] for n, t, d in sorted(v)] for k, v in sorted(self.npy.items())},
            "images": sorted(self.images),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardFeatures:
        """Inverse of `to_json` (raises ValueError on a form it did not write)."""
        f = cls()
        try:
            if d["json"] is not None:
                f.record_type = _to_arrow(_feature_from_json(d["json"]))
            f.npy = {k: {(int(n), tuple(int(x) for x in t), str(dt)) for n, t, dt in v} for k, v in d["npy"].items()}
            f.images = {str(x) for x in d["images"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a shard features entry: {exc!r}") from exc
        return f


def _feature_to_json(f: Feature) -> Any:
    kind = f[0]
    if kind == "value":
        return ["value", f[1]]
    if kind == "list":
        return ["list", _feature_to_json(f[1])]
    if kind == "struct":
        return ["struct", [[k, _feature_to_json(v)] for k, v in f[1].items()]]
    raise TypeError(f"a record has no {kind} feature")


def _feature_from_json(j: Any) -> Feature:
    kind = j[0]
    if kind == "value" and j[1] in _DTYPE_ARROW:
        return ("value", j[1])
    if kind == "list":
        return ("list", _feature_from_json(j[1]))
    if kind == "struct":
        return ("struct", {str(k): _feature_from_json(v) for k, v in j[1]})
    raise ValueError(f"unknown feature {j!r}")


def _to_arrow(f: Feature) -> pa.DataType:
    """Inverse of `_from_arrow` on the types Arrow infers from JSON values."""
    if f[0] == "value":
        return _DTYPE_ARROW[f[1]]
    if f[0] == "list":
        return pa.list_(_to_arrow(f[1]))
    return pa.struct([pa.field(k, _to_arrow(v)) for k, v in f[1].items()])


def _unify(types: list[pa.DataType]) -> pa.DataType:
    schemas = [pa.schema([pa.field("json", t)]) for t in types]
    return pa.unify_schemas(schemas, promote_options="permissive").field("json").type


def build_features(tars: Iterable[str | os.PathLike[str]]) -> dict[str, Feature]:
    """The features of the samples in `tars` (see the module docstring), reading records and npy headers only."""
    return merge_features(ShardFeatures.of_tar(t) for t in tars)


def merge_features(shards: Iterable[ShardFeatures]) -> dict[str, Feature]:
    """The build's features from its shards' (see the module docstring)."""
    record_types: list[pa.DataType] = []
    npy: dict[str, set[tuple[int, tuple[int, ...], str]]] = {}
    images: set[str] = set()
    for sf in shards:
        if sf.record_type is not None:
            record_types.append(sf.record_type)
        for k, v in sf.npy.items():
            npy.setdefault(k, set()).update(v)
        images |= sf.images
    feats: dict[str, Feature] = {}
    if record_types:
        feats["json"] = _from_arrow(_unify(record_types))
    for ext in sorted(images):
        feats[ext] = ("image",)
    for name, headers in sorted(npy.items()):
        dtypes = {d for _, _, d in headers}
        if len(dtypes) != 1:
            raise ValueError(f"member {name!r} has several dtypes across the build: {sorted(dtypes)}")
        dtype = dtypes.pop()
        ndims = {n for n, _, _ in headers}
        trailing = {t for _, t, _ in headers}
        if ndims == {1}:
            feats[name] = ("list", ("value", dtype))
        elif len(ndims) == 1 and len(trailing) == 1 and 2 <= next(iter(ndims)) <= 5:
            nd = next(iter(ndims))
            feats[name] = ("array", nd, (None, *next(iter(trailing))), dtype)
        else:  # ragged trailing dims (e.g. depth maps of different image sizes): nested lists
            f: Feature = ("value", dtype)
            for _ in range(max(ndims)):
                f = ("list", f)
            feats[name] = f
    for k in _META:
        feats[k] = ("value", "string")
    return feats


def features_to_dict(feats: dict[str, Feature]) -> dict[str, Any]:
    """`datasets.Features.to_dict()` form (what `Features.from_dict` reads)."""
    def one(f: Feature) -> Any:
        kind = f[0]
        if kind == "value":
            return {"dtype": f[1], "_type": "Value"}
        if kind == "image":
            return {"_type": "Image"}
        if kind == "array":
            return {"shape": list(f[2]), "dtype": f[3], "_type": f"Array{f[1]}D"}
        if kind == "list":
            return {"feature": one(f[1]), "_type": "List"}
        return {k: one(v) for k, v in f[1].items()}

    return {k: one(v) for k, v in feats.items()}


def features_to_yaml(feats: dict[str, Feature]) -> list[dict[str, Any]]:
    """The dataset card's `dataset_info.features` list (datasets' YAML form of the same features)."""
    def body(f: Feature) -> dict[str, Any]:
        kind = f[0]
        if kind == "value":
            return {"dtype": f[1]}
        if kind == "image":
            return {"dtype": "image"}
        if kind == "array":
            return {"dtype": {f"array{f[1]}_d": {"shape": list(f[2]), "dtype": f[3]}}}
        if kind == "list":
            return {"list": inner(f[1])}
        return {"struct": [{"name": k, **body(v)} for k, v in f[1].items()]}

    def inner(f: Feature) -> Any:  # what follows `list:`: a bare dtype, a field list, or a nested form
        kind = f[0]
        if kind == "value":
            return f[1]
        if kind == "struct":
            return [{"name": k, **body(v)} for k, v in f[1].items()]
        return body(f)

    return [{"name": k, **body(v)} for k, v in feats.items()]


def card_text(feats: dict[str, Feature], corpus: str, n_samples: int) -> str:
    """A dataset card: YAML (data files + features) and how to load the build."""
    import yaml

    head = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "shards/*.tar"}]}],
        "dataset_info": {"features": features_to_yaml(feats)},
    }
    return (
        "---\n" + yaml.safe_dump(head, sort_keys=False) + "---\n\n"
        f"# GR3D build: {corpus}\n\n"
        f"{n_samples} samples in WebDataset shards (`shards/NNNNNN.tar`: `KEY.json` record, image, `KEY.NAME.npy` "
        "arrays), written by the GR3D corpus engine.\n\n"
        "Load with Hugging Face `datasets` (column types from this card, computed over every sample):\n\n"
        "```python\nfrom datasets import load_dataset\nds = load_dataset(\"path/to/this/build\", split=\"train\")\n```\n\n"
        f"or with explicit files: `load_dataset(\"webdataset\", data_files=\"shards/*.tar\", split=\"train\", "
        f"features=Features.from_dict(json.load(open(\"{FEATURES_FILE}\"))))`.\n"
    )


def write_hf_files(build_dir: str | os.PathLike[str], shards: Iterable[ShardFeatures], corpus: str,
                   n_samples: int) -> dict[str, Feature]:
    """Write FEATURES_FILE and CARD_FILE into `build_dir` (atomically) from the shards' features; return them."""
    from shards.writer import atomic_write

    build = Path(build_dir)
    feats = merge_features(shards)
    data = (json.dumps(features_to_dict(feats), indent=1, sort_keys=False) + "\n").encode()
    atomic_write(build / FEATURES_FILE, lambda f: f.write(data))
    card = card_text(feats, corpus, n_samples).encode()
    atomic_write(build / CARD_FILE, lambda f: f.write(card))
    return feats
