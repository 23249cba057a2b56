"""`CotConfig`: every option of `gr3d build cot`, once (flags derived by `pipelines.corpora.options`).

The field order is the `--help` order. Choices and the annotator/model pairings are checked on
construction (`__post_init__`); what needs the disk (the sample world, the ground truth, local
checkpoints, the RefSpatial files) is checked by `make_cot_builder` when it resolves the config.
`out` and `num_gpus` come from the engine's common flags (`--out`, `--num-gpus`); `tagger_kwargs` /
`verifier_kwargs` are Python-only (extra annotator arguments for tests and experiments).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.corpora.cot.common import CACHE_RELPATH
from pipelines.corpora.options import option
from pipelines.sample_world.paths import add_sample_world_argument

__all__ = ["CotConfig", "GROUPS", "TAGGERS", "VERIFIERS", "REWRITES"]

TAGGERS = ("florence2", "oracle", "sim")
VERIFIERS = ("transformers", "openai", "oracle", "sim", "none")
REWRITES = ("generic", "all", "none")
GROUPS = {
    "inputs": "cot: inputs",
    "annotators": "cot: annotators",
    "sim": "cot: simulated annotators (--tagger sim / --verifier sim; docs/annotators.md)",
    "execution": "cot: model execution",
}


def _read_vocabulary(args: argparse.Namespace) -> list[str]:
    """`--vocabulary FILE`: one noun a line, `#` comments and blank lines skipped."""
    if args.extra_nouns is None:
        return []
    return [ln.strip() for ln in Path(args.extra_nouns).read_text(encoding="utf-8").splitlines()
            if ln.strip() and not ln.startswith("#")]


def _add_cache_flags(g: argparse._ActionsContainer) -> None:
    g.add_argument("--cache", default=None, help=f"response cache file (default: OUT/{CACHE_RELPATH})")
    g.add_argument("--no-cache", action="store_true", help="no response cache")


def _add_sim_rate_flags(g: argparse._ActionsContainer) -> None:
    """One `--sim-RATE` per entry of annotators.sim.SIM_RATES (None: the table's default)."""
    from annotators.sim import SIM_RATES

    for name, (default, text) in SIM_RATES.items():
        g.add_argument(f"--sim-{name.replace('_', '-')}", dest=f"sim_{name}", type=float, default=None,
                       metavar="P", help=f"{text} (default {default})")


def _engine_flag(g: argparse._ActionsContainer) -> None:
    """No flag of its own: `gr3d build` adds it to every builder (`pipelines.engine.build_cli`)."""


def _sim_rates_of(args: argparse.Namespace) -> dict[str, float]:
    from annotators.sim import SIM_RATES

    return {k: float(v) for k, v in ((k, getattr(args, f"sim_{k}", None)) for k in SIM_RATES) if v is not None}


@dataclass(frozen=True)
class CotConfig:
    """The options of a cot build (Python API: `make_cot_builder(CotConfig(...))`).

    `cache=True` puts the response cache at `OUT/cache/annotator_cache.sqlite` (needs `out`); a path
    puts it there; False/None disables it. `--tagger sim` / `--verifier sim` (annotators.sim) take
    `noise_scale`, `sim_seed` and `sim_rates` (overrides of `annotators.sim.SIM_RATES`).
    """

    # --- inputs
    refspatial: Sequence[str | os.PathLike[str]] = option(
        (), group="inputs", nargs="+", cli_default=[], metavar="FILE",
        help="RefSpatial JSON files (absolute, or relative to --data-root); required unless --sample-world")
    data_root: str | os.PathLike[str] | None = option(
        None, group="inputs", type=Path, metavar="DIR",
        help="data root: the RefSpatial root (or its parent), or a sample world")
    sample_world: str | os.PathLike[str] | None = option(None, group="inputs", add=add_sample_world_argument)
    image_root: str | None = option(None, group="inputs", metavar="DIR",
                                    help="image root relative to --data-root, for files outside "
                                    "the released layout (default: from the layout or sample_world.json)")
    depth_root: str | None = option(None, group="inputs", metavar="DIR",
                                    help="depth root relative to --data-root (with --image-root)")
    extra_nouns: Sequence[str] = option(
        (), group="inputs", flag="--vocabulary", type=Path, cli_default=None, metavar="VOCABULARY",
        from_args=_read_vocabulary,
        help="extra category nouns, one per line (added to the Omni3D/EmbodiedScan/RefSpatial list)")
    question_only: bool = option(False, group="inputs", action="store_true",
                                 help="only ground mentions whose category the question names")
    # --- annotators
    tagger: str = option("florence2", group="annotators", choices=TAGGERS,
                         help="florence2: the Florence-2 model; oracle: the sample world's ground truth (tests, demo); "
                         "sim: the ground truth with simulated, recorded errors")
    verifier: str = option("transformers", group="annotators", choices=VERIFIERS,
                           help="none keeps the tagger's boxes unverified (and rewrites nothing)")
    tagger_model: str | None = option(None, group="annotators",
                                      help="Florence-2 checkpoint directory (native transformers)")
    verifier_model: str | None = option(
        None, group="annotators",
        help="chat VLM checkpoint directory (transformers) or the served model name (openai)")
    endpoint: str | None = option(None, group="annotators",
                                  help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (default: OPENAI_BASE_URL)")
    api_key_env: str = option("OPENAI_API_KEY", group="annotators", help="environment variable holding the API key")
    ground_truth: str | os.PathLike[str] | None = option(None, group="annotators", metavar="FILE",
                                                         help="oracle: ground_truth.json (default: --data-root/...)")
    rewrite: str = option("generic", group="annotators", choices=REWRITES,
                          help="rewrite generic class names (default), every grounded mention, or nothing")
    min_confidence: float = option(0.5, group="annotators", type=float, help="verifier confidence below this rejects")
    allow_partial: bool = option(
        False, group="annotators", action="store_true",
        help="keep samples where some mentions stay ungrounded (default: every mention must ground)")
    max_candidates: int = option(8, group="annotators", type=int, help="candidate boxes per mention at most")
    cache: str | os.PathLike[str] | bool | None = option(
        True, group="annotators", add=_add_cache_flags,
        from_args=lambda a: None if a.no_cache else (a.cache or True))
    # --- simulated annotators
    noise_scale: float = option(
        1.0, group="sim", type=float,
        help="multiplies every sim error rate and the box deviation (0 = oracle, 1 = realistic default)")
    sim_seed: int = option(0, group="sim", type=int, help="seed of the simulated errors (with each mention's key)")
    sim_rates: dict[str, float] | None = option(None, group="sim", add=_add_sim_rate_flags, from_args=_sim_rates_of)
    # --- model execution
    device: str = option("auto", group="execution", help="auto (CUDA when the worker sees a GPU) | cpu | cuda")
    dtype: str | None = option(None, group="execution",
                               help="torch dtype name (default fp16/bf16 on CUDA, fp32 on CPU)")
    torch_threads: int | None = option(None, group="execution", type=int, help="torch CPU threads per worker")
    tagger_batch_size: int = option(8, group="execution", type=int, help="images per Florence-2 generate call")
    verifier_batch_size: int = option(4, group="execution", type=int,
                                      help="requests per verifier generate call (transformers backend)")
    num_beams: int = option(3, group="execution", type=int, help="Florence-2 beams (official examples: 3)")
    tagger_max_new_tokens: int = option(1024, group="execution", type=int, help="Florence-2 generation length cap")
    od_mode: str = option(
        "fallback", group="execution", choices=("fallback", "always", "never"),
        help="Florence-2 <OD> pass: only when phrase grounding finds nothing, on every image, or never")
    verifier_max_new_tokens: int = option(128, group="execution", type=int,
                                          help="verifier/rewriter generation length cap")
    timeout: float = option(60.0, group="execution", type=float, help="HTTP timeout (s)")
    max_retries: int = option(4, group="execution", type=int, help="HTTP retries (429/5xx/timeouts)")
    backoff: float = option(1.0, group="execution", type=float, help="HTTP retry backoff base (s)")
    max_concurrency: int = option(8, group="execution", type=int, help="HTTP requests in flight per worker")
    structured_output: bool = option(
        True, group="execution", flag="--no-structured-output", action="store_true", cli_default=False,
        dest="no_structured_output", from_args=lambda a: not a.no_structured_output,
        help="do not ask the endpoint for JSON-schema-constrained answers (response_format "
             "json_schema; sent by default, dropped by itself when the endpoint refuses it)")
    http_image_format: str = option(
        "png", group="execution", choices=("png", "jpeg"),
        help="image encoding sent to the endpoint (jpeg: ~4 ms vs ~95 ms of CPU per 1024x768 photo)")
    # --- from the engine's common flags / Python only
    out: str | os.PathLike[str] | None = option(None, group="execution", add=_engine_flag, from_args=lambda a: a.out)
    num_gpus: float | None = option(None, group="execution", add=_engine_flag,
                                    from_args=lambda a: getattr(a, "num_gpus", None))
    tagger_kwargs: dict[str, Any] | None = None
    verifier_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.tagger not in TAGGERS:
            raise ValueError(f"--tagger must be {'|'.join(TAGGERS)}, got {self.tagger!r}")
        if self.verifier not in VERIFIERS:
            raise ValueError(f"--verifier must be {'|'.join(VERIFIERS)}, got {self.verifier!r}")
        if self.rewrite not in REWRITES:
            raise ValueError(f"--rewrite must be {'|'.join(REWRITES)}, got {self.rewrite!r}")

    def check_annotators(self) -> None:
        """The annotator settings fit together: sim rates valid, each model backend has its model/endpoint.

        Called by `make_cot_builder` after the ground-truth check (so a missing ground truth is the error
        reported first, as users of the oracle expect); the checkpoints on disk are checked after this.
        """
        if "sim" in (self.tagger, self.verifier):
            self.sim_config()  # validates the rates
        if self.tagger == "florence2" and not self.tagger_model:
            raise ValueError("--tagger florence2 needs --tagger-model PATH (a florence-community/Florence-2-* "
                             "checkpoint)")
        if self.verifier == "transformers" and not self.verifier_model:
            raise ValueError("--verifier transformers needs --verifier-model PATH")
        if self.verifier == "openai" and not ((self.endpoint or os.environ.get("OPENAI_BASE_URL"))
                                              and self.verifier_model):
            raise ValueError("--verifier openai needs --endpoint URL (or OPENAI_BASE_URL) and --verifier-model NAME "
                             "(the served model)")

    def sim_config(self) -> dict[str, Any]:
        """The simulated annotators' settings as the manifest records them (rates validated)."""
        from annotators.sim import _rates

        return _rates(self.noise_scale, self.sim_seed, self.sim_rates).as_config()
