"""The VLM client contract (requests, verdicts, rewrites, `VLMClient`) and the chat-model base both backends share."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from annotators.cache import ResponseCache, cache_key
from annotators.common import Candidate, MentionLike, mention_text
from annotators.images import as_rgb, draw_marks, image_sha256
from annotators.parsing import ModelOutputError, ParseError, parse_rewrite, parse_verdict
from annotators.prompts import PROMPT_VERSION, repair_prompt, rewrite_prompt, verify_prompt

log = logging.getLogger(__name__)


Box = Sequence[float]
T = TypeVar("T")


class Verdict(NamedTuple):
    """Verify result: `choice` indexes the candidates (None = none of them)."""

    choice: int | None
    confidence: float
    raw: str
    prompt_version: str = PROMPT_VERSION


class Rewrite(NamedTuple):
    """Rewrite result: the instance-level description and the raw model text."""

    text: str
    raw: str
    prompt_version: str = PROMPT_VERSION


@dataclass(frozen=True)
class VerifyRequest:
    """Arguments of one `verify` call, for `verify_many`."""

    image: Any
    mention: MentionLike
    candidates: Sequence[Candidate | Box]


@dataclass(frozen=True)
class RewriteRequest:
    """Arguments of one `rewrite` call, for `rewrite_many`."""

    image: Any
    mention: MentionLike
    box: Box
    others: Sequence[Box] = ()


class VLMTransportError(RuntimeError):
    """The model endpoint could not be reached or kept failing after all retries."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class VLMClient(Protocol):
    """What the CoT builder needs from a verifier/rewriter (VLM backends and the oracle)."""

    model_id: str

    def verify(self, image: Any, mention: MentionLike, candidates: Sequence[Candidate | Box]) -> Verdict: ...

    def rewrite(self, image: Any, mention: MentionLike, box: Box, others: Sequence[Box] = ()) -> Rewrite: ...

    def verify_many(self, requests: Sequence[VerifyRequest]) -> list[Verdict | ModelOutputError]: ...

    def rewrite_many(self, requests: Sequence[RewriteRequest]) -> list[Rewrite | ModelOutputError]: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass
class _Call:
    """One prepared model call: what is sent, and how its answer is parsed."""

    image: Any  # PIL RGB, marks drawn
    image_sha: str
    prompt: str
    parse: Callable[[str], Any]
    kind: str | None = None  # "verdict" | "rewrite": picks the structured-output schema
    raws: list[str] = field(default_factory=list)


def _box_of(c: Candidate | Box) -> tuple[float, float, float, float]:
    b = c.box_xyxy_px if isinstance(c, Candidate) else c
    x1, y1, x2, y2 = (float(v) for v in b)
    return (x1, y1, x2, y2)


def _fingerprint(model_path: str) -> str:
    cfg = Path(model_path) / "config.json"
    return hashlib.sha256(cfg.read_bytes()).hexdigest()[:12] if cfg.is_file() else "hub"


class _ChatVLM:
    """Prompting, caching, parsing and the retry-once policy; backends implement `_complete`."""

    model_id: str = ""

    def __init__(self, cache: ResponseCache | None, draw_marks: bool) -> None:
        self.cache = cache
        self.draw_marks = draw_marks
        self.calls = 0  # model calls actually made in this process
        self._calls_lock = threading.Lock()

    # -- backend hook ------------------------------------------------------------------
    def _complete(self, batch: list[tuple[Any, str]], on_done: Callable[[int, str], None]) -> None:
        """Run the model on (image, prompt) pairs, calling `on_done(i, raw_text)` per finished one."""
        raise NotImplementedError

    def _complete_kinds(self, batch: list[tuple[Any, str]], kinds: Sequence[str | None],
                        on_done: Callable[[int, str], None]) -> None:
        """`_complete`, told which answer each call wants (the HTTP backend asks for that JSON schema)."""
        self._complete(batch, on_done)

    def _count(self, n: int = 1) -> None:
        with self._calls_lock:
            self.calls += n

    def provenance(self) -> dict[str, Any]:
        """What answered, for the manifest and every CoT sample."""
        return {"backend": type(self).__name__, "model_id": self.model_id, "prompt_version": PROMPT_VERSION}

    # -- preparing calls ---------------------------------------------------------------
    def _prep_verify(self, r: VerifyRequest) -> _Call:
        if not r.candidates:
            raise ValueError("verify needs at least one candidate")
        img = as_rgb(r.image)
        boxes = [_box_of(c) for c in r.candidates]
        labels = [c.label if isinstance(c, Candidate) else None for c in r.candidates]
        prompt = verify_prompt(
            mention_text(r.mention), boxes, labels, img.size[0], img.size[1], self.draw_marks
        )
        if self.draw_marks:
            img = draw_marks(img, boxes, [str(i) for i in range(len(boxes))])
        n = len(boxes)
        return _Call(img, image_sha256(img), prompt, lambda raw: parse_verdict(raw, n), "verdict")

    def _prep_rewrite(self, r: RewriteRequest) -> _Call:
        img = as_rgb(r.image)
        box = _box_of(r.box)
        others = [_box_of(b) for b in r.others]
        prompt = rewrite_prompt(
            mention_text(r.mention), box, others, img.size[0], img.size[1], self.draw_marks
        )
        if self.draw_marks:
            img = draw_marks(img, [box, *others], ["T", *[str(i) for i in range(len(others))]])
        return _Call(img, image_sha256(img), prompt, parse_rewrite, "rewrite")

    # -- cache + model -----------------------------------------------------------------
    def _answers(self, items: list[tuple[Any, str, str]], kinds: Sequence[str | None] | None = None) -> list[str]:
        """Raw answers for (image, image sha, prompt) triples; misses go to the model."""
        kinds = list(kinds) if kinds is not None else [None] * len(items)
        out: list[str | None] = [None] * len(items)
        keys = [cache_key(self.model_id, PROMPT_VERSION, p, sha) for _, sha, p in items]
        todo: list[int] = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache is not None else None
            if hit is None:
                todo.append(i)
            else:
                out[i] = hit
        if todo:

            def done(j: int, raw: str) -> None:
                i = todo[j]
                out[i] = raw
                if self.cache is not None:
                    self.cache.put(keys[i], raw, model_id=self.model_id, prompt_version=PROMPT_VERSION)

            self._complete_kinds([(items[i][0], items[i][2]) for i in todo], [kinds[i] for i in todo], done)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:  # pragma: no cover - a backend that forgot to report is a bug
            raise RuntimeError(f"backend returned no answer for {len(missing)} call(s)")
        return [v for v in out if v is not None]

    def _run(self, calls: list[_Call]) -> list[Any]:
        """Parse with one repair retry; unusable output becomes a ModelOutputError in place."""
        results: list[Any] = [None] * len(calls)
        reasons: dict[int, str] = {}
        raws = self._answers([(c.image, c.image_sha, c.prompt) for c in calls], [c.kind for c in calls])
        for i, (c, raw) in enumerate(zip(calls, raws)):
            c.raws.append(raw)
            try:
                results[i] = c.parse(raw)
            except ParseError as exc:
                reasons[i] = exc.reason
        if reasons:
            retry = sorted(reasons)
            log.info("retrying %d call(s) with unusable output", len(retry))
            raws2 = self._answers(
                [
                    (calls[i].image, calls[i].image_sha, repair_prompt(calls[i].prompt, reasons[i]))
                    for i in retry
                ],
                [calls[i].kind for i in retry],
            )
            for i, raw in zip(retry, raws2):
                calls[i].raws.append(raw)
                try:
                    results[i] = calls[i].parse(raw)
                except ParseError as exc:
                    results[i] = ModelOutputError(exc.reason, raw, calls[i].raws)
        return results

    # -- public API ---------------------------------------------------------------------
    def verify_many(self, requests: Sequence[VerifyRequest]) -> list[Verdict | ModelOutputError]:
        """Verify several requests (batched/concurrent); see the module docstring for errors."""
        calls = [self._prep_verify(r) for r in requests]
        out: list[Verdict | ModelOutputError] = []
        for c, res in zip(calls, self._run(calls)):
            out.append(res if isinstance(res, ModelOutputError) else Verdict(res[0], res[1], c.raws[-1]))
        return out

    def rewrite_many(self, requests: Sequence[RewriteRequest]) -> list[Rewrite | ModelOutputError]:
        """Rewrite several requests (batched/concurrent); see the module docstring for errors."""
        calls = [self._prep_rewrite(r) for r in requests]
        out: list[Rewrite | ModelOutputError] = []
        for c, res in zip(calls, self._run(calls)):
            out.append(res if isinstance(res, ModelOutputError) else Rewrite(res, c.raws[-1]))
        return out

    def verify(self, image: Any, mention: MentionLike, candidates: Sequence[Candidate | Box]) -> Verdict:
        """Which candidate (0-based) shows `mention`, or None. Raises ModelOutputError."""
        (res,) = self.verify_many([VerifyRequest(image, mention, candidates)])
        if isinstance(res, ModelOutputError):
            raise res
        return res

    def rewrite(self, image: Any, mention: MentionLike, box: Box, others: Sequence[Box] = ()) -> Rewrite:
        """An instance-level description of the object in `box`. Raises ModelOutputError."""
        (res,) = self.rewrite_many([RewriteRequest(image, mention, box, tuple(others))])
        if isinstance(res, ModelOutputError):
            raise res
        return res
