"""The embedded one-node Ray of a build: started without the parts a build never uses, stopped at once.

`ray.init()` on a machine with no cluster starts, besides the GCS, the raylet, its two agents and the
workers: an autoscaler monitor (nothing to scale on one fixed node), the dashboard's API server (even
with `include_dashboard=False` it starts in "minimal" mode for the job and state APIs), a log monitor
and a reaper. On the 2-core box that was ~1.5 s of CPU before the first task, taken from the driver's
listing, plus ~1.1-1.4 s of `ray.shutdown()` waiting for each process to exit gracefully
(bench/executors.md, "Ray's fixed cost").

`start()` builds the same head node `ray.init()` builds (`ray._private.node.Node`, the class `ray.init`
itself instantiates) with the autoscaler monitor off (`RayParams(no_monitor=True)`, what `ray start
--no-monitor` does) and no API server, then connects this driver to it with `ray.init(address=...)`. The
log monitor stays (workers' output still reaches the console) and so does Ray's reaper. `stop()`
disconnects and kills the node's processes without waiting for them: the shards are durable before
it is called, and the build's own reaper (`pipelines.engine.reaper`) still guards every process.

The node's daemons (GCS, raylet, log monitor; the raylet's agents and workers after them) start in a
process group of their own, not the driver's. A SIGTERM to the driver's group (what SLURM and `kill -- -PGID`
send) then reaches the driver alone, which stops the build cleanly and ends Ray itself; when it reached the
raylet too, the raylet could die first and the driver's core worker exit with status 1 and no message (the
flake of tests/test_interrupt.py's group-SIGTERM test). Ctrl-C is unchanged: Ray's daemons block SIGINT
anyway. A SIGKILLed driver still takes them along: GCS, raylet and log monitor die with their parent (Ray's
PDEATHSIG), agents and workers are killed by the build's reaper (`pipelines.engine.reaper`, by tag).

Ray is pinned (pyproject.toml); should its private node API change, `start()` falls back to the plain
`ray.init(include_dashboard=False)` (`lean` is then False) rather than fail a build.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

log = logging.getLogger(__name__)

_NODE: list[Any] = []  # the node `start()` built (one at a time); empty after `stop()` or a plain ray.init


def _node_class() -> type | None:
    """A `Node` that starts no API server, or None when this Ray's private API is not the expected one."""
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams
    except ImportError:
        return None
    params = inspect.signature(RayParams).parameters
    api = getattr(Node, "start_api_server", None)
    if api is None or "no_monitor" not in params or "include_log_monitor" not in params:
        return None
    if set(inspect.signature(api).parameters) != {"self", "include_dashboard", "raise_on_failure"}:
        return None

    class BuildNode(Node):  # type: ignore[misc, valid-type]
        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            """No dashboard or job/state API: a build submits tasks only (and nothing connects to it)."""
            return None

    return BuildNode


@contextmanager
def _daemons_in_own_process_group() -> Iterator[None]:
    """Processes Ray's `services` module starts meanwhile go to a new process group (module docstring)."""
    import ray._private.services as services

    base = getattr(services, "ConsolePopen", None)
    if base is None or os.name != "posix":
        yield
        return

    class OwnGroupPopen(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("process_group", 0)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnGroupPopen
    try:
        yield
    finally:
        services.ConsolePopen = base


def start(log_to_driver: bool = True) -> bool:
    """Start an embedded Ray and connect this driver; True when it is the lean node, False for `ray.init()`."""
    cls = _node_class()
    if cls is None:
        log.debug("ray %s: private node API not as expected; plain ray.init()", ray.__version__)
        ray.init(include_dashboard=False, log_to_driver=log_to_driver)
        return False
    from ray._private.parameter import RayParams

    with _daemons_in_own_process_group():
        node = cls(RayParams(include_dashboard=False, no_monitor=True, include_log_monitor=log_to_driver),
                   head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)
    try:
        ray.init(address=node.address, log_to_driver=log_to_driver)
    except BaseException:
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=False)
        raise
    _NODE.append(node)
    return True


def stop() -> None:
    """Disconnect this driver and end the node `start()` built (or what `ray.init()` started)."""
    try:
        ray.shutdown()
    finally:
        while _NODE:
            _NODE.pop().kill_all_processes(check_alive=False, allow_graceful=True, wait=False)
