"""Bad inputs end as specific rejects, cost nothing else, and write nothing outside the output directory.

The corpus (`tests/badinputs.py`) mixes some 20 kinds of damage into a copy of the sample world: truncated
JPEG/PNG, depth of the wrong bit depth, all-zero or truncated depth, zero and NaN focal lengths, negative
image and box sizes, non-orthonormal rotations, missing files, duplicate ids, a scan named `../../x`, dotted
frame names, a non-UTF-8 file, 50 MB text fields, pickles holding non-numpy objects or a code payload, and
paths that leave the data root for a perfectly readable image. The det3d, point-map and CoT builders run
over it (local executor; the point maps also on Ray, which must write the same bytes), and for every build:
- each bad input has its expected reject reason for its key (or is written, when its name is only odd);
  whole-file damage is one `bad_source_file` row whose message names the file, and the other files are read;
- every input is accounted for exactly once (written + rejected keys == input keys), every other input is
  written (so no good item was lost because of a bad neighbour), and `gr3d shards verify` passes;
- nothing outside the build directory was created or modified (the sandbox tree is compared before and
  after; the data root stays byte for byte as it was), and the pickle's payload never ran.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipelines.engine.options import BuildOptions
from pipelines.engine.plan import decoded
from pipelines.engine.run import BuildResult, run_build
from shards.keys import validate_key
from shards.reader import iter_samples
from tests.badinputs import BUILDERS, BadCorpus, make_bad_corpus
from tests.test_executors_toy import compared_files

CHUNK = 8  # several shards per build, with bad items in most of them

Snapshot = dict[str, tuple[int, int, int]]


@pytest.fixture(scope="module")
def corpus(sample_world: Any, tmp_path_factory: pytest.TempPathFactory) -> BadCorpus:
    return make_bad_corpus(sample_world.root, tmp_path_factory.mktemp("badinputs"))


def snapshot(top: Path) -> Snapshot:
    """Every file and directory under `top`: (size, mtime_ns, inode), links not followed."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, top)] = (st.st_size if not os.path.isdir(p) else 0, st.st_mtime_ns, st.st_ino)
    return out


def build_in_sandbox(corpus: BadCorpus, builder: Any, out: Path, executor: str = "local", **kw: Any) -> BuildResult:
    """Build `builder` into `out` and check the build created or changed nothing outside `out`.

    The sandbox is the corpus's parent (data root, the escape target, the sentinel's directory); one level
    up is pytest's base temp, whose entries must not change either (a `../../x` escaping the sandbox).
    """
    sandbox = corpus.root.parent
    base = sandbox.parent
    before, base_before = snapshot(sandbox), sorted(os.listdir(base))
    res = run_build(builder, out, BuildOptions.on(executor, chunk_size=CHUNK, show_progress=False, **kw))
    after = snapshot(sandbox)
    inside = out.relative_to(sandbox).as_posix()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p)
                     and p != inside and not p.startswith(inside + "/")
                     and not inside.startswith(p + "/"))  # the out dir's parents get new entries (mtime)
    assert changed == [], f"files created or changed outside {out}: {changed[:10]}"
    assert sorted(os.listdir(base)) == base_before
    assert not corpus.sentinel.exists(), "the pickle's payload ran"
    return res


def outcome(out: Path) -> tuple[set[str], dict[str, list[dict[str, Any]]]]:
    """(written keys, reject rows by key) of a finished build."""
    written = {r["key"] for r in pq.read_table(out / "index.parquet").to_pylist()}
    rejects: dict[str, list[dict[str, Any]]] = {}
    for r in pq.read_table(out / "rejects.parquet").to_pylist():
        rejects.setdefault(r["key"], []).append(r)
    return written, rejects


def clean_keys(builder: Any) -> set[str]:
    """The keys a builder lists for the clean world (none of them is a reader reject there)."""
    items = list(decoded(builder.list_inputs(builder.config)))  # builders yield their listing
    assert not [it for it in items if "read_reject" in it]
    return {it["key"] for it in items}


def check_build(corpus: BadCorpus, builder: str, res: BuildResult,
                clean: set[str] | None = None) -> tuple[set[str], dict[str, list[dict]]]:
    """Every expectation of `builder`, the accounting, no loss of good inputs, and `gr3d shards verify`.

    `clean`: the keys of the clean world's items, which must all be written (None where the builder's keys
    are positional and the caller compares otherwise).
    """
    from pipelines.cli import main as gr3d

    out = res.build_dir
    written, rejects = outcome(out)
    inputs = {k for c in res.plan.chunks for k in c.keys}
    # accounting: every input once, as a sample or as rejected, never both
    assert written | set(rejects) == inputs and not written & set(rejects)
    t = res.manifest["totals"]
    assert (t["n_input"], t["n_samples"], t["n_rejected"]) == (len(inputs), len(written), len(rejects))
    assert all(r["message"].strip() for rows in rejects.values() for r in rows)

    bad_keys: set[str] = set()
    for e in corpus.expected(builder):
        if e.key is None:  # whole-file damage: one row naming the file, whatever key it got
            rows = [(k, r) for k, rs in rejects.items() for r in rs if e.file in r["message"]]
            assert [r["reason"] for _, r in rows] == [e.reason], (e, rows)
            bad_keys.add(rows[0][0])
        elif e.reason is None:
            assert e.key in written, (e, rejects.get(e.key))
            bad_keys.add(e.key)
        else:
            got = [r["reason"] for r in rejects.get(e.key, [])]
            assert got == [e.reason], (e, got, "written" if e.key in written else "not written")
            bad_keys.add(e.key)
    # nothing else is lost: every input that is not a bad one (the world's own items) is written
    lost = {k: [r["reason"] for r in rejects[k]] for k in inputs - bad_keys - written}
    assert lost == {}
    if clean is not None:  # ... and the world's own items are all among them, none dropped before listing
        assert clean - bad_keys <= written, sorted(clean - bad_keys - written)
    assert gr3d(["shards", "verify", str(out)]) == 0
    return written, rejects


def records(out: Path) -> Iterator[dict[str, Any]]:
    for s in iter_samples(out):
        yield s["json"]


def test_corpus_covers_the_kinds_of_damage(corpus: BadCorpus) -> None:
    kinds = set(corpus.kinds())
    required = {"truncated_jpeg", "png_wrong_bit_depth", "all_zero_depth", "zero_focal_length", "nan_focal_length",
                "negative_image_size", "non_orthonormal_rotation", "missing_image", "duplicate_image_id",
                "path_like_key", "dotted_key", "non_utf8_text", "text_50mb", "pickle_non_numpy_object",
                "image_path_escapes_root"}
    assert required <= kinds and len(kinds) >= 20
    where = {b.where for b in corpus.bad}
    assert {"omni3d", "omni3d file", "embodiedscan", "embodiedscan file", "refspatial", "refspatial file"} <= where
    assert {e.builder for b in corpus.bad for e in b.expects} == set(BUILDERS)
    # the escaping paths point at a readable image: only the root check can refuse them
    assert (corpus.outside / "escape.png").read_bytes()[:4] == b"\x89PNG"


def test_det3d_rejects_each_bad_input_and_keeps_the_rest(corpus: BadCorpus, sample_world: Any) -> None:
    from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder

    out = corpus.root.parent / "out" / "det3d"
    res = build_in_sandbox(corpus, make_builder(Det3dBuildConfig(corpus.omni3d, corpus.embodiedscan, corpus.root)), out)
    clean = clean_keys(make_builder(Det3dBuildConfig(sample_world.omni3d_files, sample_world.embodiedscan_files,
                                                  sample_world.root)))
    assert len(clean) == 12  # the world's 6 Omni3D images and 6 EmbodiedScan frames
    check_build(corpus, "det3d", res, clean)
    recs = {r["key"]: r for r in records(out)}
    twin = recs["omni3d/SampleWorld/9001"]  # a good copy of the image (as JPEG) with the same annotations
    for e in corpus.expected("det3d"):
        if e.dropped is None:
            continue
        rec = recs[e.key]  # one annotation dropped and counted, the image's others kept
        if e.key.startswith("omni3d/"):
            extra = Counter(rec["source"]["dropped"]) - Counter(twin["source"]["dropped"])
            assert extra == {e.dropped: 1} and len(rec["objects"]) == len(twin["objects"]) - 1
        else:
            assert rec["source"]["dropped"].get(e.dropped) == 1 and rec["objects"], rec["source"]
    assert max(len(o["category"]) for r in recs.values() for o in r["objects"]) <= 200


def test_pointmaps_reject_each_bad_frame_on_local_and_ray_alike(corpus: BadCorpus, sample_world: Any,
                                                               ray_session: Any) -> None:
    from pipelines.corpora.pointmaps.builder import PointmapConfig, make_builder

    def builder() -> Any:
        return make_builder(PointmapConfig("embodiedscan", data_root=corpus.root, embodiedscan=corpus.embodiedscan))

    clean = clean_keys(make_builder(PointmapConfig("embodiedscan", data_root=sample_world.root,
                                                   embodiedscan=sample_world.embodiedscan_files)))
    assert len(clean) == 6
    outs = {}
    for executor, kw in (("local", {}), ("ray", {"workers": 2})):
        out = corpus.root.parent / "out" / f"pointmaps-{executor}"
        res = build_in_sandbox(corpus, builder(), out, executor, **kw)
        written, rejects = check_build(corpus, "pointmaps", res, clean)
        outs[executor] = compared_files(out)
    assert outs["ray"] == outs["local"]
    # the scan called `../../x` became a sanitized key inside the shards, and nothing named x appeared
    odd = [k for k in written if k.startswith("embodiedscan/__/__/x/")]
    assert len(odd) == 1 and validate_key(odd[0]) and ".." not in odd[0]
    assert Counter(r["stage"] for rows in rejects.values() for r in rows)["read"] >= 6


def test_cot_rejects_each_bad_record_and_keeps_the_rest(corpus: BadCorpus, sample_world: Any) -> None:
    from pipelines.corpora.cot.builder import CotConfig, make_cot_builder

    out = corpus.root.parent / "out" / "cot"
    res = build_in_sandbox(corpus, make_cot_builder(CotConfig(corpus.refspatial, corpus.root, out=out, tagger="oracle",
                                                    verifier="none")), out)
    check_build(corpus, "cot", res)
    # cot keys are record positions, which the inserted bad records shift: compare the records themselves
    clean = make_cot_builder(CotConfig([f.json_path for f in sample_world.refspatial_files], sample_world.root, cache=None,
                             tagger="oracle", verifier="none"))
    want = Counter((it["source"]["file"], it["id"], len(it["conversations"])) for it in clean.list_inputs(clean.config))
    got = Counter((r["source"]["file"], r["source"]["id"], len(r["conversations"][0]["turns"])) for r in records(out))
    assert got == want and sum(want.values()) == 11


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_det3d_listing_in_worker_processes_is_the_serial_listing(corpus: BadCorpus, monkeypatch: Any,
                                                                 method: str) -> None:
    """Each source file listed in its own worker process (`iter_encoded_inputs`): the plan's (key, blob)
    pairs are the serial listing's, byte for byte, bad files, duplicate keys and `dup-N` rejects included."""
    import multiprocessing

    from pipelines.corpora.det3d import builder as det3d
    from pipelines.engine.plan import EncodedItem, encode_inputs

    used = []
    real = multiprocessing.get_context
    monkeypatch.setattr(multiprocessing, "get_context", lambda m=None: used.append(m) or real(m))
    monkeypatch.setattr(det3d, "_FORK_OK", method == "fork")

    b = det3d.make_builder(det3d.Det3dBuildConfig(corpus.omni3d, corpus.embodiedscan, corpus.root))
    assert len(det3d._sources(b.config)) >= 4
    serial = encode_inputs(det3d.iter_inputs(b.config)).pairs
    monkeypatch.setattr(det3d, "PARALLEL_LISTING_MIN_BYTES", 0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})  # two workers, whatever this box has
    listed = list(b.list_inputs(b.config))
    assert any(type(it) is EncodedItem for it in listed)  # the workers' items came encoded
    import threading  # a fork only where this process runs no other thread (earlier tests may leave some)

    assert used == ["fork" if method == "fork" and threading.active_count() == 1 else "spawn"]
    assert encode_inputs(listed).pairs == serial
    assert any("read_reject" in it and it["read_reject"]["reason"] == "bad_source_file"
               for it in listed if isinstance(it, dict))
