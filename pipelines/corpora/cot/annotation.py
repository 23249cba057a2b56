"""Annotator plumbing of the model stages: the spec an annotator is built from, GPU placement, the base stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.corpora.cot.common import ModelUnavailable, RowsPerSample
from pipelines.engine.stage import Resources, Stage


class AnnotatorSpec:
    """What a model stage builds in `setup()`: a factory name and its keyword arguments.

    Kept as plain data so stages pickle cheaply to Ray/Beam workers; the model is built where the stage
    lands. `device="auto"` resolves there (CUDA when that worker sees a GPU).
    """

    def __init__(self, name: str, kwargs: dict[str, Any] | None = None, *, cached: bool = True,
                 local_model: bool = False) -> None:
        self.name = name
        self.kwargs = dict(kwargs or {})
        self.cached = cached
        self.local_model = local_model

    def build(self, kind: str, cache_path: str | None, torch_threads: int | None) -> Any:
        from annotators.factory import make_tagger, make_verifier

        kw = dict(self.kwargs)
        if self.local_model:
            import torch

            if torch_threads:
                torch.set_num_threads(int(torch_threads))
            if kw.get("device", "auto") == "auto":
                kw["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if self.cached and cache_path:
            from annotators.cache import ResponseCache

            kw["cache"] = ResponseCache(cache_path)
        return (make_tagger if kind == "tagger" else make_verifier)(self.name, **kw)


def _gpus_for(local_model: bool, device: str) -> float:
    """GPUs a model stage declares (the executor's --num-gpus overrides it)."""
    if not local_model or device == "cpu":
        return 0.0
    if device.startswith("cuda"):
        return 1.0
    return 1.0 if Path("/dev/nvidia0").exists() else 0.0  # auto: a cheap look, no torch import here


class _ModelStage(RowsPerSample, Stage):
    """Shared plumbing of tag / verify / rewrite: annotator built in setup, declared resources."""

    persist_intermediate = True
    kind = "verifier"

    def __init__(self, spec: AnnotatorSpec, cache_path: str | None = None, gpus: float = 0.0,
                 torch_threads: int | None = None, batch_size: int | None = None) -> None:
        self.spec = spec
        self.cache_path = cache_path
        self.torch_threads = torch_threads
        self.annotator: Any = None
        # Per-instance overrides of the class defaults: only local models need long-lived (GPU) actors.
        self.is_model = spec.local_model
        self.resources = Resources(cpus=1.0, gpus=gpus)
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError("batch_size must be >= 1")
            self.batch_size = batch_size

    def setup(self) -> None:
        self.annotator = self.spec.build(self.kind, self.cache_path, self.torch_threads)
        if self.spec.local_model and hasattr(self.annotator, "setup"):
            self.annotator.setup()  # load once per worker; a failure stops the run with its cause

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["annotator"] = None  # never ship a loaded model or an open cache
        return state

    def _unavailable(self, exc: BaseException) -> ModelUnavailable:
        return ModelUnavailable(self.name, exc)
