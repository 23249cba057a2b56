"""Grounded chain-of-thought corpus from RefSpatial: `gr3d build cot`.

GR3D learns to follow every entity it mentions by its 2D box and a region token. This builder turns
RefSpatial conversations into such text: it finds the object mentions of the reasoning/answer turns,
asks a tagger (Florence-2, or the oracle) for candidate boxes, a VLM (or the oracle) which candidate
is the mentioned object, assigns boxes to mentions one-to-one, optionally rewrites generic class
names into instance descriptions, and writes

    "The red chair<bbox>[0.12, 0.40, 0.31, 0.93]</bbox><region> is left of ..."

with point answers `[(0.42, 0.61)]` converted to the project grammar (zero-size boxes).

Stages (pipelines.engine.stage.Stage; executors decide where they run):

| stage   | kind                      | what                                                            | intermediate |
|---------|---------------------------|-----------------------------------------------------------------|--------------|
| read    | CPU                       | record checks, image header, mention extraction, point lists     |              |
| tag     | model (GPU actor pool) *  | candidate boxes per mention                                     | tag/         |
| verify  | model (GPU actor pool) *  | the VLM's choice among the candidates, raw text kept            | verify/      |
| assign  | CPU                       | one-to-one mention <-> box (Hungarian on the verifier's scores) | assign/      |
| rewrite | model (GPU actor pool) *  | instance descriptions for generic mentions (optional)           | rewrite/     |
| compose | CPU                       | grounded text, points in the grammar, the cot record            |              |

(*) with a local model (florence2 / transformers). The oracle and the HTTP verifier are cheap to set
up and run as plain CPU stages; an HTTP verifier's concurrency comes from its client, not from GPUs.

Intermediate Parquet (`BUILD/intermediate/STAGE/NNNNNN.parquet`, columns in docs/cot.md) records
every candidate, verdict, assignment and rewrite, for the audit; a re-run of a chunk whose
intermediate exists reuses it. All model answers also go to the response cache
(`BUILD/cache/annotator_cache.sqlite` by default, kept by `--overwrite`), so a rebuild makes zero
model calls.

Nothing is dropped silently: every input becomes a sample or a reject row whose reason says why
(see `REJECT_REASONS`). Model output that stays unusable after the annotators' repair retry is a
reject with its raw text in the message and in the verify/rewrite Parquet. An endpoint that cannot
be reached stops the run (`ModelUnavailable`): turning it into rejects would silently empty the
corpus.

This module registers `gr3d build cot` and imports nothing heavy at module level.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipelines.corpora.cot.annotation import AnnotatorSpec, _gpus_for
from pipelines.corpora.cot.common import CACHE_RELPATH, REJECT_REASONS, ModelUnavailable
from pipelines.corpora.cot.model_stages import RewriteStage, TagStage, VerifyStage
from pipelines.corpora.cot.stages import AssignStage, ComposeStage, ReadStage
from pipelines.engine.build_cli import register_builder
from pipelines.engine.plan import Builder
from pipelines.engine.stage import Item, Reject, Stage
from pipelines.sample_world.paths import add_sample_world_argument, sample_world_of

__all__ = [
    "CACHE_RELPATH",
    "REJECT_REASONS",
    "ModelUnavailable",
    "ReadStage",
    "TagStage",
    "VerifyStage",
    "AssignStage",
    "RewriteStage",
    "ComposeStage",
    "AnnotatorSpec",
    "make_cot_builder",
    "resolve_refspatial_files",
    "iter_inputs",
    "list_inputs",
]


def resolve_refspatial_files(files: Sequence[str | os.PathLike[str]], data_root: str | os.PathLike[str],
                             image_root: str | None = None, depth_root: str | None = None) -> list[dict[str, str]]:
    """Each `--refspatial FILE` with the roots its image/depth paths are relative to, and its tag.

    In order: an explicit `--image-root` (relative to the data root); the data root's
    `sample_world.json` listing; the released RefSpatial layout (`pipelines.sources.refspatial
    .DEFAULT_LAYOUT`, with the RefSpatial root at DATA_ROOT or DATA_ROOT/RefSpatial); else the data
    root itself. The tag (used in keys and `source.file`) is the file's path under the RefSpatial
    root without `.json`, e.g. "3D/choice_qa".
    """
    from pipelines.sources.refspatial import DEFAULT_LAYOUT

    root = Path(data_root).resolve()
    sw_roots: dict[str, tuple[str, str]] = {}
    sw = root / "sample_world.json"
    if sw.is_file():
        for f in json.loads(sw.read_text()).get("files", {}).get("refspatial", []):
            sw_roots[str((root / f["json"]).resolve())] = (f["image_root"], f["depth_root"])
    out = []
    for f in files:
        p = Path(f)
        if not p.is_absolute():
            p = next((c for c in (root / p, root / "RefSpatial" / p) if c.exists()), p)
        p = p.resolve()
        if not p.is_file():
            raise FileNotFoundError(f"--refspatial {f}: no such file (also looked under {root})")
        rs_root = root / "RefSpatial" if (root / "RefSpatial").is_dir() and p.is_relative_to(root / "RefSpatial") \
            else root
        rel = p.relative_to(rs_root).as_posix() if p.is_relative_to(rs_root) else p.name
        tag = rel[: -len(".json")] if rel.endswith(".json") else rel
        if image_root is not None:
            img, dep = str(root / image_root), str(root / depth_root) if depth_root else None
        elif str(p) in sw_roots:
            img, dep = (str(root / r) for r in sw_roots[str(p)])
        elif rel in DEFAULT_LAYOUT:
            img, dep = (str(rs_root / r) for r in DEFAULT_LAYOUT[rel])
        else:
            img, dep = str(root), str(root / depth_root) if depth_root else None
        out.append({"json": str(p), "image_root": img, "depth_root": dep, "tag": tag})
    return out


def list_inputs(config: dict[str, Any]) -> list[Item]:
    """`iter_inputs` as a list (tests and tools that index or reuse the listing; builds stream it)."""
    return list(iter_inputs(config))


def iter_inputs(config: dict[str, Any]) -> Iterator[Item]:
    """One item per RefSpatial record, yielded as the streaming reader parses it (the plan encodes each
    item as it comes); records the reader rejects are items carrying their reject.

    So read rejects flow through the pipeline and are counted like every other outcome
    (written + rejected = input). A whole unreadable file (not UTF-8, invalid or truncated JSON) is one
    `bad_source_file` item (with the records read before the damage), as in det3d and pointmaps.
    """
    from pipelines.sources.common import SourceError
    from pipelines.sources.refspatial import RefSpatialFile, read_refspatial
    from shards.keys import make_key

    specs = [RefSpatialFile(f["json"], f["image_root"], f["depth_root"], tag=f["tag"]) for f in config["files"]]
    for spec in specs:
        try:
            for r in read_refspatial([spec], check_files=True):
                if isinstance(r, Reject):
                    yield {"key": r.key, "read_reject": [r.reason, r.message]}
                    continue
                yield {"key": r["key"], "id": r["id"], "source": {**r["source"], "record_index": r["record_index"]},
                       "image_paths": r["image_paths"], "conversations": r["conversations"]}
        except SourceError as exc:  # the file as a whole is unusable: one reject row, the other files go on
            yield {"key": make_key("cot", "source_file", spec.file_tag()), "read_reject": ["bad_source_file", str(exc)]}


# ============================================================================ builder
def _check_checkpoint(model: str, flag: str) -> None:
    """Fail at plan time, in one line naming `flag`, when a local checkpoint is missing.

    A hub id (`namespace/name`, nothing more) is left to the loader; anything that reads as a path
    (absolute, `./`, `~`, deeper than one slash, or present on disk) must be a directory with a
    `config.json`. Otherwise the run would start workers and fail in every one of them.
    """
    p = Path(model).expanduser()
    pathlike = p.is_absolute() or model.startswith((".", "~")) or model.count("/") > 1 or p.exists()
    if not pathlike:
        return
    if not p.is_dir():
        raise ValueError(f"{flag} {model}: no checkpoint directory there (pass {flag} DIR of a downloaded checkpoint)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{flag} {model}: not a transformers checkpoint (no config.json in it)")


def make_cot_builder(
    refspatial: Sequence[str | os.PathLike[str]],
    data_root: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    tagger: str = "florence2",
    verifier: str = "transformers",
    tagger_model: str | None = None,
    verifier_model: str | None = None,
    endpoint: str | None = None,
    ground_truth: str | None = None,
    image_root: str | None = None,
    depth_root: str | None = None,
    rewrite: str = "generic",
    min_confidence: float = 0.5,
    allow_partial: bool = False,
    question_only: bool = False,
    max_candidates: int = 8,
    extra_nouns: Sequence[str] = (),
    cache: str | None | bool = True,
    device: str = "auto",
    dtype: str | None = None,
    num_gpus: float | None = None,
    torch_threads: int | None = None,
    tagger_batch_size: int = 8,
    verifier_batch_size: int = 4,
    num_beams: int = 3,
    tagger_max_new_tokens: int = 1024,
    od_mode: str = "fallback",
    verifier_max_new_tokens: int = 128,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 60.0,
    max_retries: int = 4,
    backoff: float = 1.0,
    max_concurrency: int = 8,
    http_image_format: str = "png",
    structured_output: bool = True,
    tagger_kwargs: dict[str, Any] | None = None,
    verifier_kwargs: dict[str, Any] | None = None,
    noise_scale: float = 1.0,
    sim_seed: int = 0,
    sim_rates: dict[str, float] | None = None,
) -> Builder:
    """The cot Builder (Python API of `gr3d build cot`; see the module docstring for the stages).

    `cache=True` puts the response cache at `OUT/cache/annotator_cache.sqlite` (needs `out`); a path
    puts it there; False/None disables it. `tagger_kwargs`/`verifier_kwargs` pass extra arguments to
    the annotators (e.g. `generate_kwargs`), for tests and experiments. The config (recorded in the
    manifest; its digest guards resumes) holds what changes the output: files, annotators, models,
    thresholds, prompt versions; not the endpoint URL, the cache path or batch sizes. `--tagger sim` /
    `--verifier sim` (annotators.sim) take `noise_scale`, `sim_seed` and `sim_rates` (overrides of
    `annotators.sim.SIM_RATES`), recorded in the config under "sim".
    """
    from annotators.prompts import PROMPT_VERSION, TAGGER_VERSION

    if tagger not in ("florence2", "oracle", "sim"):
        raise ValueError(f"--tagger must be florence2|oracle|sim, got {tagger!r}")
    if verifier not in ("transformers", "openai", "oracle", "sim", "none"):
        raise ValueError(f"--verifier must be transformers|openai|oracle|sim|none, got {verifier!r}")
    if rewrite not in ("generic", "all", "none"):
        raise ValueError(f"--rewrite must be generic|all|none, got {rewrite!r}")
    root = Path(data_root).resolve()
    gt = str(Path(ground_truth).resolve()) if ground_truth else str(root / "ground_truth.json")
    uses_gt = bool({"oracle", "sim"} & {tagger, verifier})
    if uses_gt and not Path(gt).is_file():
        raise FileNotFoundError(f"the oracle/sim annotators need the ground truth: {gt} not found (--ground-truth)")
    sim_config = None
    if "sim" in (tagger, verifier):
        from annotators.sim import _rates

        sim_config = _rates(noise_scale, sim_seed, sim_rates).as_config()  # validates the rates
        sim_kw = {"gt_path": gt, "noise_scale": float(noise_scale), "seed": int(sim_seed),
                  "rates": dict(sim_config["rates"])}
    if tagger == "florence2" and not tagger_model:
        raise ValueError("--tagger florence2 needs --tagger-model PATH (a florence-community/Florence-2-* checkpoint)")
    if verifier == "transformers" and not verifier_model:
        raise ValueError("--verifier transformers needs --verifier-model PATH")
    if verifier == "openai" and not ((endpoint or os.environ.get("OPENAI_BASE_URL")) and verifier_model):
        raise ValueError("--verifier openai needs --endpoint URL (or OPENAI_BASE_URL) and --verifier-model NAME "
                         "(the served model)")
    if tagger == "florence2":
        _check_checkpoint(str(tagger_model), "--tagger-model")
    if verifier == "transformers":
        _check_checkpoint(str(verifier_model), "--verifier-model")

    files = resolve_refspatial_files(refspatial, root, image_root, depth_root)
    if cache is True:
        if out is None:
            raise ValueError("cache=True needs `out` (the cache lives in OUT/cache/); pass a path or cache=None")
        cache_path: str | None = str(Path(out).resolve() / CACHE_RELPATH)
    else:
        cache_path = str(Path(cache).resolve()) if cache else None

    def gpus(local: bool) -> float:
        return float(num_gpus) if (num_gpus is not None and local) else _gpus_for(local, device)

    # --- tagger
    if tagger == "florence2":
        tkw = {"model_path": str(Path(tagger_model).resolve()) if Path(tagger_model).exists() else tagger_model,
               "device": device, "num_beams": num_beams, "max_new_tokens": tagger_max_new_tokens,
               "batch_size": tagger_batch_size, "od_mode": od_mode, "max_od_candidates": max_candidates,
               "dtype": dtype, **(tagger_kwargs or {})}
        tspec = AnnotatorSpec("florence2", tkw, local_model=True)
    elif tagger == "sim":
        tspec = AnnotatorSpec("sim", sim_kw, cached=False)
    else:
        tspec = AnnotatorSpec("oracle", {"gt_path": gt}, cached=False)
    stages: list[Stage] = [
        ReadStage(extra_nouns, question_only),
        TagStage(tspec, cache_path, gpus(tspec.local_model), torch_threads, max_candidates=max_candidates),
    ]
    # --- verifier / rewriter
    vspec = None
    if verifier == "transformers":
        vkw = {"model_path": str(Path(verifier_model).resolve()) if Path(verifier_model).exists() else verifier_model,
               "device": device, "dtype": dtype, "max_new_tokens": verifier_max_new_tokens,
               "batch_size": verifier_batch_size, **(verifier_kwargs or {})}
        vspec = AnnotatorSpec("transformers", vkw, local_model=True)
    elif verifier == "openai":
        vkw = {"base_url": endpoint, "model": verifier_model, "api_key_env": api_key_env, "timeout": timeout,
               "max_retries": max_retries, "backoff": backoff, "max_concurrency": max_concurrency,
               "max_tokens": verifier_max_new_tokens, "image_format": http_image_format,
               "structured_output": structured_output,
               **(verifier_kwargs or {})}
        vspec = AnnotatorSpec("openai", vkw)
    elif verifier == "oracle":
        vspec = AnnotatorSpec("oracle", {"gt_path": gt}, cached=False)
    elif verifier == "sim":
        vspec = AnnotatorSpec("sim", sim_kw, cached=False)
    if vspec is not None:
        stages.append(VerifyStage(vspec, cache_path, gpus(vspec.local_model), torch_threads,
                                  min_confidence=min_confidence))
    stages.append(AssignStage(verified=vspec is not None, min_confidence=min_confidence, allow_partial=allow_partial))
    if vspec is not None and rewrite != "none":
        stages.append(RewriteStage(vspec, cache_path, gpus(vspec.local_model), torch_threads, policy=rewrite))
    stages.append(ComposeStage())

    def model_name(m: str | None) -> dict[str, str] | None:
        """A model as the manifest records it: its name (not a machine path) and its config's sha256."""
        if m is None:
            return None
        p = Path(m)
        local = p.is_absolute() or p.exists()
        cfg = p / "config.json"
        import hashlib

        sha = hashlib.sha256(cfg.read_bytes()).hexdigest()[:12] if cfg.is_file() else "unknown"
        return {"name": p.name if local else m, "config_sha256": sha}

    config = {
        "files": [{"json": f["json"], "image_root": f["image_root"], "depth_root": f["depth_root"], "tag": f["tag"]}
                  for f in files],
        "tagger": tagger, "tagger_model": model_name(tagger_model) if tagger == "florence2" else None,
        "verifier": verifier, "verifier_model": model_name(verifier_model) if verifier in ("transformers", "openai")
        else None,
        "ground_truth": gt if uses_gt else None,
        "decoding": {"num_beams": num_beams, "tagger_max_new_tokens": tagger_max_new_tokens, "od_mode": od_mode,
                     "verifier_max_new_tokens": verifier_max_new_tokens,
                     "http_image_format": http_image_format if verifier == "openai" else None,
                     "structured_output": structured_output if verifier == "openai" else None},
        "rewrite": rewrite if vspec is not None else "none", "min_confidence": min_confidence,
        "allow_partial": allow_partial, "question_only": question_only, "max_candidates": max_candidates,
        "extra_nouns": sorted(set(extra_nouns)),
        "versions": {"prompt": PROMPT_VERSION, "tagger": TAGGER_VERSION, "mentions": "rules-v1", "cot": "cot-v1"},
    }
    if sim_config is not None:  # only then: the digests of other builds stay as they were
        config["sim"] = sim_config
    return Builder("cot", config, iter_inputs, stages)


# ============================================================================ CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cot: inputs")
    g.add_argument("--refspatial", nargs="+", default=[], metavar="FILE",
                   help="RefSpatial JSON files (absolute, or relative to --data-root); required unless --sample-world")
    g.add_argument("--data-root", type=Path, default=None, metavar="DIR",
                   help="data root: the RefSpatial root (or its parent), or a sample world")
    add_sample_world_argument(g)
    g.add_argument("--image-root", default=None, metavar="DIR", help="image root relative to --data-root, for files outside "
                   "the released layout (default: from the layout or sample_world.json)")
    g.add_argument("--depth-root", default=None, metavar="DIR", help="depth root relative to --data-root (with --image-root)")
    g.add_argument("--vocabulary", type=Path, default=None,
                   help="extra category nouns, one per line (added to the Omni3D/EmbodiedScan/RefSpatial list)")
    g.add_argument("--question-only", action="store_true",
                   help="only ground mentions whose category the question names")
    g = p.add_argument_group("cot: annotators")
    g.add_argument("--tagger", choices=("florence2", "oracle", "sim"), default="florence2",
                   help="florence2: the Florence-2 model; oracle: the sample world's ground truth (tests, demo); "
                   "sim: the ground truth with simulated, recorded errors")
    g.add_argument("--verifier", choices=("transformers", "openai", "oracle", "sim", "none"), default="transformers",
                   help="none keeps the tagger's boxes unverified (and rewrites nothing)")
    g.add_argument("--tagger-model", default=None, help="Florence-2 checkpoint directory (native transformers)")
    g.add_argument("--verifier-model", default=None,
                   help="chat VLM checkpoint directory (transformers) or the served model name (openai)")
    g.add_argument("--endpoint", default=None,
                   help="OpenAI-compatible base URL, e.g. http://host:8000/v1 (default: OPENAI_BASE_URL)")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    g.add_argument("--ground-truth", default=None, metavar="FILE",
                   help="oracle: ground_truth.json (default: --data-root/...)")
    g.add_argument("--rewrite", choices=("generic", "all", "none"), default="generic",
                   help="rewrite generic class names (default), every grounded mention, or nothing")
    g.add_argument("--min-confidence", type=float, default=0.5, help="verifier confidence below this rejects")
    g.add_argument("--allow-partial", action="store_true",
                   help="keep samples where some mentions stay ungrounded (default: every mention must ground)")
    g.add_argument("--max-candidates", type=int, default=8, help="candidate boxes per mention at most")
    g.add_argument("--cache", default=None, help=f"response cache file (default: OUT/{CACHE_RELPATH})")
    _add_sim_arguments(p)
    g.add_argument("--no-cache", action="store_true", help="no response cache")
    g = p.add_argument_group("cot: model execution")
    g.add_argument("--device", default="auto", help="auto (CUDA when the worker sees a GPU) | cpu | cuda")
    g.add_argument("--dtype", default=None, help="torch dtype name (default fp16/bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--torch-threads", type=int, default=None, help="torch CPU threads per worker")
    g.add_argument("--tagger-batch-size", type=int, default=8, help="images per Florence-2 generate call")
    g.add_argument("--verifier-batch-size", type=int, default=4,
                   help="requests per verifier generate call (transformers backend)")
    g.add_argument("--num-beams", type=int, default=3, help="Florence-2 beams (official examples: 3)")
    g.add_argument("--tagger-max-new-tokens", type=int, default=1024, help="Florence-2 generation length cap")
    g.add_argument("--od-mode", choices=("fallback", "always", "never"), default="fallback",
                   help="Florence-2 <OD> pass: only when phrase grounding finds nothing, on every image, or never")
    g.add_argument("--verifier-max-new-tokens", type=int, default=128, help="verifier/rewriter generation length cap")
    g.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout (s)")
    g.add_argument("--max-retries", type=int, default=4, help="HTTP retries (429/5xx/timeouts)")
    g.add_argument("--backoff", type=float, default=1.0, help="HTTP retry backoff base (s)")
    g.add_argument("--max-concurrency", type=int, default=8, help="HTTP requests in flight per worker")
    g.add_argument("--no-structured-output", action="store_true",
                   help="do not ask the endpoint for JSON-schema-constrained answers (response_format "
                        "json_schema; sent by default, dropped by itself when the endpoint refuses it)")
    g.add_argument("--http-image-format", choices=("png", "jpeg"), default="png",
                   help="image encoding sent to the endpoint (jpeg: ~4 ms vs ~95 ms of CPU per 1024x768 photo)")


def _add_sim_arguments(p: argparse.ArgumentParser) -> None:
    """`--noise-scale`, `--sim-seed` and one `--sim-RATE` per entry of annotators.sim.SIM_RATES."""
    from annotators.sim import SIM_RATES

    g = p.add_argument_group("cot: simulated annotators (--tagger sim / --verifier sim; docs/annotators.md)")
    g.add_argument("--noise-scale", type=float, default=1.0,
                   help="multiplies every sim error rate and the box deviation (0 = oracle, 1 = realistic default)")
    g.add_argument("--sim-seed", type=int, default=0, help="seed of the simulated errors (with each mention's key)")
    for name, (default, text) in SIM_RATES.items():
        g.add_argument(f"--sim-{name.replace('_', '-')}", dest=f"sim_{name}", type=float, default=None,
                       metavar="P", help=f"{text} (default {default})")


def _make(args: argparse.Namespace) -> Builder:
    """`gr3d build cot` arguments -> Builder; bad arguments become a PlanError (exit 2 with the message)."""
    from pipelines.engine.plan import PlanError

    try:
        return _make_unchecked(args)
    except (ValueError, OSError) as exc:
        raise PlanError(str(exc)) from exc


def _make_unchecked(args: argparse.Namespace) -> Builder:
    nouns: list[str] = []
    if args.vocabulary is not None:
        nouns = [ln.strip() for ln in args.vocabulary.read_text(encoding="utf-8").splitlines()
                 if ln.strip() and not ln.startswith("#")]
    cache: str | bool | None = None if args.no_cache else (args.cache or True)
    world = sample_world_of(args)
    refspatial, data_root, ground_truth = list(args.refspatial), args.data_root, args.ground_truth
    if world is not None:
        refspatial = refspatial or [str(f.json_path) for f in world.refspatial_files]
        data_root = data_root or world.root
        ground_truth = ground_truth or world.root / world.manifest["ground_truth"]
    if data_root is None or not refspatial:
        raise ValueError("--refspatial FILE... and --data-root are required (or --sample-world DIR)")
    return make_cot_builder(
        refspatial, data_root, out=args.out, tagger=args.tagger, verifier=args.verifier,
        tagger_model=args.tagger_model, verifier_model=args.verifier_model, endpoint=args.endpoint,
        ground_truth=ground_truth, image_root=args.image_root, depth_root=args.depth_root, rewrite=args.rewrite,
        min_confidence=args.min_confidence, allow_partial=args.allow_partial, question_only=args.question_only,
        max_candidates=args.max_candidates, extra_nouns=nouns, cache=cache, device=args.device, dtype=args.dtype,
        num_gpus=args.num_gpus, torch_threads=args.torch_threads, tagger_batch_size=args.tagger_batch_size,
        verifier_batch_size=args.verifier_batch_size, num_beams=args.num_beams,
        tagger_max_new_tokens=args.tagger_max_new_tokens, od_mode=args.od_mode,
        verifier_max_new_tokens=args.verifier_max_new_tokens, api_key_env=args.api_key_env, timeout=args.timeout,
        max_retries=args.max_retries, backoff=args.backoff, max_concurrency=args.max_concurrency,
        http_image_format=args.http_image_format, structured_output=not args.no_structured_output,
        noise_scale=args.noise_scale, sim_seed=args.sim_seed, sim_rates=_sim_rates_of(args))


def _sim_rates_of(args: argparse.Namespace) -> dict[str, float]:
    from annotators.sim import SIM_RATES

    return {k: float(v) for k, v in ((k, getattr(args, f"sim_{k}", None)) for k in SIM_RATES) if v is not None}


register_builder("cot", _make, help="grounded CoT corpus from RefSpatial (Florence-2 tagger + VLM verifier)",
                 add_arguments=_add_arguments)
