"""Session fixtures around one shared local Ray session (owned by the execution-core area).

Starting Ray costs ~3 s and ~700 MB, so every test that needs Ray shares one embedded session with 2
logical CPUs (this machine's size; the executors' resource plan must not deadlock there). Executors
reuse an already initialised Ray and leave it running, so the fixture alone starts and stops it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",  # no token file written to ~/.ray
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage-stats prompt or upload attempt
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """`ray.init(num_cpus=2, include_dashboard=False)` once per test session; shut down at the end."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # workers import tests.* stages
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
