"""A clean stop on SIGINT / SIGTERM: one exception, one line for the user, the conventional exit code.

Why a module of its own: every executor (and `gr3d train`) needs the same three facts, and the
executors get rewritten; they only have to call `rearm()` after anything that installs signal handlers
of its own, and let `Interrupted` propagate through their `finally` blocks. It sits in `shards` (the
layer of writing outputs safely) because both the build engine and `model` (training) use it, and
`model` may import `shards` but not `pipelines`. It imports nothing of ours.

- `stop_on_signals()` installs handlers for SIGINT and SIGTERM in the main thread for the duration of a
  `with` block. The first signal raises `Interrupted` where the main thread is (a KeyboardInterrupt
  subclass, so no `except Exception` of a library swallows it, and every `finally` on the way runs:
  pools are shut down, half-written shards are discarded). Further signals while the run unwinds are
  ignored, so a second Ctrl-C cannot cut the clean-up short (SIGKILL still can, and resume covers it).
- `deferred()` marks a critical section (a checkpoint being written): a signal inside it is acted on
  when it ends, so a stop never leaves that write half done.
- `rearm()` puts our handlers back on top. `ray.init()` installs its own SIGTERM handler plus a native
  failure-signal handler that prints a stack dump (`*** SIGTERM received ... PC: @ ...`) before exiting;
  re-installing ours through `signal.signal` replaces both at the C level.
- `Interrupted.exit_code` is 128 + the signal number (130 for SIGINT, 143 for SIGTERM), what shells and
  batch schedulers expect of a process stopped by a signal.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM. `str()` is the one line shown to the user."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = int(signum)
        self.told = message is not None  # the caller has said where the run stands
        self.message = message or f"interrupted by {self.signal_name}"
        super().__init__(self.message)

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def with_message(self, message: str) -> Interrupted:
        """The same interruption, told in the caller's words (e.g. how many shards are done)."""
        return Interrupted(self.signum, message)

    def __str__(self) -> str:
        return self.message


# The handler of the innermost active `stop_on_signals` block (None outside any block).
_active: list[Callable[[int, FrameType | None], Any]] = []
_deferring: list[bool] = []  # nesting depth of `deferred()` blocks
_pending: list[int] = []  # signals that arrived inside them
_fired: list[list[int]] = []  # per active `stop_on_signals` block: the signals it received, in order


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT / SIGTERM raise `Interrupted` once in the main thread; restored after.

    Off the main thread (where Python cannot install handlers) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if _deferring:  # inside `deferred()`: raised when the block ends
            _pending.append(signum)
            return
        if fired:  # already unwinding: let the clean-up finish
            if len(fired) == 1:
                print(f"gr3d: already stopping after {signal.Signals(fired[0]).name}; "
                      "send SIGKILL to stop at once (resume still works)", file=sys.stderr, flush=True)
            fired.append(signum)
            return
        fired.append(signum)
        raise Interrupted(signum)

    old = {s: signal.getsignal(s) for s in SIGNALS}
    _active.append(handler)
    _fired.append(fired)
    try:
        _install(handler)
        yield
    finally:
        _active.remove(handler)
        _fired.remove(fired)
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def stopping() -> int | None:
    """The first signal the innermost `stop_on_signals` block received, or None.

    Why: the `Interrupted` a signal raises can be swallowed or converted by library code it lands in (Ray
    catches KeyboardInterrupt to cancel its tasks; its workers got the same SIGTERM and fail first), so the
    caller sees some other error. Whoever handles that error asks this to report the stop as a stop.
    """
    return _fired[-1][0] if _fired and _fired[-1] else None


@contextmanager
def deferred() -> Iterator[None]:
    """A critical section: a signal arriving inside it raises `Interrupted` only when the block ends.

    For writes that must not be cut in half even by a clean stop (a training checkpoint and the
    metrics that point at it): the stop then happens right after them, with them complete.
    """
    _deferring.append(True)
    try:
        yield
    finally:
        _deferring.pop()
    if not _deferring and _pending and _active:
        signum = _pending[0]
        _pending.clear()
        _active[-1](signum, None)


def rearm() -> None:
    """Re-install the active block's handlers (after a library such as Ray installed its own)."""
    if _active and threading.current_thread() is threading.main_thread():
        _install(_active[-1])


def _install(handler: Callable[[int, FrameType | None], Any]) -> None:
    for s in SIGNALS:
        signal.signal(s, handler)


__all__ = ["SIGNALS", "Interrupted", "deferred", "rearm", "stop_on_signals", "stopping"]
