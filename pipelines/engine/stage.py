"""The stage abstraction every corpus builder is made of.

A stage is a small class with declared resources, a batch size, a `setup()` that runs once per worker
(models load there) and `process(batch) -> (outputs, rejects)`. Stages know nothing of Ray or Beam: the
executors in `pipelines.engine.executors` decide where a stage runs, from what it declares here. That keeps one
stage class valid on a laptop (plain loop), on a Ray cluster (tasks / actor pools) and on a Beam runner.

Items flowing between stages are plain dicts with a `"key"`; the last stage emits dicts that
`shards.writer.Sample` can be built from (key, image_bytes, image_ext, record, arrays).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

Item = dict[str, Any]
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs: executors size pools and request GPUs from this."""

    cpus: float = 1.0
    gpus: float = 0.0
    gpu_memory_gb: float = 0.0

    def __post_init__(self) -> None:
        if self.cpus < 0 or self.gpus < 0 or self.gpu_memory_gb < 0:
            raise ValueError(f"resources must be >= 0, got {self}")


@dataclass(frozen=True)
class Reject:
    """One input that did not become a sample, and why (a row of `rejects.parquet`).

    `reason` is a snake_case code that is counted in stats and the manifest; `message` is free text.
    """

    key: str
    stage: str
    reason: str
    message: str = ""

    def __post_init__(self) -> None:
        # Checked here, inside the stage, so a bad reason code rejects that sample instead of failing the
        # shard's write later (rejects.parquet rows are validated against the reject schema).
        if not isinstance(self.reason, str) or not _REASON.fullmatch(self.reason):
            raise ValueError(f"reject reason must be a snake_case code ([a-z][a-z0-9_]*, <= 64 chars), got {self.reason!r}")
        if not isinstance(self.stage, str) or not self.stage:
            raise ValueError("reject stage must be a non-empty string")
        if not isinstance(self.key, str) or not isinstance(self.message, str):
            raise TypeError("reject key and message must be strings")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _snake(name: str) -> str:
    """`ToyModel` -> `toy_model`, `VLMVerifier` -> `vlm_verifier`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


class StageSetupError(RuntimeError):
    """A stage's `setup()` failed: the whole run stops, since no sample of that stage could succeed."""

    def __init__(self, stage: str, cause: BaseException):
        self.stage = stage
        self.cause_repr = f"{type(cause).__name__}: {cause}"
        super().__init__(f"setup() of stage {stage!r} failed: {self.cause_repr}")

    def __reduce__(self):  # picklable across Ray / Beam worker boundaries with its message intact
        return (_rebuild_setup_error, (self.stage, self.cause_repr))

    def to_record(self) -> dict[str, str]:
        """Its fields as JSON-able data (`pipelines.engine.setup_error` carries them to the driver)."""
        return {"stage": self.stage, "cause": self.cause_repr}

    @classmethod
    def from_record(cls, record: dict[str, str]) -> StageSetupError:
        """The error `to_record` describes, with the same message (the subclass, if any, is not kept)."""
        return _rebuild_setup_error(str(record["stage"]), str(record["cause"]))


def _rebuild_setup_error(stage: str, cause_repr: str) -> StageSetupError:
    err = StageSetupError.__new__(StageSetupError)
    err.stage, err.cause_repr = stage, cause_repr
    RuntimeError.__init__(err, f"setup() of stage {stage!r} failed: {cause_repr}")
    return err


class Stage:
    """Base class of a pipeline stage. Subclass it and override `process` (and `setup` for models).

    Class attributes a subclass may override:
    - `name`: used in reject rows, stats and progress lines (default: the class name in snake case).
    - `resources`: per-worker needs; `gpus > 0` makes the stage run on an actor pool with GPUs.
    - `batch_size`: how many items `process` receives at once.
    - `is_model`: True for stages that hold a loaded model; they run on long-lived actors / DoFn
      instances so `setup()` is paid once per worker, not once per batch.
    - `persist_intermediate`: True to write this stage's raw outputs per chunk to
      `BUILD/intermediate/NAME/NNNNNN.parquet` (see `to_rows` / `from_rows`); a re-run of a chunk whose
      intermediate exists reuses it instead of calling the model again.

    A stage instance is pickled to workers before `setup()` runs, so keep construction light: store
    configuration (paths, thresholds) in `__init__`, load heavy state in `setup()`.
    """

    name: ClassVar[str] = ""
    resources: ClassVar[Resources] = Resources()
    batch_size: ClassVar[int] = 16
    is_model: ClassVar[bool] = False
    persist_intermediate: ClassVar[bool] = False

    _ready: bool = False  # set per instance by ensure_setup(); instances start un-set-up on every worker

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__)
        if cls.batch_size < 1:
            raise ValueError(f"{cls.__name__}.batch_size must be >= 1")

    @property
    def runs_on_actors(self) -> bool:
        """Whether executors should give this stage long-lived workers (model stages, GPU stages)."""
        return self.is_model or self.resources.gpus > 0

    def __getstate__(self) -> dict[str, Any]:
        # A pickled copy is a fresh worker's stage: it must run setup() again where it lands.
        state = self.__dict__.copy()
        state.pop("_ready", None)
        return state

    def setup(self) -> None:
        """Load models / open resources, once per worker. Default: nothing."""

    def ensure_setup(self) -> None:
        """Run `setup()` once; a failure becomes `StageSetupError` so executors stop the run cleanly."""
        if self._ready:
            return
        try:
            self.setup()
        except Exception as exc:  # noqa: BLE001 - any setup failure is fatal, with its cause named
            raise StageSetupError(self.name, exc) from exc
        self._ready = True

    def process(self, batch: list[Item]) -> tuple[list[Item], list[Reject]]:
        """Turn a batch of items into outputs (dicts with "key") and rejects. Must be deterministic."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Release what `setup()` acquired. Default: nothing."""

    # --- intermediate persistence (model stages) -------------------------------------------------
    def to_rows(self, outputs: list[Item]) -> list[dict[str, Any]]:
        """Flat Parquet rows (one per output, each with "key") recording this stage's decisions.

        Only called when `persist_intermediate` is True. Keep rows small and columnar (strings, numbers,
        JSON text): they are what the audit reads and what `from_rows` rebuilds outputs from.
        """
        raise NotImplementedError(f"{type(self).__name__} sets persist_intermediate but has no to_rows()")

    def from_rows(self, inputs: list[Item], rows: list[dict[str, Any]]) -> list[Item]:
        """Rebuild this stage's outputs from its inputs and the rows `to_rows` wrote earlier.

        `rows` holds only the successful outputs (rejects are restored by the executor).
        """
        raise NotImplementedError(f"{type(self).__name__} sets persist_intermediate but has no from_rows()")
