"""`gr3d train` as a real subprocess: SIGKILL it after a checkpoint, `--resume auto`, and the run ends
bit-identical to an uninterrupted one (weights, optimizer path and the very samples of every step), with
2 real DataLoader workers and an epoch boundary crossed after the resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from model.train import find_latest_checkpoint
from pipelines.cli import main
from tests.test_data_loader import write_corpora

REPO = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 20


def train_cmd(out: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--config", "tiny", "--data.root", str(root),
            "--data.mix", "det3d@0.5,pointmap@0.3,cot@0.2", "--out", str(out), "--max_steps", str(STEPS),
            "--checkpoint_every", str(EVERY), "--log_every", "10", "--data.batch_size", "4",
            "--data.num_workers", "2", "--log_samples", "true", *extra]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}


def weights(final: Path) -> dict[str, object]:
    out = {}
    for f in sorted(final.rglob("*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def kill_after_first_checkpoint(cmd: list[str], out: Path, sig: int = signal.SIGKILL,
                                timeout: float = 120.0) -> tuple[int, str, int]:
    """Start training in its own session, send `sig` as soon as a complete checkpoint exists; returns the
    exit code, stderr and pid (= session id) once it ended."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    try:
        while find_latest_checkpoint(out) is None:
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() - t0 < timeout
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
        return proc.returncode, stderr, proc.pid
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: what a stopped run left running (DataLoader workers)."""
    left = []
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            if d.name.isdigit() and stat[stat.rindex(")") + 2] != "Z" and os.getsid(int(d.name)) == sid:
                left.append(int(d.name))
        except (OSError, ValueError):
            continue
    return left


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_then_resume_auto_equals_uninterrupted_run(tmp_path: Path, sig: int) -> None:
    """SIGKILL: resume from the newest complete checkpoint. SIGTERM (what Kubernetes and SLURM send):
    the run stops cleanly with 143 and one line that says how to continue, leaves no half-written
    checkpoint, metrics line or DataLoader worker, and resumes the same way."""
    root = write_corpora(tmp_path / "builds", shards=4, per_shard=8)  # 96 samples: 24 steps per epoch
    a, b = tmp_path / "a", tmp_path / "b"
    subprocess.run(train_cmd(a, root), env=env(), check=True, capture_output=True)

    rc, stderr, sid = kill_after_first_checkpoint(train_cmd(b, root), b, sig)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:
        assert rc == 143, stderr[-3000:]
        last = stderr.rstrip().splitlines()[-1]
        assert re.fullmatch(r"gr3d train: interrupted by SIGTERM at step \d+ of 40; nothing half-written; run the "
                            r"same command with --resume auto to continue from step_000020", last), stderr[-3000:]
        assert "Traceback" not in stderr
        assert list((b / "checkpoints").glob("*.tmp")) == []
        [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]  # every line whole
        assert session_processes(sid) == []  # the DataLoader workers were stopped too
    assert not (b / "final").exists()
    ckpt = find_latest_checkpoint(b)
    assert ckpt is not None
    resumed_at = int(ckpt.name.split("_")[1])
    saved_pos = json.loads((ckpt / "data_rank_00000.json").read_text())
    assert resumed_at == EVERY and saved_pos["epoch"] == 0 and saved_pos["samples"] == 4 * EVERY
    assert sum(saved_pos["worker_pos"]) >= saved_pos["samples"]

    r = subprocess.run(train_cmd(b, root, "--resume", "auto"), env=env(), check=True, capture_output=True,
                       text=True)
    assert f"resumed from {ckpt} at step {resumed_at} (epoch 0, {4 * EVERY} samples" in r.stderr

    # same step, same data position, same samples afterwards, same weights
    recs = [json.loads(ln) for ln in (b / "metrics.jsonl").read_text().splitlines()]
    (resume,) = [x for x in recs if x.get("event") == "resume"]
    assert resume["step"] == resumed_at and resume["data"] == saved_pos
    steps = [x["step"] for x in recs if "loss" in x and "event" not in x]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicate points from the killed run
    assert any(x.get("event") == "epoch_end" for x in recs)  # an epoch boundary was crossed
    assert (a / "samples_rank00000.jsonl").read_text() == (b / "samples_rank00000.jsonl").read_text()
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys() and len(wa) > 40
    assert all((wa[k] == wb[k]).all() for k in wa)  # type: ignore[union-attr]
    assert (b / "loss.png").is_file()
    # and the run did train: the logged loss fell
    losses = [x["loss"] for x in recs if "loss" in x and "event" not in x]
    assert losses[-1] < 0.8 * losses[0]


def test_resume_refuses_to_mix_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_corpora(tmp_path / "builds", shards=1, per_shard=2, corpora=("det3d",))
    argv = ["train", "--config", "tiny", "--data.root", str(root), "--data.mix", "det3d", "--out",
            str(tmp_path / "o"), "--max_steps", "1", "--data.num_workers", "0", "--export_final", "false"]
    assert main(argv) == 0
    assert main(argv) == 2  # a fresh start into a directory with checkpoints would mix two runs
    assert "already holds checkpoints: pass --resume auto" in capsys.readouterr().err
    assert main([*argv, "--resume", str(tmp_path / "nope")]) == 2
