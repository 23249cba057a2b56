"""Nothing a build starts outlives it, even when its driver is SIGKILLed.

An embedded Ray starts processes the driver does not own directly: `gcs_server` and `raylet` die with
the driver (Ray starts them with a parent-death signal), but the raylet's agents (`ray::DashboardAgent`,
`ray::RuntimeEnvAgent`, ~180 MB together) and idle workers stay alive for ever after a SIGKILL. Beam's
multi-process SDK workers are plain subprocesses with the same risk.

`owned_processes()` marks and guards them:
- it puts `GR3D_RUN_TAG=gr3d-<driver pid>-<random>` into the driver's environment for the duration of
  the block; every process started meanwhile inherits it (Ray's raylet passes its environment on to its
  agents and workers), so the tag names exactly this run's processes, whatever their process group,
  session or process title (Ray's agents rename themselves, so command lines cannot be used);
- it starts a watchdog (`python -m pipelines.engine.reaper`) in its own session holding the read end of a
  pipe whose write end only the driver holds. When the pipe closes (the block ends, or the driver dies
  in any way, SIGKILL included) the watchdog kills every live process carrying the tag, and every
  descendant of the driver it recorded while polling (once a second), then exits. Both are needed: a
  process that rewrites its title (`setproctitle`, as Ray's agents do) may overwrite the memory that
  /proc/PID/environ shows, losing the tag; a process started after the last poll is caught by its tag;
  after a driver's death it keeps sweeping for LINGER_S (a dying raylet may still start an agent). It
  also polls the driver's pid, in case a child inherited the write end;
- `sweep_orphans()` (called by the next run before it starts anything) kills tagged processes whose
  driver is gone, in case the watchdog itself was killed.

A joined cluster (`--ray-address`) is never touched: its processes were started by `ray start`, not by
the driver, so they never carry the tag, and the executors enter this block only for an embedded Ray.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TAG_ENV = "GR3D_RUN_TAG"
LINGER_S = 3.0  # the watchdog sweeps this long after the driver died
DONE = b"."  # written by the driver when the block ends normally (a dead driver writes nothing)


def _environ_tag(pid: int) -> str | None:
    """The GR3D_RUN_TAG of a live, non-zombie process (None if untagged, gone or not ours to read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] == "Z":
            return None
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    key = TAG_ENV.encode() + b"="
    for var in env.split(b"\0"):
        if var.startswith(key):
            return var[len(key):].decode(errors="replace")
    return None


def tagged_processes(prefix: str) -> dict[int, str]:
    """Live processes whose tag starts with `prefix` (pid -> tag), this process excluded."""
    out: dict[int, str] = {}
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != me:
            tag = _environ_tag(int(d.name))
            if tag is not None and tag.startswith(prefix):
                out[int(d.name)] = tag
    return out


def kill_tagged(prefix: str, rounds: int = 10) -> list[int]:
    """SIGKILL every process tagged `prefix...` until none is left (a dying raylet may still fork)."""
    killed: list[int] = []
    for _ in range(rounds):
        left = tagged_processes(prefix)
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.1)
    return killed


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else (int(fields[1]), int(fields[19]))


def descendants(root: int) -> dict[int, int]:
    """Live descendants of `root` (pid -> start time, so a reused pid is never mistaken for one)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            children.setdefault(st[0], []).append((int(d.name), st[1]))
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        for pid, start in children.get(stack.pop(), []):
            if pid not in out:
                out[pid] = start
                stack.append(pid)
    return out


def _kill_known(known: dict[int, int]) -> None:
    """SIGKILL the recorded processes that are still the same processes (same start time)."""
    for pid, start in known.items():
        st = _stat(pid)
        if st is not None and st[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def sweep_orphans() -> list[int]:
    """Kill processes left by earlier runs whose driver is gone (tag `gr3d-<dead pid>-...`)."""
    dead: set[str] = set()
    for tag in set(tagged_processes("gr3d-").values()):
        try:
            driver = int(tag.split("-")[1])
        except (IndexError, ValueError):
            continue
        if tag != os.environ.get(TAG_ENV) and not _pid_alive(driver):
            dead.add(tag)
    return [pid for tag in sorted(dead) for pid in kill_tagged(tag)]


@contextmanager
def owned_processes() -> Iterator[str]:
    """Tag the processes started within the block and have a watchdog kill them when it ends or the
    driver dies. Yields the tag."""
    sweep_orphans()
    tag = f"gr3d-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    read_fd, write_fd = os.pipe()  # both non-inheritable: no later child keeps the write end open
    env = {k: v for k, v in os.environ.items() if k != TAG_ENV}
    watchdog = subprocess.Popen([sys.executable, "-m", "pipelines.engine.reaper", tag, str(os.getpid())],
                                stdin=read_fd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    os.close(read_fd)
    old = os.environ.get(TAG_ENV)
    os.environ[TAG_ENV] = tag
    try:
        yield tag
    finally:
        if old is None:
            os.environ.pop(TAG_ENV, None)
        else:
            os.environ[TAG_ENV] = old
        os.write(write_fd, DONE)
        os.close(write_fd)  # the watchdog sees DONE and EOF, kills what is left of the run, exits
        try:
            watchdog.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def _watch(tag: str, driver: int) -> None:
    """The watchdog: wait for EOF on stdin (or the driver's death), then kill the run's processes."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_IGN)  # a Ctrl-C or SIGTERM of the driver's group must not stop us
    said_done = False
    known: dict[int, int] = {}  # the driver's descendants seen so far (tags can vanish: see below)
    try:
        while _pid_alive(driver):
            known.update(descendants(driver))
            known.pop(os.getpid(), None)  # this watchdog is the driver's child too
            ready, _, _ = select.select([0], [], [], 1.0)
            if ready:
                data = os.read(0, 4096)
                said_done |= DONE in data
                if not data:
                    break
    finally:  # whatever happened above, the run's processes go
        # If the driver died, keep sweeping a few seconds: a dying raylet may still start an agent or a
        # worker. At the block's normal end (the driver wrote DONE and waits for us): one sweep.
        end = time.monotonic() + (0.0 if said_done else LINGER_S)
        while True:
            if not said_done:  # a live driver's other children are none of our business
                _kill_known(known)
            kill_tagged(tag)
            if time.monotonic() >= end:
                break
            time.sleep(0.5)


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
