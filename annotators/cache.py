"""Persistent response cache for model calls (sqlite).

Why: model calls are the expensive, non-deterministic-in-practice part of a build (a served model
can be updated, a GPU batch can change numerics). Caching the raw response of every *finished*
call, keyed by what determines it, makes a re-run or a resumed run repeat zero calls and replay
exactly the same raw text, so the downstream parsing and decisions are reproducible too.

Key = sha256 over (model id, prompt version, prompt, image sha256), each field length-prefixed so
no two different tuples collide by concatenation. The model id should name the weights AND the
decoding settings that change the output (the backends build it that way).

Why sqlite: one file, transactional, safe with several processes (Ray/Beam workers on one
machine) through WAL mode and a busy timeout; `INSERT OR IGNORE` makes concurrent puts of the
same key harmless (first writer wins, both wrote an answer to the same question). Each thread and
each process gets its own connection (sqlite connections must not cross threads or forks). WAL
needs a local filesystem: on NFS-like mounts give each worker host its own cache file.

Raw responses are stored even when they later fail to parse: the failure is then replayed too,
and the repair attempt is a different prompt with its own key.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "cache_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model_id TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    response TEXT NOT NULL
)
"""


def cache_key(model_id: str, prompt_version: str, prompt: str, image_sha: str) -> str:
    """sha256 hex of the length-prefixed fields; the identity of one model call."""
    h = hashlib.sha256()
    for field in (model_id, prompt_version, prompt, image_sha):
        b = field.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class ResponseCache:
    """Key -> raw response text, persisted in one sqlite file.

    `hits`/`misses` count `get` outcomes in this process (thread-safe); `puts` counts new rows
    this process wrote.
    """

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._timeout_s = timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.puts = 0
        self._conn()  # create the file and table now, so errors show at construction

    # one connection per (process, thread)
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        conn = sqlite3.connect(self.path, timeout=self._timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={int(self._timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def get(self, key: str) -> str | None:
        """The stored response for `key`, or None; counts a hit or a miss."""
        row = self._conn().execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        with self._lock:
            if row is None:
                self.misses += 1
            else:
                self.hits += 1
        return None if row is None else str(row[0])

    def put(self, key: str, response: str, *, model_id: str = "", prompt_version: str = "") -> bool:
        """Store `response` under `key` unless present; True when this call inserted the row."""
        cur = self._conn().execute(
            "INSERT OR IGNORE INTO responses (key, model_id, prompt_version, response) VALUES (?, ?, ?, ?)",
            (key, model_id, prompt_version, response),
        )
        inserted = cur.rowcount == 1
        if inserted:
            with self._lock:
                self.puts += 1
        return inserted

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self._conn().execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def stats(self) -> dict[str, int]:
        """Counters of this process, for run logs and tests."""
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "puts": self.puts}

    def close(self) -> None:
        """Close this thread's connection (other threads' close when they exit)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for Ray/Beam workers: ship the path, reopen on the other side.
        return {"path": str(self.path), "timeout_s": self._timeout_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["timeout_s"])  # type: ignore[misc]
