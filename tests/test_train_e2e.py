"""The must-show end to end on CPU: build the sample world's det3d shards with the real builder, train the
tiny preset a few hundred steps (stage 2: detect_3d), SIGKILL it after a checkpoint, `--resume auto`, then
`gr3d eval det3d` on the world's Omni3D ground truth with the trained checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from model.train import find_latest_checkpoint
from pipelines.cli import main
from tests.test_train_resume import env, kill_after_first_checkpoint

STEPS, EVERY = 200, 100


@pytest.mark.slow
def test_sample_world_det3d_train_kill_resume_and_evaluate(sample_world, tmp_path: Path) -> None:
    from pipelines.corpora.det3d.builder import Det3dBuildConfig, make_builder
    from pipelines.engine.options import BuildOptions
    from pipelines.engine.run import run_build
    from shards.reader import iter_samples

    builds = tmp_path / "builds"
    builder = make_builder(Det3dBuildConfig(omni3d=sample_world.omni3d_files, embodiedscan=sample_world.embodiedscan_files,
                                           data_root=sample_world.root))
    run_build(builder, builds / "det3d", BuildOptions.on("local", chunk_size=2, show_progress=False))
    samples = list(iter_samples(builds / "det3d"))
    assert len(samples) >= 6 and all(s["json"]["camera"]["scale"] > 0 for s in samples)

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipelines.cli", "train", "--config", "tiny", "--stage", "2",
           "--data.root", str(builds), "--data.mix", "det3d@1", "--out", str(out), "--max_steps", str(STEPS),
           "--checkpoint_every", str(EVERY), "--log_every", "20", "--data.batch_size", "8",
           "--data.num_workers", "2"]
    assert kill_after_first_checkpoint(cmd, out)[0] == -signal.SIGKILL
    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step_{EVERY:06d}" and not (out / "final").exists()
    saved = json.loads((ckpt / "data_rank_00000.json").read_text())

    r = subprocess.run([*cmd, "--resume", "auto"], env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {ckpt} at step {EVERY} (epoch {saved['epoch']}, {saved['samples']} samples" in r.stderr
    assert "ETA" in r.stderr  # the progress line
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [x for x in recs if x.get("event") == "resume"]
    assert resume["step"] == EVERY and resume["data"] == saved
    losses = [(x["step"], x["loss"]) for x in recs if "loss" in x and "event" not in x]
    assert losses[-1][0] == STEPS and losses[-1][1] < 0.4 * losses[0][1], losses
    png = out / "loss.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (out / "final" / "gr3d_config.json").is_file()

    ev = tmp_path / "eval"
    rc = main(["eval", "det3d", "--gt", *map(str, sample_world.omni3d_files), "--checkpoint", str(out / "final"),
               "--image-root", str(sample_world.root), "--out", str(ev), "--max-new-tokens", "160"])
    assert rc == 0
    res = json.loads((ev / "det3d_eval.json").read_text())
    assert res["inputs"]["checkpoint"] == str(out / "final")
    assert res["overall"]["n_gt"] > 0 and res["overall"]["n_images"] == sum(
        len(json.loads(f.read_text())["images"]) for f in sample_world.omni3d_files)
    assert 0.0 <= res["overall"]["AP3D"] <= 1.0
    preds = json.loads((ev / "predictions.json").read_text())
    # the trained model answers in the grammar: its 3D boxes parse into Omni3D instances
    assert sum(len(p["instances"]) for p in preds) > 0
