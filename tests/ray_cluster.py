"""A real two-node Ray cluster on this machine, started with `ray start`, for the cluster and fault tests.

Why not `ray.init()` or `ray.cluster_utils.Cluster`: the point is to exercise what a user does on a
real cluster: `ray start --head`, `ray start --address HEAD` on a second node, and a driver that joins
with `--ray-address`. Both nodes run here, each with 1 CPU and its own `--temp-dir` (Ray 2.60 allows a
temp dir per node: "Can be specified per node"), so each node's sockets, logs and worker log files
live apart, which is how the tests tell which node ran a task (`RayCluster.node_of_pid`).

Teardown never calls `ray stop`: that is global on the machine and would also kill the test session's
own embedded Ray (`tests/fixtures_ray.py`) and other users' clusters. Each node is a `ray start --block`
started in its own session (process group); stopping sends it SIGTERM (it shuts its node down), then
SIGKILLs whatever is left in its process group and every process whose command line names the node's
temp dir (Ray workers are passed the node's temp and session dirs), and deletes the temp dirs.

Drivers must run in a subprocess (`python -m pipelines.cli build ... --ray-address ADDR`): a process
that already has a Ray session (the pytest process with `ray_session`) cannot join a second cluster.
Drivers a failing test leaves running are killed at teardown (`reap_drivers`). If the test process
itself is SIGKILLed, the nodes still go: each `ray start` gets SIGTERM when its parent dies
(PR_SET_PDEATHSIG); only the temp dir (files) stays behind then.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# Environment of the nodes and of the drivers: no auth token file in ~/.ray, no usage-stats prompt,
# and the repository on the path so workers import `pipelines` and the `tests.*` toy stages.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "PYTHONPATH": str(ROOT),
}


def free_port() -> int:
    """A TCP port nobody listens on now (the head's GCS port; the default 6379 may be taken)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_env(**extra: str) -> dict[str, str]:
    """os.environ plus CLUSTER_ENV (and `extra`), without a RAY_ADDRESS that would redirect a driver."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CLUSTER_ENV)
    env.update(extra)
    return env


@dataclass
class Node:
    """One `ray start --block` process (its own process group) and the node's temp dir."""

    name: str
    temp_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    terminated: bool = False

    def pids(self) -> dict[int, str]:
        """Live processes of this node (pid -> command line): its process group, plus any process naming
        its temp dir. Zombies are left out: they hold no resources, and in a container without an init
        that reaps, orphans stay zombies for ever."""
        out: dict[int, str] = {}
        tag = str(self.temp_dir).encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            pid = int(d.name)
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
                if stat[stat.rindex(")") + 2] != "Z" and (os.getpgid(pid) == self.proc.pid or tag in cmd):
                    out[pid] = cmd.replace(b"\0", b" ").decode(errors="replace")[:200]
            except (OSError, ValueError):
                continue
        return out

    def terminate(self) -> None:
        """SIGTERM the `ray start --block` once: it shuts the node's processes down (a second SIGTERM
        would interrupt that shutdown)."""
        if not self.terminated and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.terminated = True

    def stop(self, grace: float = 3.0) -> None:
        """Terminate (graceful node shutdown), wait up to `grace` s, then SIGKILL what is left."""
        self.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@dataclass
class RayCluster:
    """A running two-node cluster: `address` is what `--ray-address` takes."""

    address: str
    head: Node
    worker: Node
    base: Path
    env: dict[str, str] = field(default_factory=cluster_env)
    more: list[Node] = field(default_factory=list)  # worker nodes past the second (bench/scaling.py)

    @property
    def nodes(self) -> list[Node]:
        return [self.head, self.worker, *self.more]

    def node_of_pid(self, pid: int) -> str | None:
        """Which node ran the Ray worker process `pid` ("head" | "worker"), from the node's worker logs.

        Every Ray worker writes `logs/worker-<worker id>-<job id>-<pid>.{out,err}` under the session dir
        of the node that started it, and the two nodes' temp dirs are distinct.
        """
        for node in self.nodes:
            if any(node.temp_dir.glob(f"session_*/logs/worker-*-{pid}.*")):
                return node.name
        return None

    def alive_nodes(self) -> int:
        """Nodes the GCS reports alive (read straight from the GCS: no Ray session in this process)."""
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return sum(1 for info in infos.values() if info.state == 0)  # GcsNodeInfo.ALIVE

    def actor_restarts(self) -> dict[str, int]:
        """Restart count of every actor the GCS knows (dead ones included), keyed by "Class:actor id"."""
        from ray._private.internal_api import get_state_from_address

        state = get_state_from_address(self.address)
        try:
            table = state.actor_table(None)
        finally:
            state.disconnect()
        return {f"{a['ActorClassName']}:{aid}": int(a["NumRestarts"]) for aid, a in table.items()}

    def driver(self, *args: str, **env: str) -> subprocess.Popen[str]:
        """`gr3d ARGS` as a driver process of its own (ARGS carry `--ray-address`)."""
        return gr3d_subprocess(*args, **{**self.env, **env})


_DRIVERS: list[subprocess.Popen[str]] = []


def gr3d_subprocess(*args: str, **env: str) -> subprocess.Popen[str]:
    """`python -m pipelines.cli ARGS` in a subprocess (stdout/stderr piped), remembered for `reap_drivers`."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=cluster_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _DRIVERS.append(proc)
    return proc


def reap_drivers() -> list[int]:
    """SIGKILL the drivers started here that still run (a test that failed before waiting on one).

    Returns their pids. Only processes this module started are touched, by pid.
    """
    killed = []
    while _DRIVERS:
        proc = _DRIVERS.pop()
        if proc.poll() is None:
            proc.kill()
            killed.append(proc.pid)
        proc.communicate()
    return killed


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[str, str]:
    """Wait for a driver and return (stdout, stderr); a driver past `timeout` is killed, then it raises."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"driver still running after {timeout:.0f} s; stderr:\n{err[-4000:]}") from None


def _term_on_parent_death() -> None:
    """In the child, before exec: SIGTERM it when the test process dies, even by SIGKILL.

    `ray start --block` shuts its node down on SIGTERM, so a pytest killed from outside (a CI
    timeout) leaves no cluster behind, which a `finally` alone cannot promise.
    """
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _start_node(name: str, base: Path, args: list[str], env: dict[str, str]) -> Node:
    temp_dir = base / name
    temp_dir.mkdir()
    log = base / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([RAY, "start", *args, "--temp-dir", str(temp_dir), "--block"], cwd=ROOT, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_term_on_parent_death)
    return Node(name, temp_dir, proc, log)


def _wait(cond: str, check: Callable[[], bool], nodes: list[Node], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        for n in nodes:
            if n.proc.poll() is not None:
                raise RuntimeError(f"ray start of the {n.name} node exited ({n.proc.returncode}):\n"
                                   + n.log.read_text(errors="replace")[-3000:])
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - the GCS is not up yet
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"Ray cluster: {cond} not reached in {timeout:.0f} s (last error: {last!r})")


@contextmanager
def ray_cluster(num_cpus: int = 1, timeout: float = 90.0, n_nodes: int = 2) -> Iterator[RayCluster]:
    """Start a head and `n_nodes - 1` worker nodes (`num_cpus` each), wait for all alive, yield, tear all down.

    `n_nodes=1` is a head alone (`cluster.worker` is the head then).

    The temp dirs sit directly under /tmp (short paths: Ray's Unix socket paths must fit in 107 bytes).
    """
    base = Path(tempfile.mkdtemp(prefix="gr3dray", dir="/tmp"))
    env = cluster_env()
    port = free_port()
    address = f"127.0.0.1:{port}"
    # No --node-ip-address: Ray 2.60 maps 127.0.0.1 to the machine's IP anyway (resolve_ip_for_localhost).
    common = ["--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats"]
    nodes: list[Node] = []
    try:
        head = _start_node("head", base, ["--head", "--port", str(port), "--include-dashboard=false", *common], env)
        nodes.append(head)
        cluster = RayCluster(address, head, head, base, env)
        _wait("head node alive", lambda: cluster.alive_nodes() >= 1, nodes, timeout)
        for k in range(1, n_nodes):
            worker = _start_node("worker" if k == 1 else f"worker{k}", base, ["--address", address, *common], env)
            nodes.append(worker)
            if k == 1:
                cluster.worker = worker
            else:
                cluster.more.append(worker)
        _wait(f"{n_nodes} nodes alive", lambda: cluster.alive_nodes() == n_nodes, nodes, timeout)
        yield cluster
    except BaseException:
        _teardown(nodes, base)
        raise
    left = _teardown(nodes, base)
    if left:  # a leak would outlive the test run and eat this shared machine's memory
        raise RuntimeError(f"Ray cluster teardown left processes running: {left}")


def _teardown(nodes: list[Node], base: Path) -> dict[str, dict[int, str]]:
    """Kill leftover drivers, stop the nodes (SIGTERM to all at once: each shuts down in parallel),
    then SIGKILL what is left."""
    reap_drivers()
    for n in nodes:
        n.terminate()
    for n in nodes:
        n.stop()
    left = {n.name: pids for n in nodes if (pids := n.pids())}
    shutil.rmtree(base, ignore_errors=True)
    return left
