"""Build annotators by name, for the CoT builder's `--tagger` / `--verifier` flags.

Why a factory: the builder (and its CLI) should not import torch/transformers to parse flags,
and swapping the real annotators for the oracle must be a one-word change. Imports happen here,
lazily, only for the annotator actually chosen.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TAGGERS", "VERIFIERS", "make_tagger", "make_verifier"]

TAGGERS = ("florence2", "oracle", "sim")
VERIFIERS = ("transformers", "openai", "oracle", "sim")


def make_tagger(name: str, **kwargs: Any) -> Any:
    """`florence2` -> Florence2Tagger(**kwargs) (model_path, device, ...);
    `oracle` -> OracleTagger(gt_path); `sim` -> SimTagger(gt_path, noise_scale, seed, rates)."""
    if name == "florence2":
        from annotators.florence2 import Florence2Tagger

        return Florence2Tagger(**kwargs)
    if name == "oracle":
        from annotators.oracle import OracleTagger

        return OracleTagger(**kwargs)
    if name == "sim":
        from annotators.sim import SimTagger

        return SimTagger(**kwargs)
    raise ValueError(f"unknown tagger {name!r}; choose from {TAGGERS}")


def make_verifier(name: str, **kwargs: Any) -> Any:
    """`transformers` -> TransformersVLM, `openai` -> OpenAIVLM, `oracle` -> OracleVerifier,
    `sim` -> SimVerifier(gt_path, noise_scale, seed, rates)."""
    if name == "transformers":
        from annotators.vlm import TransformersVLM

        return TransformersVLM(**kwargs)
    if name == "openai":
        from annotators.vlm import OpenAIVLM

        return OpenAIVLM(**kwargs)
    if name == "oracle":
        from annotators.oracle import OracleVerifier

        return OracleVerifier(**kwargs)
    if name == "sim":
        from annotators.sim import SimVerifier

        return SimVerifier(**kwargs)
    raise ValueError(f"unknown verifier {name!r}; choose from {VERIFIERS}")
