"""Per-stage progress lines (rows done, rate, ETA) on stderr, throttled, without tqdm.

Plain lines rather than redrawn bars, so the output stays readable in cluster logs and CI. Executors
feed counts with `update(stage, n)` (in-process) or `set_counts(...)` (snapshots gathered from remote
workers); `render()` prints at most once per `interval` seconds.

Rates are measured from the start of the run; ETA assumes every to-do input passes every stage,
so it is an upper bound for stages after a filter.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Counts rows per stage and shards written; prints `[gr3d] stage 120/500 24% 35.2/s ETA 0:00:11 | ...`."""

    def __init__(self, stages: list[str], total: int, total_shards: int, *, stream: TextIO | None = None,
                 interval: float = 5.0, enabled: bool = True, clock=time.monotonic):
        self.stages = list(stages)
        self.total = total
        self.total_shards = total_shards
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.enabled = enabled
        self._clock = clock
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {s: 0 for s in self.stages}
        self.shards = 0
        self._start = clock()
        self._last_render = -float("inf")

    def update(self, stage: str, n: int = 1) -> None:
        with self._lock:
            self.counts[stage] = self.counts.get(stage, 0) + n
        self.render()

    def set_counts(self, counts: dict[str, int], shards: int | None = None) -> None:
        with self._lock:
            for stage, n in counts.items():
                self.counts[stage] = n
            if shards is not None:
                self.shards = shards
        self.render()

    def shard_done(self, n: int = 1) -> None:
        with self._lock:
            self.shards += n
        self.render()

    def rate(self, stage: str) -> float:
        # Measured from the start of the run (setup and upstream stages included): conservative early on,
        # but never the absurd rate of "one batch in a microsecond".
        n = self.counts.get(stage, 0)
        if n == 0:
            return 0.0
        return n / max(self._clock() - self._start, 1e-3)

    def line(self) -> str:
        parts = []
        for s in self.stages:
            n, r = self.counts.get(s, 0), self.rate(s)
            pct = 100.0 * n / self.total if self.total else 100.0
            if n >= self.total or (self.total_shards and self.shards >= self.total_shards):
                eta_s = "done"
            else:
                eta_s = "ETA " + _fmt_eta((self.total - n) / r if r > 0 else float("nan"))
            parts.append(f"{s} {n}/{self.total} {pct:.0f}% {r:.1f}/s {eta_s}")
        elapsed = self._clock() - self._start
        parts.append(f"shards {self.shards}/{self.total_shards} elapsed {_fmt_eta(elapsed)}")
        return "[gr3d] " + " | ".join(parts)

    def render(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            if not force and now - self._last_render < self.interval:
                return
            self._last_render = now
            text = self.line()
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self.render(force=True)


# In-process sinks by token: DoFns on Beam's in-process runner are unpickled copies, so they find the
# driver's Progress through this registry; on a remote worker the token is unknown and updates are dropped.
_SINKS: dict[str, Progress] = {}


def register(token: str, progress: Progress) -> None:
    _SINKS[token] = progress


def unregister(token: str) -> None:
    _SINKS.pop(token, None)


def report(token: str | None, stage: str, n: int) -> None:
    """Count `n` rows of `stage` on the Progress registered under `token`, if it lives in this process."""
    if token is not None:
        p = _SINKS.get(token)
        if p is not None:
            p.update(stage, n)


def report_shard(token: str | None) -> None:
    """Count one written shard on the Progress registered under `token`, if it lives in this process."""
    if token is not None:
        p = _SINKS.get(token)
        if p is not None:
            p.shard_done()
