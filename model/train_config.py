"""Typed training configuration: dataclasses mirrored by YAML, plus `--dotted.key value` overrides.

Why dataclasses and not a free dict: a typo in a 3-day run's config must fail at start, not be silently
ignored. Every YAML key and every command-line override is checked against the dataclass fields (unknown
keys are an error that names the close matches) and converted to the field's declared type (an int field
refuses "1.5", a bool field refuses "maybe"). The YAML files in `model/configs/` use exactly these names.

Imports nothing heavy (no torch), so `gr3d --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "ModelArgs", "DataArgs", "OptimArgs", "TrainConfig", "STAGE_LR", "load_config",
           "apply_overrides", "parse_override_args", "config_to_dict", "config_from_dict", "packaged_config"]

STAGE_LR = {1: 5e-5, 2: 1.5e-5}
"""The paper's learning rates (supp. 4.2): stage 1 spatial pretraining, stage 2 detection-CoT finetune."""


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


@dataclass
class ModelArgs:
    preset: str = "tiny"
    """`tiny` (random weights, CPU) or `gr3d-8b` (NVILA-Lite-8B shapes)."""
    init: str | None = None
    """Checkpoint directory to start from (ours or NVILA-Lite layout); None = random init of the preset."""
    image_size: int = 112
    """Encoder input side for the tiny preset (gr3d-8b is fixed at 448 by its SigLIP)."""
    dtype: str = "float32"
    """Parameter (master weight) dtype: float32 | bfloat16. On CUDA the forward runs under bf16 autocast."""
    gradient_checkpointing: bool = False
    """Recompute activations of the trainable transformer blocks in backward (memory for compute)."""
    attn_implementation: str = "sdpa"
    image_mode: str = "letterbox"
    """Images -> encoder inputs (model.imaging): letterbox | stretch (one canvas, s fixes only the aspect),
    focal (resize by canvas_focal/fx, centre pad/crop: the CPU presets' camera normalization) | tiles (NVILA
    dynamic tiling of the s-scaled image, gr3d-8b). Recorded in the checkpoint; evaluation follows it."""
    canvas_focal: float = 0.0
    """focal mode: focal length in encoder pixels every camera is rescaled to (S / (2 tan(hfov/2)) fits hfov)."""
    min_tiles: int = 1
    """tiles mode: fewest tiles (NVILA 1)."""
    max_tiles: int = 12
    """tiles mode: most tiles (NVILA 12), plus a thumbnail when more than one."""
    train_vision: bool = False
    """Also train the vision encoder in stage 1 (for a random-weight preset; a pretrained SigLIP stays frozen)."""


@dataclass
class DataArgs:
    root: str = "."
    """Directory holding one build directory per corpus name used in `mix`."""
    mix: str = "det3d@1"
    """`NAME@RATIO,...`: NAME is a build directory (`root/NAME`, or a path when it contains '/')."""
    batch_size: int = 8
    """Micro-batch per rank (global batch = batch_size x grad_accum x world size)."""
    num_workers: int = 2
    shuffle: bool = True
    shuffle_buffer: int = 1000
    resampled: bool = False
    """Draw shards with replacement, endlessly (multi-node); an epoch is then `samples_per_epoch` per rank."""
    samples_per_epoch: int = 0
    """Resampled only: samples per rank per epoch; 0 = the corpora's total size / world size."""
    max_seq_len: int = 2048
    """Longer conversations lose their last rounds; a sample whose first round is too long is skipped."""
    prefetch_factor: int = 2
    tasks: str = ""
    """Comma-separated conversation tasks to train on; empty = the stage's (`model.data.STAGE_TASKS`)."""
    blind: bool = False
    """Replace every image (and depth) by a constant: the blind baseline of bench/learning.py."""
    box_jitter: float = 0.0
    """Jitter region-prompt 2D boxes by up to this fraction of their size in training (model.augment); 0 = off."""
    det3d_answer: str = "grounded"
    """detect_3d answers: grounded (2D box + region, then 3D box) | direct (3D boxes only). Recorded in the
    checkpoint; the detect_3d evaluation decodes and parses that form."""

    @property
    def task_list(self) -> tuple[str, ...] | None:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip()) or None


@dataclass
class OptimArgs:
    lr: float | None = None
    """Peak learning rate; None = the stage's (5e-5 stage 1, 1.5e-5 stage 2)."""
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    """Linear warmup over this fraction of max_steps, then cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of the peak."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""


@dataclass
class TrainConfig:
    out: str = "runs/gr3d"
    """Run directory: checkpoints/, metrics.jsonl, loss.png, final/."""
    stage: int = 1
    """1: all but the vision encoder trains; 2: the LLM only."""
    seed: int = 0
    max_steps: int = 0
    """Optimizer steps; 0 = epochs x the estimated steps per epoch."""
    epochs: float = 1.0
    grad_accum: int = 1
    checkpoint_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints; 0 keeps all."""
    log_every: int = 10
    distributed: str = "auto"
    """auto (DDP when launched by torchrun with world size > 1) | none | ddp | fsdp."""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda."""
    threads: int = 0
    """torch.set_num_threads of the `gr3d train` process (0 = torch's default); DataLoader workers use 1 each."""
    log_samples: bool = False
    """Also write OUT/samples_rankNNNNN.jsonl: the sample keys of every step (audits, resume tests)."""
    export_final: bool = True
    """Write OUT/final/ with model.checkpoint.save_pretrained (what `gr3d eval --checkpoint` loads)."""
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)

    @property
    def lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else STAGE_LR[self.stage]

    def validate(self) -> TrainConfig:
        """Cross-field rules the types cannot express."""
        checks = [
            (self.stage in (1, 2), "stage must be 1 or 2"),
            (self.model.preset in ("tiny", "small", "gr3d-8b"), "model.preset must be tiny, small or gr3d-8b"),
            (self.model.dtype in ("float32", "bfloat16"), "model.dtype must be float32 or bfloat16"),
            (self.model.image_mode in ("letterbox", "stretch", "focal", "tiles"),
             "model.image_mode must be letterbox, stretch, focal or tiles"),
            (self.model.image_mode != "focal" or self.model.canvas_focal > 0,
             "model.image_mode focal needs model.canvas_focal > 0 (encoder pixels)"),
            (1 <= self.model.min_tiles <= self.model.max_tiles, "need 1 <= model.min_tiles <= model.max_tiles"),
            (0.0 <= self.data.box_jitter < 0.5, "data.box_jitter must be in [0, 0.5)"),
            (self.data.det3d_answer in ("grounded", "direct"), "data.det3d_answer must be grounded or direct"),
            (self.distributed in ("auto", "none", "ddp", "fsdp"), "distributed must be auto|none|ddp|fsdp"),
            (self.max_steps >= 0 and self.epochs > 0, "max_steps >= 0 and epochs > 0"),
            (self.grad_accum >= 1 and self.data.batch_size >= 1, "grad_accum and data.batch_size >= 1"),
            (self.data.num_workers >= 0 and self.data.max_seq_len > 0, "data.num_workers >= 0, max_seq_len > 0"),
            (self.optim.lr is None or self.optim.lr > 0, "optim.lr must be > 0"),
            (0.0 <= self.optim.warmup_ratio < 1.0, "optim.warmup_ratio in [0, 1)"),
            (0.0 <= self.optim.min_lr_ratio <= 1.0, "optim.min_lr_ratio in [0, 1]"),
            (self.optim.grad_clip >= 0, "optim.grad_clip >= 0"),
            (self.checkpoint_every >= 0 and self.log_every >= 1, "checkpoint_every >= 0, log_every >= 1"),
            (self.threads >= 0, "threads >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        return self


# ---------------------------------------------------------------------------------------------- conversion

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or a command-line string) as type `tp`, or ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
            return None
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - only our dataclasses


def _unknown(key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def config_from_dict(data: Mapping[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, type-checking every value; unknown keys are errors."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown(key, names)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = config_from_dict(v or {}, tp, key + ".")
        else:
            kwargs[k] = _convert(v, tp, key)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, type, default) of every leaf field, in declaration order: what `--KEY VALUE` accepts."""
    out: list[tuple[str, str, Any]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_keys(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f"{prefix}{f.name}", _type_name(tp), default))
    return out


def config_keys_help() -> str:
    """The config keys as `gr3d train --help` lists them (generated from the typed config, never by hand)."""
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows) + 2
    tw = max(len(t) for _, t, _ in rows) + 2
    lines = ["config keys (override any with --KEY VALUE; defaults before the --config file applies):"]
    lines += [f"  --{k:<{width}}{t:<{tw}}default: {d!r}" for k, t, d in rows]
    return "\n".join(lines)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (what the YAML holds, and what checkpoints record)."""
    return dataclasses.asdict(cfg)


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, str]) -> TrainConfig:
    """Set dotted keys (`optim.lr`, `data.batch_size`) from strings, type-checked, on a copy of `cfg`."""
    d = config_to_dict(cfg)
    for dotted, raw in overrides.items():
        parts = dotted.split(".")
        cls: type = TrainConfig
        node = d
        for i, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                raise _unknown(".".join(parts[: i + 1]), list(hints))
            tp = hints[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(f"{dotted} is a section; set one of its keys ({dotted}.KEY)")
                cls, node = tp, node[part]
            else:
                if not last:
                    raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section")
                node[part] = _convert(raw, tp, dotted)
    return config_from_dict(d)


def parse_override_args(args: Sequence[str]) -> dict[str, str]:
    """`--a.b VALUE` / `--a.b=VALUE` pairs -> {"a.b": "VALUE"}; anything else is an error."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"expected --KEY VALUE overrides, got {a!r}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {a} has no value")
            k, v = a[2:], args[i + 1]
            i += 2
        out[k.replace("-", "_")] = v
    return out


def packaged_config(name: str) -> Path:
    """Path of a config shipped in `model/configs/` (e.g. `tiny`, `gr3d-8b-stage1`)."""
    p = Path(__file__).parent / "configs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not p.is_file():
        avail = sorted(q.stem for q in p.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no packaged config {name!r}; available: {', '.join(avail)}")
    return p


def load_config(path: str | Path, overrides: Mapping[str, str] | None = None) -> TrainConfig:
    """Read a YAML config (a path, or the name of a packaged one), apply overrides, validate."""
    import yaml

    p = Path(path)
    if not p.is_file() and not p.suffix:
        p = packaged_config(str(path))
    data = yaml.safe_load(p.read_text()) or {}
    cfg = config_from_dict(data)
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg.validate()
