"""A toy corpus builder for the execution-core tests and benchmark, and checks of its stages alone.

Inputs are small synthetic dicts; stages: `Render` (CPU: a tiny deterministic PNG, optional busy cost,
raises on some keys), `ToyModel` (a "model" stage: loads weights in setup, runs on actor pools,
persists its raw scores as intermediate Parquet, rejects low scores), `Finalize` (CPU: a valid `cot`
record with one array). Importing this module registers `gr3d build toy` (via GR3D_BUILDERS), which the
SIGKILL resume test drives as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.engine.build_cli import register_builder
from pipelines.engine.plan import Builder
from pipelines.engine.stage import Item, Reject, Resources, Stage


def spin(seconds: float) -> None:
    """Burn `seconds` of this thread's CPU time, holding the GIL: a fixed amount of per-sample work.

    CPU time, not wall time: on a shared machine a preempted spinner must not count waiting as work.
    """
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def png_bytes(value: int, w: int, h: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class Render(Stage):
    """CPU stage: draws the image; raises for keys whose value % fail_mod == 1 (a "corrupt input")."""

    batch_size = 4
    resources = Resources(cpus=1)

    def __init__(self, cost_ms: float = 0.0, fail_mod: int = 0):
        self.cost_ms = cost_ms
        self.fail_mod = fail_mod

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out = []
        for it in batch:
            if self.cost_ms:
                spin(self.cost_ms / 1000)
            if self.fail_mod and it["value"] % self.fail_mod == 1:
                raise ValueError(f"corrupt input {it['key']}")
            out.append({**it, "image_bytes": png_bytes(it["value"], it["w"], it["h"]), "image_ext": "png"})
        return out, []


class ToyModel(Stage):
    """Model stage: weights in setup(); scores each image; rejects low scores; persists its scores."""

    name = "toy_model"
    batch_size = 8
    is_model = True
    persist_intermediate = True
    resources = Resources(cpus=1, gpus=0)

    def __init__(self, threshold: float = 0.1, fail_setup: bool = False, cost_ms: float = 0.0,
                 calls_dir: str | None = None):
        self.threshold = threshold
        self.fail_setup = fail_setup
        self.cost_ms = cost_ms
        self.calls_dir = calls_dir
        self.weights: np.ndarray | None = None

    def setup(self) -> None:
        if self.fail_setup:
            raise OSError("weights file /nonexistent/toy.safetensors not found")
        self.weights = np.linspace(0.0, 1.0, 256)

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        assert self.weights is not None, "setup() did not run"
        if self.calls_dir:  # a trace of real model calls, for the intermediate-reuse test
            with open(os.path.join(self.calls_dir, f"{os.getpid()}.log"), "a") as fh:
                fh.write("".join(it["key"] + "\n" for it in batch))
        out, rej = [], []
        for it in batch:
            if self.cost_ms:
                spin(self.cost_ms / 1000)
            score = float(self.weights[sum(it["image_bytes"]) % 256])
            if score < self.threshold:
                rej.append(Reject(it["key"], self.name, "low_score", f"score {score:.4f} < {self.threshold}"))
            else:
                out.append({**it, "score": score})
        return out, rej

    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        return [{"key": o["key"], "score": o["score"]} for o in outputs]

    def from_rows(self, inputs: list[Item], rows: list[dict[str, Any]]) -> list[Item]:
        by_key = {it["key"]: it for it in inputs}
        return [{**by_key[r["key"]], "score": r["score"]} for r in rows]


class Finalize(Stage):
    """CPU stage: the last stage, emitting what shards.writer.Sample is built from (a valid cot record)."""

    batch_size = 16
    resources = Resources(cpus=0.5)

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        out = []
        for it in batch:
            x = round(it["score"] / 2, 3)
            record = {
                "key": it["key"], "corpus": "cot",
                "source": {"dataset": "toy", "file": "toy.json", "id": str(it["value"])},
                "image": {"ext": "png", "width": it["w"], "height": it["h"]},
                "camera": None, "arrays": ["feat"],
                "mentions": [{"text": "thing", "bbox2d": [x, x, x + 0.5, x + 0.5], "category": "thing",
                              "rewritten": None, "object_id": None}],
                "conversations": [{"task": "grounded_cot", "turns": [
                    {"from": "human", "value": "Where is the thing?"},
                    {"from": "gpt", "value": f"The thing<bbox>[{x}, {x}, {x + 0.5}, {x + 0.5}]</bbox><region>."}]}],
            }
            feat = np.arange(4, dtype=np.float32) * np.float32(it["score"])
            out.append({"key": it["key"], "image_bytes": it["image_bytes"], "image_ext": "png",
                        "record": record, "arrays": {"feat": feat}})
        return out, []


def toy_inputs(config: dict[str, Any]) -> list[Item]:
    n = int(config["n"])
    items = [{"key": f"toy/s{i:05d}", "value": i, "w": 8 + i % 5, "h": 6 + i % 3} for i in range(n)]
    return items[::-1]  # deliberately unsorted: the plan sorts


def toy_builder(n: int = 40, *, fail_mod: int = 7, cost_ms: float = 0.0, model_cost_ms: float = 0.0,
                fail_setup: bool = False, calls_dir: str | None = None, with_model: bool = True) -> Builder:
    stages: list[Stage] = [Render(cost_ms=cost_ms, fail_mod=fail_mod)]
    if with_model:
        stages.append(ToyModel(fail_setup=fail_setup, cost_ms=model_cost_ms, calls_dir=calls_dir))
    else:
        stages.append(_Score())
    stages.append(Finalize())
    config = {"n": n, "fail_mod": fail_mod, "cost_ms": cost_ms, "with_model": with_model}
    return Builder("toy", config, toy_inputs, stages)


class _Score(Stage):
    """CPU replacement of ToyModel (no actors): a constant score, for CPU-only (fused) pipelines."""

    name = "score"
    batch_size = 16

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        return [{**it, "score": 0.5} for it in batch], []


def _add_arguments(p: Any) -> None:
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--fail-mod", type=int, default=7)
    p.add_argument("--cost-ms", type=float, default=0.0)
    p.add_argument("--model-cost-ms", type=float, default=0.0)
    p.add_argument("--calls-dir", default=None)
    p.add_argument("--fail-setup", action="store_true", help="the model stage's setup fails (weights not found)")


def _make(args: Any) -> Builder:
    return toy_builder(args.n, fail_mod=args.fail_mod, cost_ms=args.cost_ms, model_cost_ms=args.model_cost_ms,
                       calls_dir=args.calls_dir, fail_setup=args.fail_setup)


register_builder("toy", _make, help="toy builder of the execution-core tests", add_arguments=_add_arguments)


def compared_files(build_dir: Path, *, with_plan: bool = False) -> dict[str, bytes]:
    """Everything that must be byte-identical across executors/interruptions: shards, parquet, manifest
    (and plan.json with `with_plan`). The tests and the benchmarks (bench/) compare builds with this.

    Stats files are compared without their `timing` entry (the only run-dependent part), the manifest
    without its code version.
    """
    out: dict[str, bytes] = {}
    for p in sorted((build_dir / "shards").iterdir()):
        if p.name.startswith("."):
            continue
        data = p.read_bytes()
        if p.name.endswith(".stats.json"):
            d = json.loads(data)
            d.pop("timing", None)
            data = json.dumps(d, sort_keys=True).encode()
        out[f"shards/{p.name}"] = data
    for name in ("index.parquet", "rejects.parquet"):
        out[name] = (build_dir / name).read_bytes()
    # The manifest byte for byte, except `code_version`: it names the checkout (git describe), which a
    # commit landing between two compared runs changes, whatever the executor.
    manifest = (build_dir / "manifest.json").read_bytes()
    version = json.loads(manifest)["code_version"]
    out["manifest.json"] = manifest.replace(json.dumps(version).encode(), b'"<code_version>"', 1)
    if with_plan:
        out["plan.json"] = (build_dir / "plan.json").read_bytes()
    return out


# --- the toy stages on their own ------------------------------------------------------------------

def test_png_is_deterministic_and_sized() -> None:
    from PIL import Image

    a, b = png_bytes(3, 9, 7), png_bytes(3, 9, 7)
    assert a == b and a.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(a)).size == (9, 7)


def test_toy_model_requires_setup_and_round_trips_rows() -> None:
    m = ToyModel()
    with pytest.raises(AssertionError):
        m.process([{"key": "k", "image_bytes": b"x"}])
    m.ensure_setup()
    items = [{"key": f"k{i}", "image_bytes": bytes([i, 7])} for i in range(20)]
    out, rej = m.process(items)
    assert len(out) + len(rej) == 20 and rej and out
    assert m.from_rows(items, m.to_rows(out)) == out
