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
from pipelines.corpora.cot.config import GROUPS, CotConfig
from pipelines.corpora.cot.model_stages import RewriteStage, TagStage, VerifyStage
from pipelines.corpora.cot.stages import AssignStage, ComposeStage, ReadStage
from pipelines.corpora.options import add_options, options_from_args
from pipelines.engine.build_cli import register_builder
from pipelines.engine.plan import Builder
from pipelines.engine.stage import Item, Reject, Stage
from pipelines.sample_world.paths import sample_world_of

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
    "CotConfig",
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
    from pipelines.sources.common import read_each
    from pipelines.sources.refspatial import RefSpatialFile, read_refspatial
    from shards.keys import make_key

    specs = [RefSpatialFile(f["json"], f["image_root"], f["depth_root"], tag=f["tag"]) for f in config["files"]]
    for r in read_each(specs, lambda spec: read_refspatial([spec], check_files=True),
                       lambda spec: make_key("cot", "source_file", spec.file_tag())):
        if isinstance(r, Reject):  # [reason, message]: the form this corpus's plan digests were taken of
            yield {"key": r.key, "read_reject": [r.reason, r.message]}
            continue
        yield {"key": r["key"], "id": r["id"], "source": {**r["source"], "record_index": r["record_index"]},
               "image_paths": r["image_paths"], "conversations": r["conversations"]}


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


def make_cot_builder(config: CotConfig) -> Builder:
    """The cot Builder (Python API of `gr3d build cot`; see the module docstring for the stages).

    The builder config (recorded in the manifest; its digest guards resumes) holds what changes the
    output: files, annotators, models, thresholds, prompt versions; not the endpoint URL, the cache path
    or batch sizes; under "sim" the simulated annotators' settings, only when one is used.
    """
    from annotators.prompts import PROMPT_VERSION, TAGGER_VERSION

    c = config
    world = sample_world_of(c)
    refspatial, data_root, ground_truth = list(c.refspatial), c.data_root, c.ground_truth
    if world is not None:
        refspatial = refspatial or [str(f.json_path) for f in world.refspatial_files]
        data_root = data_root or world.root
        ground_truth = ground_truth or world.root / world.manifest["ground_truth"]
    if data_root is None or not refspatial:
        raise ValueError("--refspatial FILE... and --data-root are required (or --sample-world DIR)")
    tagger, verifier, tagger_model, verifier_model = c.tagger, c.verifier, c.tagger_model, c.verifier_model
    root = Path(data_root).resolve()
    gt = str(Path(ground_truth).resolve()) if ground_truth else str(root / "ground_truth.json")
    uses_gt = bool({"oracle", "sim"} & {tagger, verifier})
    if uses_gt and not Path(gt).is_file():
        raise FileNotFoundError(f"the oracle/sim annotators need the ground truth: {gt} not found (--ground-truth)")
    c.check_annotators()
    sim_config = None
    if "sim" in (tagger, verifier):
        sim_config = c.sim_config()
        sim_kw = {"gt_path": gt, "noise_scale": float(c.noise_scale), "seed": int(c.sim_seed),
                  "rates": dict(sim_config["rates"])}
    if tagger == "florence2":
        _check_checkpoint(str(tagger_model), "--tagger-model")
    if verifier == "transformers":
        _check_checkpoint(str(verifier_model), "--verifier-model")

    files = resolve_refspatial_files(refspatial, root, c.image_root, c.depth_root)
    cache, out = c.cache, c.out
    if cache is True:
        if out is None:
            raise ValueError("cache=True needs `out` (the cache lives in OUT/cache/); pass a path or cache=None")
        cache_path: str | None = str(Path(out).resolve() / CACHE_RELPATH)
    else:
        cache_path = str(Path(cache).resolve()) if cache else None

    def gpus(local: bool) -> float:
        return float(c.num_gpus) if (c.num_gpus is not None and local) else _gpus_for(local, c.device)

    # --- tagger
    if tagger == "florence2":
        tkw = {"model_path": str(Path(tagger_model).resolve()) if Path(tagger_model).exists() else tagger_model,
               "device": c.device, "num_beams": c.num_beams, "max_new_tokens": c.tagger_max_new_tokens,
               "batch_size": c.tagger_batch_size, "od_mode": c.od_mode, "max_od_candidates": c.max_candidates,
               "dtype": c.dtype, **(c.tagger_kwargs or {})}
        tspec = AnnotatorSpec("florence2", tkw, local_model=True)
    elif tagger == "sim":
        tspec = AnnotatorSpec("sim", sim_kw, cached=False)
    else:
        tspec = AnnotatorSpec("oracle", {"gt_path": gt}, cached=False)
    stages: list[Stage] = [
        ReadStage(c.extra_nouns, c.question_only),
        TagStage(tspec, cache_path, gpus(tspec.local_model), c.torch_threads, max_candidates=c.max_candidates),
    ]
    # --- verifier / rewriter
    vspec = None
    if verifier == "transformers":
        vkw = {"model_path": str(Path(verifier_model).resolve()) if Path(verifier_model).exists() else verifier_model,
               "device": c.device, "dtype": c.dtype, "max_new_tokens": c.verifier_max_new_tokens,
               "batch_size": c.verifier_batch_size, **(c.verifier_kwargs or {})}
        vspec = AnnotatorSpec("transformers", vkw, local_model=True)
    elif verifier == "openai":
        vkw = {"base_url": c.endpoint, "model": verifier_model, "api_key_env": c.api_key_env, "timeout": c.timeout,
               "max_retries": c.max_retries, "backoff": c.backoff, "max_concurrency": c.max_concurrency,
               "max_tokens": c.verifier_max_new_tokens, "image_format": c.http_image_format,
               "structured_output": c.structured_output,
               **(c.verifier_kwargs or {})}
        vspec = AnnotatorSpec("openai", vkw)
    elif verifier == "oracle":
        vspec = AnnotatorSpec("oracle", {"gt_path": gt}, cached=False)
    elif verifier == "sim":
        vspec = AnnotatorSpec("sim", sim_kw, cached=False)
    if vspec is not None:
        stages.append(VerifyStage(vspec, cache_path, gpus(vspec.local_model), c.torch_threads,
                                  min_confidence=c.min_confidence))
    stages.append(AssignStage(verified=vspec is not None, min_confidence=c.min_confidence, allow_partial=c.allow_partial))
    if vspec is not None and c.rewrite != "none":
        stages.append(RewriteStage(vspec, cache_path, gpus(vspec.local_model), c.torch_threads, policy=c.rewrite))
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
        "decoding": {"num_beams": c.num_beams, "tagger_max_new_tokens": c.tagger_max_new_tokens, "od_mode": c.od_mode,
                     "verifier_max_new_tokens": c.verifier_max_new_tokens,
                     "http_image_format": c.http_image_format if verifier == "openai" else None,
                     "structured_output": c.structured_output if verifier == "openai" else None},
        "rewrite": c.rewrite if vspec is not None else "none", "min_confidence": c.min_confidence,
        "allow_partial": c.allow_partial, "question_only": c.question_only, "max_candidates": c.max_candidates,
        "extra_nouns": sorted(set(c.extra_nouns)),
        "versions": {"prompt": PROMPT_VERSION, "tagger": TAGGER_VERSION, "mentions": "rules-v1", "cot": "cot-v1"},
    }
    if sim_config is not None:  # only then: the digests of other builds stay as they were
        config["sim"] = sim_config
    return Builder("cot", config, iter_inputs, stages)


# ============================================================================ CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, CotConfig, GROUPS)


def _make(args: argparse.Namespace) -> Builder:
    """`gr3d build cot` arguments -> Builder; bad arguments become a PlanError (exit 2 with the message)."""
    from pipelines.engine.plan import PlanError

    try:
        return make_cot_builder(options_from_args(CotConfig, args))
    except (ValueError, OSError) as exc:
        raise PlanError(str(exc)) from exc


register_builder("cot", _make, help="grounded CoT corpus from RefSpatial (Florence-2 tagger + VLM verifier)",
                 add_arguments=_add_arguments)
