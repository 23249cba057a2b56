"""A corpus of bad inputs: a copy of a clean sample world with corrupt items mixed among the good ones.

The builders promise that every input ends as a sample or as a reject row with a specific reason, that one
bad item never costs another, and that nothing is written outside the output directory. A test of that
promise needs inputs that are bad in the ways real downloads are bad, in every on-disk format the builders
read, and it needs to know, for each, what should happen. `make_bad_corpus` writes such a corpus and
returns that expectation; `tests/test_bad_inputs.py` runs the builders over it.

Every bad item is *added* next to the world's own entries (new Omni3D images, new EmbodiedScan scans and
frames, new RefSpatial records, extra annotation files), so the world's clean items stay clean: any of
them that goes missing was lost because of a neighbour. Image and depth corruptions live in new files, so
one broken file never changes what a good item reads. Paths that must not be followed point at a valid
image that lies outside the data root (`BadCorpus.outside`): a reader that followed them would find a
perfectly readable file, so only its root check can refuse them. The unsafe pickle would create
`BadCorpus.sentinel` if it were ever executed.

Expected outcomes (`Expect`): a reject reason for the item's key, or `None` meaning "written under this
key" (names that are only odd, such as a dotted frame name or a scan called `../../x`, are sanitized by
`shards.keys.make_key`, not refused). Whole-file damage (non-UTF-8 JSON, a pickle that names a non-numpy
global) is expected as one `bad_source_file` row whose message names the file; `Expect.file` holds it.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from shards.keys import make_key

__all__ = ["BUILDERS", "BadCorpus", "BadInput", "Expect", "make_bad_corpus"]

BUILDERS = ("det3d", "pointmaps", "cot")
OMNI3D_DATASET = "SampleWorld"  # from the world's `Omni3D/SampleWorld_{train,val}.json`
BAD_SCAN = "bad/scene_bad"  # EmbodiedScan sample_idx of the scan holding the bad frames
BIG_TEXT_CHARS = 50 * 1024 * 1024


@dataclass(frozen=True)
class Expect:
    """What one builder must do with one bad input.

    `reason` None: the item is written under `key` (and, with `dropped`, its record counts one object dropped
    for that reason). Otherwise a reject row with this reason for `key`, or, when `key` is None, a row with
    this reason whose message names `file` (whole-file damage).
    """

    builder: str
    key: str | None
    reason: str | None
    file: str | None = None
    dropped: str | None = None  # written, with one object dropped for this reason (record `source.dropped`)


@dataclass(frozen=True)
class BadInput:
    """One injected fault: its kind, where it was put, and what each builder that reads it must do."""

    kind: str
    where: str
    expects: tuple[Expect, ...]


@dataclass
class BadCorpus:
    """The damaged copy: data root, the annotation files per format, the faults, and the traps."""

    root: Path
    omni3d: list[Path]
    embodiedscan: list[Path]
    refspatial: list[Path]
    outside: Path  # a directory beside the data root: escaping paths point here
    sentinel: Path  # created only if the unsafe pickle's payload ever ran
    bad: list[BadInput] = field(default_factory=list)

    def expected(self, builder: str) -> list[Expect]:
        """Every expectation of one builder."""
        return [e for b in self.bad for e in b.expects if e.builder == builder]

    def kinds(self) -> list[str]:
        return sorted({b.kind for b in self.bad})


class _Exploit:
    """Pickles as a call to builtins.open(sentinel, "w"): a loader that runs pickled code creates the file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# ---------------------------------------------------------------------------------------------- files


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(png: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(png) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _under(base: str, rel: str) -> str:
    """`rel` (relative to the data root) relative to `base` (also relative to the data root)."""
    return PurePosixPath(rel).relative_to(base).as_posix()


class _Files:
    """Writes good and damaged copies of one world image and its depth at data-root-relative paths."""

    def __init__(self, root: Path, image: Path, depth: Path):
        self.root = root
        self.image = image  # a good colour PNG of the world
        self.depth = depth  # its depth PNG (uint16 mm)

    def put(self, rel: str, data: bytes) -> str:
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_bytes(data)
        return rel

    def good_png(self, rel: str) -> str:
        return self.put(rel, self.image.read_bytes())

    def good_depth(self, rel: str) -> str:
        return self.put(rel, self.depth.read_bytes())

    def good_jpeg(self, rel: str) -> str:
        return self.put(rel, _jpeg_bytes(self.image))

    def truncated_jpeg(self, rel: str) -> str:
        data = _jpeg_bytes(self.image)
        return self.put(rel, data[: len(data) * 3 // 5])  # header intact, entropy-coded data cut

    def truncated_png(self, rel: str) -> str:
        data = self.image.read_bytes()
        return self.put(rel, data[: len(data) // 2])

    def depth_8bit(self, rel: str) -> str:
        with Image.open(self.depth) as im:
            mm = np.asarray(im).astype(np.int64)
        return self.put(rel, _png_bytes(np.clip(mm // 40, 0, 255).astype(np.uint8)))  # plausible, wrong depth

    def depth_zero(self, rel: str) -> str:
        with Image.open(self.depth) as im:
            shape = np.asarray(im).shape
        return self.put(rel, _png_bytes(np.zeros(shape, dtype=np.uint16)))

    def truncated_depth(self, rel: str) -> str:
        data = self.depth.read_bytes()
        return self.put(rel, data[: len(data) // 2])


# ---------------------------------------------------------------------------------------------- formats


def _omni3d(root: Path, files: _Files, outside_rel: str, bad: list[BadInput]) -> list[Path]:
    """New images in the train file (ids 9001..), each with the annotations of the file's first image."""
    path = root / "Omni3D" / f"{OMNI3D_DATASET}_train.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    src = data["images"][0]
    src_anns = [a for a in data["annotations"] if a["image_id"] == src["id"]]
    next_ann = max(a["id"] for a in data["annotations"]) + 1000
    new_images: list[dict[str, Any]] = []
    new_anns: list[dict[str, Any]] = []

    def image(iid: int, kind: str, reason: str | None, *, file_path: str | None = None, dropped: str | None = None,
              keys: tuple[str, ...] = (), ann_edit: Any = None, **img_edit: Any) -> None:
        nonlocal next_ann
        img = {**copy.deepcopy(src), "id": iid, **img_edit}
        if file_path is not None:
            img["file_path"] = file_path
        new_images.append(img)
        for k, a in enumerate(src_anns):
            a = {**copy.deepcopy(a), "id": next_ann, "image_id": iid}
            next_ann += 1
            if ann_edit is not None and k == 0:
                ann_edit(a)
            new_anns.append(a)
        keys = keys or (make_key("omni3d", OMNI3D_DATASET, str(iid)),)
        bad.append(BadInput(kind, "omni3d", tuple(Expect("det3d", k, reason, dropped=dropped) for k in keys)))

    d = "sample_world/bad/omni3d"
    image(9001, "good_jpeg", None, file_path=files.good_jpeg(f"{d}/good.jpg"))
    image(9002, "truncated_jpeg", "unreadable_image", file_path=files.truncated_jpeg(f"{d}/truncated.jpg"))
    image(9003, "truncated_png", "unreadable_image", file_path=files.truncated_png(f"{d}/truncated.png"))
    image(9004, "zero_focal_length", "bad_intrinsics", K=[[0.0, 0.0, 160.0], [0.0, 300.0, 120.0], [0.0, 0.0, 1.0]])
    image(9005, "nan_focal_length", "bad_intrinsics",
          K=[[300.0, 0.0, 160.0], [0.0, float("nan"), 120.0], [0.0, 0.0, 1.0]])  # json writes NaN
    image(9006, "negative_image_size", "bad_image_size", width=-320)
    # one bad box: that annotation is dropped and counted (Omni3D's is_ignore ignores the object), the image kept
    image(9007, "negative_box_dimensions", None, dropped="nonpositive_dimensions",
          ann_edit=lambda a: a.__setitem__("dimensions", [-a["dimensions"][0], *a["dimensions"][1:]]))
    image(9008, "non_orthonormal_rotation", None, dropped="degenerate_box",
          ann_edit=lambda a: a.__setitem__("R_cam", (np.asarray(a["R_cam"]) * 1.5).tolist()))
    image(9009, "missing_image", "missing_image", file_path=f"{d}/no_such_file.png")
    image(9010, "image_path_escapes_root", "path_escapes_root", file_path=outside_rel)
    # a 50 MB category name: that annotation is malformed (dropped and counted), the image's others are kept
    image(9012, "text_50mb", None, dropped="malformed_category_name",
          ann_edit=lambda a: a.__setitem__("category_name", "chair " + "x" * BIG_TEXT_CHARS))
    image(9011, "image_path_absolute", "path_escapes_root", file_path=str(root.parent / "outside" / "escape.png"))
    # the id of the file's first image again: annotations name images by id, so neither image's boxes can be
    # told apart and both are rejected (det3d gives the second reject row a `dup-1` key suffix)
    first = make_key("omni3d", OMNI3D_DATASET, str(src["id"]))
    image(src["id"], "duplicate_image_id", "duplicate_image_id", keys=(first, make_key(*first.split("/"), "dup-1")))
    # mixed in: the bad images go between the good ones, not after them
    data["images"][1:1] = new_images
    data["annotations"][1:1] = new_anns
    path.write_text(json.dumps(data), encoding="utf-8")

    # a whole file that is not UTF-8 (a Latin-1 category name): one bad_source_file row, the rest goes on
    latin1 = root / "Omni3D" / "Latin1_train.json"
    one = {"info": data["info"], "categories": data["categories"], "images": [{**src, "id": 9100}],
           "annotations": [{**copy.deepcopy(src_anns[0]), "id": 99100, "image_id": 9100,
                            "category_name": "CATEGORY"}]}
    latin1.write_bytes(json.dumps(one).encode("utf-8").replace(b'"CATEGORY"', b'"caf\xe9"'))
    bad.append(BadInput("non_utf8_text", "omni3d file", (
        Expect("det3d", None, "bad_source_file", file=latin1.name),)))
    return [path, root / "Omni3D" / f"{OMNI3D_DATASET}_val.json", latin1]


def _embodiedscan(root: Path, files: _Files, outside_rel: str, sentinel: Path, bad: list[BadInput]) -> list[Path]:
    """A new scan of bad frames (scene 0's geometry), a scan called `../../x`, a scan with a negative box,
    and two unusable pkl files (a non-numpy object; a payload that would run code)."""
    path = root / "embodiedscan" / "embodiedscan_infos_train.pkl"
    info = pickle.loads(path.read_bytes())
    scan0 = info["data_list"][0]
    frame0 = scan0["images"][0]
    d = "sample_world/bad/es"
    both = ("det3d", "pointmaps")

    def frame(stem: str, *, img: str | None = None, depth: str | None = None, **edit: Any) -> dict[str, Any]:
        f = copy.deepcopy(frame0)
        f["img_path"] = img or files.good_png(f"{d}/image/{stem}.png")
        f["depth_path"] = depth or files.good_depth(f"{d}/depth/{stem}.png")
        f.update(edit)
        return f

    def key(sidx: str, stem: str) -> str:
        return make_key("embodiedscan", *[p for p in sidx.split("/") if p], stem)

    frames: list[dict[str, Any]] = []

    def add(kind: str, f: dict[str, Any], outcome: dict[str, str | None], stem: str | None = None) -> None:
        frames.append(f)
        k = key(BAD_SCAN, stem or Path(f["img_path"]).stem)
        bad.append(BadInput(kind, "embodiedscan", tuple(Expect(b, k, outcome[b]) for b in both)))

    add("good_jpeg", frame("f01", img=files.good_jpeg(f"{d}/image/f01.jpg")), {"det3d": None, "pointmaps": None})
    add("truncated_jpeg", frame("f02", img=files.truncated_jpeg(f"{d}/image/f02.jpg")),
        {"det3d": "unreadable_image", "pointmaps": "unreadable_image"})
    add("png_wrong_bit_depth", frame("f03", depth=files.depth_8bit(f"{d}/depth/f03.png")),
        {"det3d": None, "pointmaps": "bad_depth_format"})
    add("all_zero_depth", frame("f04", depth=files.depth_zero(f"{d}/depth/f04.png")),
        {"det3d": None, "pointmaps": "too_few_valid_pixels"})
    add("truncated_depth", frame("f05", depth=files.truncated_depth(f"{d}/depth/f05.png")),
        {"det3d": None, "pointmaps": "bad_depth"})
    add("missing_depth", frame("f06", depth=f"{d}/depth/no_such_depth.png"),
        {"det3d": None, "pointmaps": "missing_depth"})  # det3d needs no depth
    add("missing_image", frame("f07", img=f"{d}/image/f07_missing.png"),
        {"det3d": "missing_image", "pointmaps": "missing_image"})
    nan_k = np.asarray(scan0["cam2img"], dtype=np.float64).copy()
    nan_k[0, 0] = np.nan
    add("nan_focal_length", frame("f08", cam2img=nan_k), {"det3d": "bad_intrinsics", "pointmaps": "bad_intrinsics"})
    skew = np.asarray(frame0["cam2global"], dtype=np.float64).copy()
    skew[:3, :3] = skew[:3, :3] @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    add("non_orthonormal_rotation", frame("f09", cam2global=skew), {"det3d": "bad_pose", "pointmaps": "bad_pose"})
    add("image_path_escapes_root", frame("f10", img=outside_rel),
        {"det3d": "path_escapes_root", "pointmaps": "path_escapes_root"}, stem="escape")
    add("dotted_key", frame("f11.v2", img=files.good_png(f"{d}/image/f11.v2.png")), {"det3d": None, "pointmaps": None})
    # the same frame name twice in a scan: the first is read, the second is a duplicate (keys get a suffix)
    frames.append(frame("f01", img=f"{d}/image/f01.jpg"))
    k = key(BAD_SCAN, "f01")
    bad.append(BadInput("duplicate_id", "embodiedscan", (
        Expect("det3d", make_key(*k.split("/"), "dup-1"), "duplicate_key"),
        Expect("pointmaps", f"{k}-dup1", "duplicate_key"))))
    bad_scan = {**copy.deepcopy(scan0), "sample_idx": BAD_SCAN, "images": frames}

    # a scan whose name is a relative path: keys are sanitized, so nothing can land outside the output
    dotdot = {**copy.deepcopy(scan0), "sample_idx": "../../x", "images": [frame("g01")]}
    bad.append(BadInput("path_like_key", "embodiedscan", tuple(Expect(b, key("../../x", "g01"), None) for b in both)))
    # a visible instance with a negative size: det3d drops that box (counted) and keeps the frame's others;
    # point maps do not use boxes
    negbox = {**copy.deepcopy(scan0), "sample_idx": "bad/scene_negbox", "images": [frame("h01")]}
    inst = negbox["instances"][int(frame0["visible_instance_ids"][0])]
    inst["bbox_3d"] = list(inst["bbox_3d"])
    inst["bbox_3d"][3] = -abs(float(inst["bbox_3d"][3]))
    bad.append(BadInput("negative_box_dimensions", "embodiedscan", (
        Expect("det3d", key("bad/scene_negbox", "h01"), None, dropped="degenerate_box"),
        Expect("pointmaps", key("bad/scene_negbox", "h01"), None))))
    info["data_list"][1:1] = [bad_scan, dotdot, negbox]
    path.write_bytes(pickle.dumps(info, protocol=2))

    # whole files the restricted unpickler must refuse: a non-numpy object, and a payload that runs code
    pathobj = root / "embodiedscan" / "embodiedscan_infos_pathobj.pkl"
    one = copy.deepcopy(info)
    one["data_list"] = [{**copy.deepcopy(scan0), "sample_idx": "bad/pathobj",
                         "images": [{**frame0, "img_path": PurePosixPath(frame0["img_path"])}]}]
    pathobj.write_bytes(pickle.dumps(one, protocol=2))
    evil = root / "embodiedscan" / "embodiedscan_infos_evil.pkl"
    one["data_list"] = [{**copy.deepcopy(scan0), "sample_idx": "bad/evil", "images": [_Exploit(str(sentinel))]}]
    evil.write_bytes(pickle.dumps(one, protocol=2))
    for f, kind in ((pathobj, "pickle_non_numpy_object"), (evil, "pickle_code_payload")):
        bad.append(BadInput(kind, "embodiedscan file", tuple(Expect(b, None, "bad_source_file", file=f.name)
                                                             for b in both)))
    return [path, root / "embodiedscan" / "embodiedscan_infos_val.pkl", pathobj, evil]


def _refspatial(root: Path, files: _Files, image_root: str, bad: list[BadInput]) -> list[Path]:
    """Bad records between the good ones of reasoning_template_qa.json.

    Record image paths are relative to the file's image root (`image_root`, relative to the data root), so
    `../../outside/escape.png` leaves the data root as well.
    """
    path = root / "RefSpatial" / "3D" / "reasoning_template_qa.json"
    recs = json.loads(path.read_text(encoding="utf-8"))
    good = recs[0]

    def rec(image: Any = None, conversations: Any = None) -> dict[str, Any]:
        # the good record's id: the oracle annotators know its mentions, so a bad record that slipped
        # through the read checks would be grounded and written, not rejected for want of ground truth
        return {"id": good["id"], "image": image if image is not None else good["image"],
                "conversations": conversations if conversations is not None else good["conversations"]}

    huge = copy.deepcopy(good["conversations"])
    huge[0]["value"] = huge[0]["value"] + " " + "x" * BIG_TEXT_CHARS
    new = [
        ("truncated_jpeg", rec([_under(image_root, files.truncated_jpeg(f"{image_root}/bad/rs/truncated.jpg"))]),
         "unreadable_image"),
        ("truncated_png", rec([_under(image_root, files.truncated_png(f"{image_root}/bad/rs/truncated.png"))]),
         "unreadable_image"),
        ("missing_image", rec(["bad/rs/no_such_image.png"]), "missing_image"),
        ("image_path_escapes_root", rec(["../../outside/escape.png"]), "path_escapes_root"),
        ("text_50mb", rec(conversations=huge), "turn_too_long"),
        ("malformed_record", "not a record", "malformed_record"),
    ]
    # interleave: good, bad, good, bad, ...
    out: list[Any] = []
    positions: list[tuple[int, str, str]] = []
    pending = list(new)
    for r in recs:
        out.append(r)
        if pending:
            kind, b, reason = pending.pop(0)
            positions.append((len(out), kind, reason))
            out.append(b)
    for kind, b, reason in pending:
        positions.append((len(out), kind, reason))
        out.append(b)
    path.write_text(json.dumps(out), encoding="utf-8")
    for idx, kind, reason in positions:
        bad.append(BadInput(kind, "refspatial", (
            Expect("cot", make_key("refspatial", "3D", "reasoning_template_qa", f"{idx:08d}"), reason),)))
    # a whole file that is not UTF-8 (Latin-1 text in a question)
    latin1 = root / "RefSpatial" / "3D" / "latin1_qa.json"
    one = rec(conversations=copy.deepcopy(good["conversations"]))
    one["conversations"][0]["value"] += " LATIN1"
    latin1.write_bytes(json.dumps([one]).encode("utf-8").replace(b"LATIN1", b"caf\xe9"))
    bad.append(BadInput("non_utf8_text", "refspatial file", (Expect("cot", None, "bad_source_file", file=latin1.name),)))
    return [path, root / "RefSpatial" / "3D" / "choice_qa.json", latin1]


def make_bad_corpus(world_root: str | Path, dest: str | Path) -> BadCorpus:
    """Copy the sample world at `world_root` to `dest/data` and inject the faults; returns what to expect.

    `dest/outside/escape.png` is a valid image outside the data root that escaping paths point at;
    `dest/outside/pwned` must never exist (the unsafe pickle's payload would create it).
    """
    dest = Path(dest)
    root = dest / "data"
    shutil.copytree(world_root, root)
    manifest = json.loads((root / "sample_world.json").read_text(encoding="utf-8"))
    image = root / "sample_world" / "scene0000" / "image" / "000000.png"
    depth = root / "sample_world" / "scene0000" / "depth_half" / "000000.png"
    assert image.is_file() and depth.is_file()  # the world's layout (docs/sample_world.md)
    outside = dest / "outside"
    outside.mkdir()
    shutil.copy(image, outside / "escape.png")
    files = _Files(root, image, depth)
    bad: list[BadInput] = []
    omni = _omni3d(root, files, "../outside/escape.png", bad)
    es = _embodiedscan(root, files, "../outside/escape.png", outside / "pwned", bad)
    rs = _refspatial(root, files, manifest["files"]["refspatial"][0]["image_root"], bad)
    return BadCorpus(root, omni, es, rs, outside, outside / "pwned", bad)
