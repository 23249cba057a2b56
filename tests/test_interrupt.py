"""Interrupted builds: SIGINT / SIGTERM stop cleanly, SIGKILL leaves no process behind, resume is exact.

Every build here is a real `gr3d build toy` driver in its own session (so its process group and
session id are its pid, and a signal to the group reaches only it and what it started). Signals are
sent at a point keyed to progress (after k shards are done), not to wall-clock time, so a loaded machine
cannot make them miss the run. A process "of the run" is one in the driver's session, or one carrying
the run's tag (`GR3D_RUN_TAG=gr3d-<driver pid>-...`, which Ray's agents and workers inherit even though
they leave the session's process group), or the run's watchdog; nothing else on the machine is looked
at or touched, so other users' Ray processes are safe.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.engine.options import BuildOptions
from pipelines.engine.reaper import owned_processes, tagged_processes
from pipelines.engine.run import run_build
from shards import interrupt
from shards.layout import is_done
from tests.ray_cluster import ROOT, cluster_env
from tests.test_executors_toy import compared_files, toy_builder

N, CS = 24, 4  # 6 chunks
N_CHUNKS = N // CS
COST_MS = 60.0


# --- the pieces alone ----------------------------------------------------------------------------------

def test_signal_in_block_raises_interrupted_with_exit_code_then_handlers_are_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(interrupt.Interrupted) as info, interrupt.stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode; never reached
    assert info.value.exit_code == 143 and info.value.signal_name == "SIGTERM"
    assert isinstance(info.value, KeyboardInterrupt)  # no `except Exception` on the way swallows it
    assert signal.getsignal(signal.SIGTERM) is before


def test_signal_in_deferred_section_stops_right_after_it() -> None:
    """A checkpoint being written is finished first; the stop comes at the end of the section."""
    steps: list[str] = []
    with pytest.raises(interrupt.Interrupted) as info, interrupt.stop_on_signals():
        with interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs here, and only records the signal
            steps.append("checkpoint written")
        steps.append("next step")  # never reached
    assert steps == ["checkpoint written"] and info.value.exit_code == 130


def test_watchdog_kills_tagged_grandchild_when_driver_is_sigkilled(tmp_path: Path) -> None:
    """A driver that starts a long-lived child inside `owned_processes()` and is then SIGKILLed: the
    child (reparented, in the driver's session) is gone within seconds, and so is the watchdog."""
    code = ("import subprocess, sys, time\n"
            "from pipelines.engine.reaper import owned_processes\n"
            "with owned_processes():\n"
            "    c = subprocess.Popen(['sleep', '300'])\n"
            f"    open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid))\n"
            "    time.sleep(300)\n")
    drv = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cluster_env(), start_new_session=True)
    child_file = tmp_path / "child"
    deadline = time.monotonic() + 60
    while not child_file.exists() or not child_file.read_text():
        assert time.monotonic() < deadline and drv.poll() is None
        time.sleep(0.05)
    child = int(child_file.read_text())
    assert child in tagged_processes(f"gr3d-{drv.pid}-")
    drv.kill()
    drv.wait()
    assert _wait_gone(drv.pid) == {}


def test_owned_processes_end_reaps_what_is_left_and_restores_environment() -> None:
    with owned_processes() as tag:
        assert os.environ["GR3D_RUN_TAG"] == tag
        c = subprocess.Popen(["sleep", "300"])
    assert "GR3D_RUN_TAG" not in os.environ
    assert c.wait(timeout=10) == -signal.SIGKILL


# --- real builds ---------------------------------------------------------------------------------------

def _driver(out: Path, executor: str, *extra: str) -> subprocess.Popen[str]:
    """`gr3d build toy` in its own session; stdout/stderr piped."""
    args = [sys.executable, "-m", "pipelines.cli", "build", "toy", "--out", str(out), "--n", str(N),
            "--chunk-size", str(CS), "--cost-ms", str(COST_MS), "--executor", executor, "--quiet", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=cluster_env(GR3D_BUILDERS="tests.test_executors_toy"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _done(out: Path) -> set[int]:
    return {i for i in range(N_CHUNKS) if is_done(out, i)}


def _signal_when_done(proc: subprocess.Popen[str], out: Path, min_done: int, sig: int, group: bool,
                      timeout: float = 300) -> tuple[str, str]:
    """Send `sig` (to the pid, or to its whole process group like a terminal's Ctrl-C) once `min_done`
    shards are done; return (stdout, stderr) after the driver ends."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and len(_done(out)) < min_done:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before the signal"
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        return proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("the driver did not stop within 180 s of the signal") from None


def _run_processes(driver: int) -> dict[int, str]:
    """Live processes of the run of `driver` (pid -> command line): its session, its tag, its watchdog."""
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(int(d.name)) == driver or f"pipelines.engine.reaper gr3d-{driver}-" in cmd:
                out[int(d.name)] = cmd[:160]
        except (OSError, ValueError):
            continue
    out.update({pid: f"tagged {tag}" for pid, tag in tagged_processes(f"gr3d-{driver}-").items()})
    return out


def _wait_gone(driver: int, timeout: float = 30.0) -> dict[int, str]:
    """What is left of the run after `timeout` s (empty as soon as nothing is)."""
    deadline = time.monotonic() + timeout
    while (left := _run_processes(driver)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _assert_clean_stop(proc: subprocess.Popen[str], stderr: str, out: Path, sig: int) -> set[int]:
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, stderr[-3000:]
    done = _done(out)
    line = (f"gr3d build: interrupted by {name} after {len(done)} of {N_CHUNKS} shards; "
            "run the same command again to resume")
    assert stderr.rstrip().splitlines()[-1] == line, stderr[-3000:]
    assert "SIGTERM received" not in stderr and "PC: @" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert 1 <= len(done) < N_CHUNKS
    assert sorted(p.name for p in out.rglob("*.tmp")) == []  # a half-written shard leaves no trace
    assert not (out / "manifest.json").exists()
    assert _wait_gone(proc.pid) == {}
    return done


def _assert_resumed(out: Path, ref: Path, done: set[int], executor: str) -> None:
    rerun = _driver(out, executor)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    import json

    run = json.loads((out / "run.json").read_text())
    assert set(run["chunks_skipped_done"]) == done
    assert set(run["chunks_processed"]) == set(range(N_CHUNKS)) - done
    assert compared_files(out) == compared_files(ref)
    assert _wait_gone(rerun.pid) == {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "ref"
    run_build(toy_builder(N, cost_ms=COST_MS), ref,
              BuildOptions.on("local", chunk_size=CS, show_progress=False))
    return ref


@pytest.mark.parametrize(("sig", "group"), [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm-pid", "sigint-group"])
def test_local_build_stops_cleanly_and_resumes_byte_identical(reference: Path, tmp_path: Path, sig: int,
                                                              group: bool) -> None:
    out = tmp_path / "out"
    proc = _driver(out, "local")
    _, stderr = _signal_when_done(proc, out, 2, sig, group)
    done = _assert_clean_stop(proc, stderr, out, sig)
    _assert_resumed(out, reference, done, "local")


@pytest.mark.slow
def test_beam_build_stops_cleanly_on_sigterm_and_resumes(reference: Path, tmp_path: Path) -> None:
    """Two SDK worker processes (multi_processing): stopped on SIGTERM with no partial shard; reaped after
    a SIGKILL of the next driver; then an exact resume."""
    out = tmp_path / "out"
    proc = _driver(out, "beam", "--workers", "2")
    _, stderr = _signal_when_done(proc, out, 1, signal.SIGTERM, group=False)
    done = _assert_clean_stop(proc, stderr, out, signal.SIGTERM)
    _sigkill_mid_run_leaves_nothing(out, "beam", done)
    _assert_resumed(out, reference, _done(out), "local")


def _sigkill_mid_run_leaves_nothing(out: Path, executor: str, done: set[int], expect: tuple[str, ...] = ()) -> None:
    """Resume with `executor`, SIGKILL the driver once it wrote a shard: its run's processes (tagged, or
    in its session) are gone within seconds. `expect`: one tagged process's command line holds one of these."""
    victim = _driver(out, executor, "--workers", "2" if executor == "beam" else "1")
    deadline = time.monotonic() + 300
    while victim.poll() is None and len(_done(out)) <= len(done):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert victim.poll() is None, "the build ended before it could be killed"
    before = {p: _cmdline(p) for p in tagged_processes(f"gr3d-{victim.pid}-")}
    assert before  # the run's workers, tagged
    assert not expect or any(a in c for c in before.values() for a in expect), before
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert _wait_gone(victim.pid) == {}, before


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_build_stops_cleanly_on_ctrl_c_and_resumes_on_ray(reference: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole group): Ray's gcs/raylet block SIGINT, our driver stops the
    Dataset, shuts the embedded Ray down (agents and workers included), and says how to resume."""
    out = tmp_path / "out"
    proc = _driver(out, "ray", "--workers", "1")
    _, stderr = _signal_when_done(proc, out, 1, signal.SIGINT, group=True)
    done = _assert_clean_stop(proc, stderr, out, signal.SIGINT)
    _assert_resumed(out, reference, done, "ray")


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_build_sigterm_to_group_then_sigkill_leaves_nothing(reference: Path, tmp_path: Path) -> None:
    """SIGTERM to the group (what SLURM does) stops cleanly with 143 and no stack dump; then a second
    build SIGKILLed mid-run: the watchdog reaps the embedded Ray's agents and workers within seconds."""
    out = tmp_path / "out"
    proc = _driver(out, "ray", "--workers", "1")
    _, stderr = _signal_when_done(proc, out, 1, signal.SIGTERM, group=True)
    done = _assert_clean_stop(proc, stderr, out, signal.SIGTERM)

    # The raylet's agents are what used to outlive the driver: present (under their process title, or
    # still importing under their script's name on a loaded machine), tagged, and reaped.
    _sigkill_mid_run_leaves_nothing(out, "ray", done, expect=("DashboardAgent", "dashboard/agent.py"))
    _assert_resumed(out, reference, _done(out), "local")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_stopping_reports_a_signal_whose_interrupted_was_swallowed() -> None:
    """Library code (Ray) can swallow the `Interrupted` a signal raised and fail otherwise; `stopping()` still
    tells the build that it was stopped, so it ends as a stop (exit 128+sig), not as an error."""
    from shards import interrupt

    assert interrupt.stopping() is None
    with interrupt.stop_on_signals():
        assert interrupt.stopping() is None
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler raises here
        except interrupt.Interrupted:
            pass  # swallowed, as Ray's cancellation path does
        assert interrupt.stopping() == signal.SIGTERM
    assert interrupt.stopping() is None
