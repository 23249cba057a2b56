"""The grounded-CoT builder: oracle builds against the sample world's ground truth on local/Ray/Beam, the
OpenAI backend against a loopback chat-completions server (429/500/timeout/garbage), bad inputs, the CLI,
and the assignment/composition rules alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from annotators.testing import OpenAIStub, Step, default_responder
from pipelines.corpora.cot.assign import assign_boxes
from pipelines.corpora.cot.builder import CotConfig, make_cot_builder
from pipelines.corpora.cot.stages import ComposeStage
from pipelines.corpora.cot.text import POINT_SUFFIX_GR3D, compose_turn, find_point_lists
from pipelines.engine.options import BuildOptions
from pipelines.engine.run import run_build
from pipelines.engine.stage import StageSetupError
from schemas.grammar import REGION, check_regions, find_grounded, format_bbox2d
from schemas.records import validate
from shards.layout import stats_path
from shards.reader import iter_samples
from tests.test_executors_toy import compared_files

FILES = ["RefSpatial/3D/reasoning_template_qa.json", "RefSpatial/3D/choice_qa.json"]
SECRET = "sk-cot-test-7c1d-DO-NOT-LOG"
ENV = "GR3D_TEST_COT_KEY"


def records(build: Path) -> dict[str, dict[str, Any]]:
    return {s["json"]["key"]: s["json"] for s in iter_samples(build)}


def rejects(build: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in pq.read_table(build / "rejects.parquet").to_pylist()}


def gpt_texts(rec: dict[str, Any]) -> list[str]:
    return [t["value"] for t in rec["conversations"][0]["turns"] if t["from"] == "gpt"]


def check_grounded_like_truth(rec: dict[str, Any], gt_rows: list[dict[str, Any]], rewritten: bool = True) -> int:
    """Every output mention's box is its object's true box; every <region> follows </bbox>; counts match.

    Returns the number of mentions checked.
    """
    validate("cot", rec)
    rid = rec["source"]["id"]
    truth = [g for g in gt_rows if g["record_id"] == rid and g["turn"] % 2 == 1]
    by_text = {g["text"].lower(): g for g in truth}
    assert len(rec["mentions"]) == len(truth) > 0, rec["key"]  # every answer mention grounded, no extra
    boxes_in_text = []
    for text in gpt_texts(rec):
        check_regions(text)
        pos = text.find(REGION)
        while pos >= 0:
            assert text[:pos].endswith("</bbox>")
            pos = text.find(REGION, pos + 1)
        boxes_in_text += [g.box for g in find_grounded(text) if g.has_region]
    assert len(boxes_in_text) == len(rec["mentions"])
    for m, box_text in zip(rec["mentions"], boxes_in_text):
        g = by_text[m["text"].lower()]
        assert m["category"] == g["category"]
        assert m["bbox2d"] == pytest.approx(g["bbox_norm"], abs=1e-7)
        assert format_bbox2d(box_text) == format_bbox2d(g["bbox_norm"])
        if rewritten and m["rewritten"] is not None:
            assert m["rewritten"].lower() == f"the {g['colour']} {g['category']}"  # the oracle's rewrite
    return len(rec["mentions"])


def test_oracle_build_matches_ground_truth_and_is_identical_on_local_ray_beam(
        tmp_path: Path, sample_world, ray_session) -> None:
    gt = sample_world.ground_truth["refspatial_mentions"]
    outs = {}
    for ex, kw in {"local": {}, "ray": {"workers": 2}, "beam": {"workers": 1}}.items():
        out = tmp_path / ex
        b = make_cot_builder(CotConfig(FILES, sample_world.root, out=out, tagger="oracle", verifier="oracle"))
        res = run_build(b, out, BuildOptions.on(ex, chunk_size=4, show_progress=False, **kw))
        t = res.manifest["totals"]
        assert t["n_input"] == 11 and t["n_samples"] + t["n_rejected"] == 11
        outs[ex] = compared_files(out)
    assert outs["ray"] == outs["local"] and outs["beam"] == outs["local"]
    recs = records(tmp_path / "local")
    assert len(recs) == 11  # the oracle grounds every mention of every record
    n = sum(check_grounded_like_truth(r, gt) for r in recs.values())
    assert n == sum(1 for g in gt if g["turn"] % 2 == 1)
    rw = [m for r in recs.values() for m in r["mentions"] if m["rewritten"]]
    assert rw and all(m["text"].lower().split() == ["the", m["category"]] for m in rw)  # only generic ones
    # point answers are zero-size boxes without a region; the question asks for that format
    r0 = recs["refspatial/3D/reasoning_template_qa/00000000"]
    human, answer = r0["conversations"][0]["turns"][0]["value"], gpt_texts(r0)[0]
    assert human.startswith("<image>\nPoint to ") and human.endswith(POINT_SUFFIX_GR3D)
    pts = [g for g in find_grounded(answer) if not g.has_region]
    assert pts and all(g.box[0] == g.box[2] and g.box[1] == g.box[3] for g in pts) and "[(" not in answer
    # the audit's intermediate files: every candidate, verdict, assignment, rewrite
    inter = tmp_path / "local" / "intermediate"
    tag = pq.read_table(inter / "tag").to_pylist()
    assert {r["key"] for r in tag} == set(recs) and all(r["source"] == "oracle" for r in tag)
    ver = pq.read_table(inter / "verify").to_pylist()
    assert all(r["decision"] == "chosen" and r["raw_text"] and r["chosen_box_norm"] for r in ver)
    asg = pq.read_table(inter / "assign").to_pylist()
    assert {r["decision"] for r in asg} == {"grounded"} and {r["sample_decision"] for r in asg} == {"kept"}
    assert len(asg) == len(ver) == len(tag)  # one candidate per mention from the oracle


def test_redone_chunk_rebuilds_every_persisted_stage_from_its_intermediate(tmp_path: Path, sample_world) -> None:
    """A chunk redone after a crash takes tag, verify, assign and rewrite from their intermediate files
    (each stage's `from_rows`), and its shard is byte-identical; the sim annotators give rejected samples,
    dropped mentions and rewrites, so every branch of the row formats is read back."""
    out = tmp_path / "b"
    b = make_cot_builder(CotConfig(FILES, sample_world.root, out=out, tagger="sim", verifier="sim", noise_scale=0.7,
                                   sim_seed=3))
    res = run_build(b, out, BuildOptions.on("local", chunk_size=4, show_progress=False))
    assert res.manifest["totals"]["n_rejected"] > 0 and res.manifest["totals"]["n_samples"] > 0
    first = compared_files(out)
    for i in (0, 1, 2):
        stats_path(out, i).unlink()  # written last: the chunks count as not done, their intermediates stay
    res = run_build(b, out, BuildOptions.on("local", chunk_size=4, show_progress=False))
    assert res.processed == [0, 1, 2] and compared_files(out) == first
    for i in (0, 1, 2):
        reused = json.loads(stats_path(out, i).read_text())["timing"]["reused_intermediate"]
        assert reused == ["tag", "verify", "assign", "rewrite"], reused


def test_cli_verifier_none_keeps_the_tagger_boxes(tmp_path: Path, sample_world, capsys) -> None:
    from pipelines.cli import main

    out = tmp_path / "cli"
    argv = ["build", "cot", "--out", str(out), "--executor", "local", "--quiet", "--refspatial", *FILES,
            "--data-root", str(sample_world.root), "--tagger", "oracle", "--verifier", "none", "--chunk-size", "6"]
    assert main(argv) == 0
    assert "written: 11" in capsys.readouterr().out
    gt = sample_world.ground_truth["refspatial_mentions"]
    recs = records(out)
    assert sum(check_grounded_like_truth(r, gt) for r in recs.values()) > 20
    assert all(m["rewritten"] is None for r in recs.values() for m in r["mentions"])  # no VLM, no rewrite
    assert sorted(p.name for p in (out / "intermediate").iterdir()) == ["assign", "tag"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["verifier"] == "none" and man["config"]["versions"]["prompt"]
    # a second run over the finished build does nothing
    assert main(argv) == 0 and "processed this run: 0 chunk(s)" in capsys.readouterr().out
    # a missing model is a clear error before anything runs
    bad = ["build", "cot", "--out", str(tmp_path / "x"), "--refspatial", FILES[0], "--data-root",
           str(sample_world.root), "--tagger", "florence2", "--verifier", "none"]
    assert main(bad) == 2 and "--tagger-model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _png(path: Path, size=(40, 30)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 30, 10)).save(path)


def test_bad_inputs_become_rejects_with_specific_reasons(tmp_path: Path, sample_world) -> None:
    from PIL import Image

    root = tmp_path / "data"
    good = json.loads(sample_world.refspatial_files[0].json_path.read_text())[0]
    (root / "img").mkdir(parents=True)
    shutil.copy(sample_world.refspatial_files[0].image_root / good["image"][0], root / "img" / "good.png")
    Image.new("RGB", (20, 20)).save(root / "img" / "anim.gif")
    data = (root / "img" / "good.png").read_bytes()
    (root / "img" / "trunc.png").write_bytes(data[: len(data) // 3])
    conv = good["conversations"]

    def rec(rid: str, image: Any = "good.png", conversations: Any = None) -> dict[str, Any]:
        return {"id": rid, "image": image, "conversations": conversations or conv}

    def qa(answer: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": "<image>\nWhere is the red table?"}, {"from": "gpt", "value": answer}]

    recs = [
        rec(good["id"]),
        rec("x1", "nope.png"),
        rec("x2", ["good.png", "good.png"]),
        rec("x3", conversations=qa("Yes.")),
        rec("x4", conversations=qa("The red table<region> is big.")),
        rec("x5", conversations=qa("The red table is here. [(1.2, 0.5)]")),
        rec("x6", conversations=[conv[1], conv[0]]),
        rec("x7", "anim.gif"),
        rec("x8", "trunc.png"),
        "not a record",
        rec("x10", "../../etc/passwd"),
        rec("x11", conversations=qa("The red table is big.")),  # no ground truth for this record
        rec("x12", conversations=qa("The red table is big. " + "very " * 1000)),
    ]
    (root / "bad.json").write_text(json.dumps(recs))
    b = make_cot_builder(CotConfig(["bad.json"], root, out=tmp_path / "b", tagger="oracle", verifier="oracle", image_root="img",
                         ground_truth=str(sample_world.root / "ground_truth.json")))
    res = run_build(b, tmp_path / "b", BuildOptions.on("local", chunk_size=5, show_progress=False))
    t = res.manifest["totals"]
    assert t["n_input"] == 13 and t["n_samples"] == 1 and t["n_rejected"] == 12
    got = {k.rsplit("/", 1)[1]: (r["stage"], r["reason"]) for k, r in rejects(tmp_path / "b").items()}
    assert got == {
        "00000001": ("read", "missing_image"), "00000002": ("read", "multi_image"),
        "00000003": ("read", "no_mentions"), "00000004": ("read", "grammar_tokens_in_text"),
        "00000005": ("read", "point_out_of_range"), "00000006": ("read", "malformed_conversation"),
        "00000007": ("read", "unsupported_image_format"), "00000008": ("read", "unreadable_image"),
        "00000009": ("read", "malformed_record"), "00000010": ("read", "path_escapes_root"),
        "00000011": ("assign", "no_candidates"), "00000012": ("read", "turn_too_long"),
    }
    assert "'The red table': no_candidates" in rejects(tmp_path / "b")["refspatial/bad/00000011"]["message"]
    (written,) = records(tmp_path / "b").values()
    assert written["source"] == {"dataset": "RefSpatial", "file": "bad.json", "id": good["id"], "record_index": 0}


def test_assignment_is_one_to_one_with_coreference_and_hungarian() -> None:
    X, Y, Z = [0.0, 0, 10, 10], [20.0, 20, 30, 30], [0.5, 0, 10, 10]  # Z is X (IoU > 0.9)

    def ent(key: str, cat: str) -> dict[str, Any]:
        return {"key": key, "category": cat, "text": "the " + key}

    def cand(*boxes) -> list[dict[str, Any]]:
        return [{"label": "", "box_px": b, "source": "od", "score": None} for b in boxes]

    def v(choice, conf=0.9, error=None) -> dict[str, Any]:
        return {"choice": choice, "confidence": conf, "error": error}

    ents = [ent("red chair", "chair"), ent("blue chair", "chair"), ent("chair", "chair"), ent("cup", "cup"),
            ent("lamp", "lamp"), ent("bowl", "bowl"), ent("vase", "vase")]
    out = assign_boxes(ents, [cand(X), cand(Z), cand(Y, X), cand(Y), cand(Y), cand(), cand(X)],
                       [v(0, 0.9), v(0, 0.8), v(1, 0.7), v(None), v(0, 0.2), v(None), v(None, error="bad")], 0.5)
    assert [o["decision"] for o in out] == ["grounded", "ambiguous_alignment", "coreferent", "verifier_none",
                                            "low_confidence", "no_candidates", "verifier_malformed_output"]
    assert out[0]["box_px"] == X and out[2]["box_px"] == X  # "the chair" shares "the red chair"'s box
    # unverified: the tagger's ranks, solved jointly: A takes its second box so B gets the one it has
    out = assign_boxes([ent("a", "cup"), ent("b", "mug")], [cand(X, Y), cand(X)], None, 0.5)
    assert [(o["decision"], o["box_px"]) for o in out] == [("grounded", Y), ("grounded", X)]


def test_compose_writes_grammar_after_mentions_and_points() -> None:
    text = "The cup is left of the lamp. [(0.5, 0.25), (1, 0)]"
    pts = find_point_lists(text)
    assert pts == [(29, 50, [(0.5, 0.25), (1.0, 0.0)])]
    assert find_point_lists("[(x1, y1)] and [(0.1,0.2),]") == []
    out = compose_turn(text, [(0, 7, "The red cup", [0.1, 0.2, 0.3, 0.4]), (19, 27, "the lamp", [0, 0, 1, 1])], pts)
    assert out == ("The red cup<bbox>[0.100, 0.200, 0.300, 0.400]</bbox><region> is left of the lamp"
                   "<bbox>[0.000, 0.000, 1.000, 1.000]</bbox><region>. <bbox>[0.500, 0.250, 0.500, 0.250]</bbox>, "
                   "<bbox>[1.000, 0.000, 1.000, 0.000]</bbox>")
    check_regions(out)
    with pytest.raises(ValueError, match="overlapping"):
        compose_turn(text, [(0, 7, "x", [0, 0, 1, 1]), (4, 10, "y", [0, 0, 1, 1])], [])


def test_failed_samples_become_reject_rows_at_compose() -> None:
    out, rej = ComposeStage().process([{"key": "k1", "failure": {"reason": "verifier_none", "message": "m"}},
                                       {"key": "k2", "failure": {"reason": "rewrite_malformed_output",
                                                                 "message": "raw", "stage": "rewrite"}}])
    assert out == [] and [(r.key, r.stage, r.reason) for r in rej] == [
        ("k1", "assign", "verifier_none"), ("k2", "rewrite", "rewrite_malformed_output")]


def _fake_checkpoint(path: Path) -> str:
    """A directory that passes the plan-time checkpoint check (config.json); nothing loads it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return str(path)


def test_model_stages_are_gpu_actor_pools_and_cheap_annotators_are_cpu_stages(sample_world, tmp_path) -> None:
    from pipelines.engine.executors.ray_executor import resource_plan

    b = make_cot_builder(CotConfig(FILES, sample_world.root, cache=None, tagger="florence2", verifier="transformers",
                         tagger_model=_fake_checkpoint(tmp_path / "models" / "Florence-2-large"),
                         verifier_model=_fake_checkpoint(tmp_path / "models" / "Qwen2.5-VL-7B"), num_gpus=1))
    st = {s.name: s for s in b.stages}
    assert [s.name for s in b.stages] == ["read", "tag", "verify", "assign", "rewrite", "compose"]
    assert all(st[n].runs_on_actors and st[n].resources.gpus == 1 for n in ("tag", "verify", "rewrite"))
    assert not any(st[n].runs_on_actors for n in ("read", "assign", "compose"))
    plan = resource_plan(b.stages, n_chunks=100, cpus=16, gpus=8, workers=None, num_gpus=None)
    assert [(p["segment"].actors, p["num_gpus"]) for p in plan] == [
        (False, 0), (True, 1.0), (True, 1.0), (False, 0), (True, 1.0), (False, 0)]
    assert all(p["size"] == 8 for p in plan if p["segment"].actors)  # one model replica per GPU
    assert b.config["tagger_model"]["name"] == "Florence-2-large"  # model name, not a machine path
    o = make_cot_builder(CotConfig(FILES, sample_world.root, cache=None, tagger="oracle", verifier="openai",
                         endpoint="http://127.0.0.1:9/v1", verifier_model="m"))
    assert not any(s.runs_on_actors for s in o.stages)  # the HTTP client and the oracle need no GPU
    assert "endpoint" not in json.dumps(o.config) and "127.0.0.1" not in json.dumps(o.config)


def test_real_data_defaults_are_the_real_annotators_with_one_line_errors(sample_world, tmp_path) -> None:
    """Issue 15: on real data (no ground_truth.json) the defaults are Florence-2 + a VLM, and what is
    missing is one line naming the flag, before anything runs; the oracle is only used when asked."""
    import subprocess
    import sys

    root = tmp_path / "RefSpatial"
    (root / "3D").mkdir(parents=True)
    shutil.copy(sample_world.root / FILES[1], root / "3D" / "choice_qa.json")  # real layout, no ground truth

    def cli(*extra: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "pipelines.cli", "build", "cot", "--refspatial", "3D/choice_qa.json",
                "--data-root", str(root), "--out", str(tmp_path / "out"), *extra]
        return subprocess.run(argv, capture_output=True, text=True, timeout=300)

    flo = _fake_checkpoint(tmp_path / "ckpt" / "Florence-2-large")
    cases = [((), "--tagger-model"), (("--tagger-model", flo), "--verifier-model"),
             (("--tagger-model", str(tmp_path / "nowhere"), "--verifier-model", flo), "--tagger-model"),
             (("--tagger-model", flo, "--verifier-model", str(tmp_path / "ckpt")), "--verifier-model"),
             (("--tagger-model", flo, "--verifier", "openai"), "--endpoint"),
             (("--tagger", "oracle"), "--ground-truth")]
    for extra, flag in cases:
        r = cli(*extra)
        assert r.returncode == 2, (extra, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr, (extra, r.stderr)
    assert "oracle" not in cli().stderr  # the default is not the oracle
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ OpenAI-compatible HTTP verifier
@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ENV, SECRET)

    def responder(req: dict[str, Any]) -> str:
        text = "".join(p.get("text", "") for p in req["messages"][-1]["content"] if p.get("type") == "text")
        if "the lime bookcase" in text.lower():
            return "I believe it is box number zero."  # not JSON: the repair retry gets the same
        return default_responder(req)

    with OpenAIStub(responder=responder, api_key=SECRET) as s:
        yield s


def _http_builder(root: Path, out: Path, url: str, **kw: Any):
    args = dict(tagger="oracle", verifier="openai", endpoint=url, verifier_model="tiny-vlm", api_key_env=ENV,
                timeout=0.6, max_retries=3, backoff=0.01, max_concurrency=4)
    args.update(kw)
    return make_cot_builder(CotConfig(FILES, root, out=out, **args))


def test_openai_backend_survives_429_500_timeout_and_keeps_garbage_as_rejects(
        tmp_path: Path, sample_world, stub: OpenAIStub) -> None:
    stub.script(Step(429, retry_after="0"), Step(500), Step(delay=1.2))  # each retried by the client
    out = tmp_path / "http"
    res = run_build(_http_builder(sample_world.root, out, stub.url), out,
                    BuildOptions.on("local", chunk_size=4, show_progress=False))
    assert not stub._steps  # the three failures were served (and survived)
    t = res.manifest["totals"]
    assert (t["n_input"], t["n_samples"], t["n_rejected"]) == (11, 10, 1)
    (bad,) = rejects(out).values()
    assert bad["reason"] == "verifier_malformed_output" and bad["key"].endswith("reasoning_template_qa/00000001")
    assert "I believe it is box number zero." in bad["message"]  # raw text kept
    ver = [r for r in pq.read_table(out / "intermediate" / "verify").to_pylist() if r["parse_error"]]
    assert len(ver) == 1 and len(json.loads(ver[0]["attempts"])) == 2  # the repair retry was made
    gt = sample_world.ground_truth["refspatial_mentions"]
    recs = records(out)
    assert sum(check_grounded_like_truth(r, gt, rewritten=False) for r in recs.values()) > 20
    desc = "the small object near the left edge"  # the stub's rewrite answer
    rw = [m for r in recs.values() for m in r["mentions"] if m["rewritten"]]
    assert rw and all(m["rewritten"] == desc for m in rw)
    assert any(("The " + desc[4:] + "<bbox>") in x for r in recs.values() for x in gpt_texts(r))
    assert all({k.lower(): v for k, v in h.items()}.get("authorization") == f"Bearer {SECRET}" for h in stub.headers)
    for p in [*out.rglob("*.parquet"), out / "manifest.json", out / "run.json"]:
        assert SECRET.encode() not in p.read_bytes()
    # a rebuild from scratch (--overwrite) asks the server nothing: the cache in BUILD/cache answers
    assert (out / "cache" / "annotator_cache.sqlite").stat().st_size > 0
    n = len(stub.requests)
    first = compared_files(out)
    run_build(_http_builder(sample_world.root, out, stub.url), out,
              BuildOptions.on("local", chunk_size=4, overwrite=True, show_progress=False))
    assert len(stub.requests) == n and compared_files(out) == first


def test_unreachable_model_stops_the_build_without_leaking_the_key(tmp_path: Path, sample_world,
                                                                    stub: OpenAIStub) -> None:
    stub.script(*[Step(500)] * 40)
    out = tmp_path / "down"
    with pytest.raises(StageSetupError) as ei:
        run_build(_http_builder(sample_world.root, out, stub.url, max_retries=1), out,
                  BuildOptions.on("local", chunk_size=4, show_progress=False))
    assert "VLMTransportError" in str(ei.value) and "HTTP 500" in str(ei.value) and SECRET not in str(ei.value)
    assert not (out / "manifest.json").exists() and not list((out / "shards").glob("*.stats.json"))


def test_files_resolve_to_the_released_layout_roots(tmp_path: Path) -> None:
    from pipelines.corpora.cot.builder import resolve_refspatial_files

    (tmp_path / "RefSpatial" / "3D").mkdir(parents=True)
    (tmp_path / "RefSpatial" / "3D" / "choice_qa.json").write_text("[]")
    (tmp_path / "mine.json").write_text("[]")
    rs = tmp_path / "RefSpatial"
    for f in ("3D/choice_qa.json", "RefSpatial/3D/choice_qa.json", str(rs / "3D" / "choice_qa.json")):
        (got,) = resolve_refspatial_files([f], tmp_path)
        assert got == {"json": str(rs / "3D" / "choice_qa.json"), "image_root": str(rs / "3D" / "image"),
                       "depth_root": str(rs / "3D" / "depth"), "tag": "3D/choice_qa"}, f
    (got,) = resolve_refspatial_files(["mine.json"], tmp_path, image_root="imgs")
    assert (got["image_root"], got["depth_root"], got["tag"]) == (str(tmp_path / "imgs"), None, "mine")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_refspatial_files(["nope.json"], tmp_path)
