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

import email.utils
import hashlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

from annotators.cache import ResponseCache, cache_key
from annotators.common import Candidate, MentionLike, mention_text
from annotators.images import as_rgb, draw_marks, image_sha256, to_data_url
from annotators.parsing import ModelOutputError, ParseError, parse_rewrite, parse_verdict
from annotators.prompts import PROMPT_VERSION, repair_prompt, rewrite_prompt, verify_prompt

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
        return _Call(img, image_sha256(img), prompt, lambda raw: parse_verdict(raw, n))

    def _prep_rewrite(self, r: RewriteRequest) -> _Call:
        img = as_rgb(r.image)
        box = _box_of(r.box)
        others = [_box_of(b) for b in r.others]
        prompt = rewrite_prompt(
            mention_text(r.mention), box, others, img.size[0], img.size[1], self.draw_marks
        )
        if self.draw_marks:
            img = draw_marks(img, [box, *others], ["T", *[str(i) for i in range(len(others))]])
        return _Call(img, image_sha256(img), prompt, parse_rewrite)

    # -- cache + model -----------------------------------------------------------------
    def _answers(self, items: list[tuple[Any, str, str]]) -> list[str]:
        """Raw answers for (image, image sha, prompt) triples; misses go to the model."""
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

            self._complete([(items[i][0], items[i][2]) for i in todo], done)
        missing = [i for i, v in enumerate(out) if v is None]
        if missing:  # pragma: no cover - a backend that forgot to report is a bug
            raise RuntimeError(f"backend returned no answer for {len(missing)} call(s)")
        return [v for v in out if v is not None]

    def _run(self, calls: list[_Call]) -> list[Any]:
        """Parse with one repair retry; unusable output becomes a ModelOutputError in place."""
        results: list[Any] = [None] * len(calls)
        reasons: dict[int, str] = {}
        raws = self._answers([(c.image, c.image_sha, c.prompt) for c in calls])
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
                ]
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


# ====================================================================== transformers backend
_VIDEO_PROCESSOR_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_vlm_processor(model_path: str) -> Any:
    """`AutoProcessor` for a chat VLM checkpoint, with the no-torchvision fallback for Qwen-VL.

    Without torchvision, transformers cannot build the Qwen2/2.5/3-VL *video* processor, so
    `AutoProcessor` fails for those checkpoints even though we only send images
    (shared/environment.md section 4). The fallback builds the checkpoint's processor class from
    its tokenizer and image processor with `video_processor=None`, skipping the class check for
    that one argument, and takes the chat template from `chat_template.jinja`/`.json` or the
    tokenizer.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path)
    except Exception as exc:  # noqa: BLE001 - we re-raise below unless the fallback applies
        first = exc
    root = Path(model_path)
    model_type = _read_json(root / "config.json").get("model_type", "")
    cls_name = (
        _read_json(root / "processor_config.json").get("processor_class")
        or _read_json(root / "preprocessor_config.json").get("processor_class")
        or _read_json(root / "tokenizer_config.json").get("processor_class")
    )
    if model_type not in _VIDEO_PROCESSOR_FAMILIES or not cls_name or not hasattr(transformers, cls_name):
        raise first
    base = getattr(transformers, cls_name)

    def check_argument_for_proper_class(self: Any, name: str, arg: Any) -> Any:
        if name == "video_processor" and arg is None:
            return None
        return base.check_argument_for_proper_class(self, name, arg)

    cls = type(
        f"{cls_name}ImagesOnly", (base,), {"check_argument_for_proper_class": check_argument_for_proper_class}
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    imgp = AutoImageProcessor.from_pretrained(model_path)
    chat = None
    if (root / "chat_template.jinja").is_file():
        chat = (root / "chat_template.jinja").read_text()
    elif (root / "chat_template.json").is_file():
        chat = _read_json(root / "chat_template.json").get("chat_template")
    chat = chat or getattr(tok, "chat_template", None)
    log.info(
        "AutoProcessor failed for %s (%s); using %s without a video processor",
        model_path,
        type(first).__name__,
        cls_name,
    )
    return cls(image_processor=imgp, tokenizer=tok, video_processor=None, chat_template=chat)


class TransformersVLM(_ChatVLM):
    """Local chat VLM through `AutoModelForImageTextToText` + the checkpoint's chat template.

    Works with LLaVA-style and Qwen2/2.5/3-VL checkpoints (see `load_vlm_processor`). Greedy
    decoding (`do_sample=False`): a verifier should be a function of its input.
    `generate_kwargs` is passed through to `generate` (e.g. a `logits_processor`). One instance
    per worker: it is not meant to be shared between threads.
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str | None = None,
        max_new_tokens: int = 128,
        batch_size: int = 4,
        cache: ResponseCache | None = None,
        draw_marks: bool = True,
        model_id: str | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(cache, draw_marks)
        self.model_path = str(model_path)
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.generate_kwargs = dict(generate_kwargs or {})
        base = model_id or f"{Path(self.model_path).name or self.model_path}:{_fingerprint(self.model_path)}"
        self.model_id = f"transformers:{base}|max_new_tokens={max_new_tokens}|greedy"
        self.model: Any = None
        self.processor: Any = None

    def setup(self) -> None:
        """Load processor and model once (idempotent); called lazily on the first cache miss."""
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText

        if self.dtype is None:
            dtype = torch.bfloat16 if str(self.device).startswith("cuda") else torch.float32
        else:
            dtype = getattr(torch, self.dtype)
        self.processor = load_vlm_processor(self.model_path)
        self.processor.tokenizer.padding_side = "left"  # decoder-only batching
        self.model = (
            AutoModelForImageTextToText.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        )
        self._dtype = dtype

    def _complete(self, batch: list[tuple[Any, str]], on_done: Callable[[int, str], None]) -> None:
        import torch

        self.setup()
        for s in range(0, len(batch), self.batch_size):
            chunk = batch[s : s + self.batch_size]
            texts = [
                self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
                    add_generation_prompt=True,
                    tokenize=False,
                )
                for _, p in chunk
            ]
            inputs = self.processor(
                text=texts, images=[im for im, _ in chunk], return_tensors="pt", padding=True
            )
            inputs = inputs.to(self.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, **self.generate_kwargs
                )
            self._count(len(chunk))
            new = out[:, inputs["input_ids"].shape[1] :]
            for j, text in enumerate(self.processor.batch_decode(new, skip_special_tokens=True)):
                on_done(s + j, text.strip())


# ====================================================================== HTTP backend
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class OpenAIVLM(_ChatVLM):
    """An OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI, ...).

    `base_url` includes the API prefix, e.g. `http://host:8000/v1`; requests go to
    `{base_url}/chat/completions` with the image as a base64 data URL in an `image_url` content
    part followed by the text part. Retries (at most `max_retries` after the first try) on
    connection errors, timeouts, 408/409/425/429 and 5xx, waiting `backoff * 2**attempt` seconds
    (capped at `max_backoff`) or the server's `Retry-After` when given (same cap). Other 4xx fail
    at once. `timeout` bounds connect and every socket read. At most `max_concurrency` requests
    are in flight per client, across all threads using it. Proxies from the environment are not
    used (http.client): point `base_url` at the server or at your gateway directly.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_concurrency: int = 8,
        max_backoff: float = 30.0,
        max_tokens: int = 128,
        temperature: float = 0.0,
        cache: ResponseCache | None = None,
        draw_marks: bool = True,
        image_format: str = "png",
        json_mode: bool = False,
        extra_body: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        super().__init__(cache, draw_marks)
        u = urllib.parse.urlsplit(base_url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url must be http(s)://host[:port]/prefix, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._path = (u.path or "") + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) or None
        if self._api_key is None:
            log.info("no API key in $%s; sending requests without Authorization", api_key_env)
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.image_format = image_format
        self.json_mode = json_mode
        self.extra_body = dict(extra_body or {})
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._local = threading.local()
        self.model_id = model_id or f"openai:{model}|max_tokens={max_tokens}|temperature={temperature}"
        self.requests_sent = 0  # HTTP requests incl. retries (self.calls counts model calls)

    def __repr__(self) -> str:
        return (
            f"OpenAIVLM(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"
        )

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- one HTTP exchange -------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _exchange(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for fresh_try in (False, True):
            reused = getattr(self._local, "conn", None) is not None
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed while idle: reconnect once, at once.
                self._drop_connection()
                if not reused or fresh_try:
                    raise
            except BaseException:
                self._drop_connection()
                raise
        if resp.getheader("Connection", "").lower() == "close" or resp.will_close:
            self._drop_connection()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    def _retry_wait(self, attempt: int, headers: dict[str, str] | None) -> float:
        wait_s = self.backoff * (2**attempt)
        ra = (headers or {}).get("retry-after")
        if ra:
            try:
                wait_s = float(ra)
            except ValueError:
                try:
                    dt = email.utils.parsedate_to_datetime(ra)
                    wait_s = dt.timestamp() - time.time()
                except (TypeError, ValueError):
                    pass
        return min(max(wait_s, 0.0), self.max_backoff)

    @staticmethod
    def _content(payload: Any) -> str:
        """The assistant text of a chat-completions response; ValueError if not that protocol."""
        try:
            msg = payload["choices"][0]["message"]
        except (KeyError, IndexError, TypeError):
            raise ValueError("response has no choices[0].message") from None
        content = msg.get("content") if isinstance(msg, dict) else None
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # content parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        raise ValueError(f"unexpected content type {type(content).__name__}")

    def _post(self, image: Any, prompt: str) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": to_data_url(image, self.image_format)}},
                        {"type": "text", "text": prompt},
                    ],
                }
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        body.update(self.extra_body)
        data = json.dumps(body).encode()
        last = "no attempt"
        last_status: int | None = None
        for attempt in range(self.max_retries + 1):
            headers: dict[str, str] | None = None
            with self._slots:
                with self._calls_lock:
                    self.requests_sent += 1
                try:
                    status, headers, raw = self._exchange(data)
                except (TimeoutError, OSError, http.client.HTTPException) as exc:
                    status, raw = None, b""
                    last, last_status = f"{type(exc).__name__}: {self._scrub(str(exc))}", None
            if status == 200:
                try:
                    text = self._content(json.loads(raw))
                except ValueError as exc:
                    last, last_status = f"malformed response body: {self._scrub(str(exc))[:200]}", 200
                else:
                    self._count()
                    return text
            elif status is not None:
                snippet = self._scrub(raw[:300].decode("utf-8", "replace"))
                last, last_status = f"HTTP {status}: {snippet}", status
                if status not in _RETRY_STATUS:
                    raise VLMTransportError(f"{self.base_url}: {last}", status)
            if attempt < self.max_retries:
                wait_s = self._retry_wait(attempt, headers)
                log.warning(
                    "%s: attempt %d failed (%s); retrying in %.2fs",
                    self.base_url,
                    attempt + 1,
                    last[:120],
                    wait_s,
                )
                time.sleep(wait_s)
        raise VLMTransportError(
            f"{self.base_url}: gave up after {self.max_retries + 1} attempts; last: {last}", last_status
        )

    def _complete(self, batch: list[tuple[Any, str]], on_done: Callable[[int, str], None]) -> None:
        if len(batch) == 1:
            on_done(0, self._post(*batch[0]))
            return
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(batch))) as pool:
            futures = {pool.submit(self._post, im, p): i for i, (im, p) in enumerate(batch)}
            error: BaseException | None = None
            # Report (and so cache) each answer as it arrives: an interrupted run keeps it.
            for f in as_completed(futures):
                if f.cancelled():
                    continue
                exc = f.exception()
                if exc is None:
                    on_done(futures[f], f.result())
                elif error is None:
                    error = exc  # stop starting new requests; let in-flight ones finish
                    for g in futures:
                        g.cancel()
            if error is not None:
                raise error


# ====================================================================== tiny checkpoint
_TINY_CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}{IMAGE}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_TINY_CORPUS = [
    'Which candidate box shows exactly the object "the red cup"? {"choice": 0, "confidence": 0.9}',
    '{"choice": null, "confidence": 0.25} {"description": "the small red mug left of the laptop"}',
    "Answer with one JSON object and nothing else. Box coordinates from 0 to 1000.",
]


def _tiny_tokenizer(special: list[str], image_tokens: dict[str, str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _TINY_CORPUS * 20,
        trainers.BpeTrainer(
            vocab_size=500, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    m = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(
        vocab=m["vocab"],
        merges=[tuple(x) for x in m["merges"]],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=image_tokens,
    )
    tok.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    return tok


def build_tiny_vlm(out_dir: str | Path, arch: str = "llava", seed: int = 0) -> Path:
    """Write a tiny random-weight chat VLM checkpoint that `TransformersVLM` loads offline.

    `arch="llava"` (default): CLIP vision tower + Qwen2 text model; processor and model
    round-trip through `AutoProcessor`/`AutoModelForImageTextToText` (environment.md section 4).
    `arch="qwen2_5_vl"`: laid out like a real Qwen2.5-VL checkpoint (model, tokenizer,
    `preprocessor_config.json` naming `Qwen2_5_VLProcessor`, `chat_template.jinja`, no video
    processor), so it exercises the no-torchvision loader fallback real Qwen checkpoints need.
    """
    import torch
    import transformers as hf

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if arch == "llava":
        special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
        tok = _tiny_tokenizer(special, {"image_token": "<image>"})
        imgp = hf.CLIPImageProcessor(
            size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=False
        )
        proc = hf.LlavaProcessor(
            image_processor=imgp,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=_TINY_CHAT.replace("{IMAGE}", "<image>"),
            image_token="<image>",
        )
        cfg = hf.LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                projection_dim=32,
            ),
            text_config=dict(
                model_type="qwen2",
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=1024,
                bos_token_id=None,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            ),
            image_token_id=tok.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )
        hf.LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
        proc.save_pretrained(out)
        return out
    if arch == "qwen2_5_vl":
        special = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ]
        tok = _tiny_tokenizer(
            special,
            {
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>",
                "vision_end_token": "<|vision_end|>",
            },
        )
        chat = _TINY_CHAT.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>")
        imgp = hf.Qwen2VLImageProcessor(
            patch_size=14,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112},
        )
        cfg = hf.Qwen2_5_VLConfig(
            text_config=dict(
                vocab_size=len(tok),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=1024,
                bos_token_id=None,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=32,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[0],
            ),
            image_token_id=tok.image_token_id,
            video_token_id=tok.video_token_id,
            vision_start_token_id=tok.vision_start_token_id,
            vision_end_token_id=tok.vision_end_token_id,
        )
        hf.Qwen2_5_VLForConditionalGeneration(cfg).eval().save_pretrained(out)
        tok.save_pretrained(out)
        imgp.save_pretrained(out)
        pp = out / "preprocessor_config.json"
        data = json.loads(pp.read_text())
        data["processor_class"] = "Qwen2_5_VLProcessor"  # as in real Qwen2.5-VL checkpoints
        pp.write_text(json.dumps(data, indent=2, sort_keys=True))
        (out / "chat_template.jinja").write_text(chat)
        return out
    raise ValueError(f"unknown tiny VLM arch {arch!r} (llava | qwen2_5_vl)")
