"""VLM verifier/rewriter: one interface, two backends (local transformers, OpenAI-compatible HTTP).

The verifier answers "which of these candidate boxes is the mentioned object, if any?" (the 1-to-1
mention<->box check of the paper); the rewriter turns a class name into an instance-level
description that singles the object out from others of its class. Prompts live in
`annotators.prompts` under `PROMPT_VERSION`, which every result carries for provenance.

Flow of one call (shared by both backends, in `_ChatVLM`):
1. Build the prompt; draw the numbered boxes on a copy of the image (set-of-mark) unless
   `draw_marks=False`.
2. Look the call up in the `ResponseCache` (model id incl. decoding settings, prompt version,
   prompt, sha256 of the image actually sent). Only misses reach the model; each finished call is
   stored at once, so an interrupted run keeps what it finished and a re-run makes zero calls.
3. Parse strictly (`annotators.parsing`). Unusable output is retried ONCE with a repair prompt
   (the original plus what was wrong, a different cache key); if that fails too the caller gets a
   `ModelOutputError` carrying the raw texts, which the builder turns into a reject row.
Transport failures (HTTP after all retries) raise `VLMTransportError` instead: an unreachable
endpoint must stop the build, not become permanent rejects.

`verify_many`/`rewrite_many` are the throughput path: the transformers backend batches
generation (left padding), the HTTP backend runs up to `max_concurrency` requests at once.
They return one result per request, a `ModelOutputError` in place of a result when the output
stayed unusable (like `asyncio.gather(..., return_exceptions=True)` for that one error type).

Secrets: the HTTP backend reads its API key from the environment variable named by `api_key_env`
and never puts it in logs, exceptions or `repr`; any text that could echo it back (error bodies)
is scrubbed.
"""

from __future__ import annotations

from annotators.parsing import ModelOutputError
from annotators.vlm.base import (
    Rewrite,
    RewriteRequest,
    Verdict,
    VerifyRequest,
    VLMClient,
    VLMTransportError,
)
from annotators.vlm.openai import OpenAIVLM
from annotators.vlm.tiny import build_tiny_vlm
from annotators.vlm.transformers import TransformersVLM, load_vlm_processor

__all__ = [
    "Verdict",
    "Rewrite",
    "VerifyRequest",
    "RewriteRequest",
    "VLMClient",
    "TransformersVLM",
    "OpenAIVLM",
    "ModelOutputError",
    "VLMTransportError",
    "build_tiny_vlm",
    "load_vlm_processor",
]



# ====================================================================== transformers backend


# ====================================================================== HTTP backend


# ====================================================================== tiny checkpoint
