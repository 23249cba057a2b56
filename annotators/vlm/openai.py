"""The HTTP backend: an OpenAI-compatible chat-completions endpoint such as vLLM (`OpenAIVLM`), on the `openai` SDK."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from annotators.cache import ResponseCache
from annotators.images import to_data_url
from annotators.parsing import REWRITE_SCHEMA, VERDICT_SCHEMA
from annotators.vlm.base import VLMTransportError, _ChatVLM

log = logging.getLogger(__name__)

_STRUCTURED_SCHEMAS = {"verdict": VERDICT_SCHEMA, "rewrite": REWRITE_SCHEMA}


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (ConnectionRefusedError under the SDK's APIConnectionError)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _tuned_openai_class() -> type:
    """`openai.OpenAI` whose retry wait is ours: `backoff * 2**n`, or the server's Retry-After, capped.

    The SDK's own retries run (which statuses, which errors, Retry-After parsing); only the wait is
    overridden, through `_calculate_retry_timeout`, the one hook the pinned SDK has for it
    (docs/annotators.md "OpenAI-compatible endpoint").
    """
    import openai

    class _TunedOpenAI(openai.OpenAI):
        gr3d_backoff: float = 1.0
        gr3d_max_backoff: float = 30.0

        def _calculate_retry_timeout(self, remaining_retries: int, options: Any,  # type: ignore[override]
                                     response_headers: Any = None) -> float:
            retry_after = self._parse_retry_after_header(response_headers)
            if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
                return min(retry_after, self.gr3d_max_backoff)
            n = options.get_max_retries(self.max_retries) - remaining_retries
            return min(self.gr3d_backoff * 2.0 ** min(n, 30), self.gr3d_max_backoff)

    return _TunedOpenAI


class OpenAIVLM(_ChatVLM):
    """An OpenAI-compatible chat-completions endpoint (vLLM, SGLang, OpenAI, ...) through the `openai` SDK.

    `base_url` includes the API prefix, e.g. `http://host:8000/v1` (None: `$OPENAI_BASE_URL`); the image
    goes as a base64 data URL in an `image_url` content part followed by the text part. The SDK does the
    HTTP: retries (at most `max_retries` after the first try) on connection errors, timeouts, 408/409/429
    and 5xx, waiting `backoff * 2**n` seconds or the server's `Retry-After` (both capped at
    `max_backoff`); other 4xx fail at once; `timeout` bounds each request; proxies come from the
    environment (HTTPS_PROXY / HTTP_PROXY / NO_PROXY). At most `max_concurrency` requests are in flight
    per client, across all threads using it.

    Structured output: with `structured_output` (default) each request carries `response_format`
    `json_schema` with the answer's schema (`annotators.parsing.VERDICT_SCHEMA` / `REWRITE_SCHEMA`); an
    endpoint that answers 400 naming it (`response_format` / `json_schema` / `structured` in the error) is asked again without it, and the client stops sending it (then
    `json_mode` sends `{"type": "json_object"}`, else nothing), so every endpoint works as before.
    A 200 whose body is not a chat completion is retried by us (the SDK would hand it back as is).

    Accounting: `requests_sent` counts every HTTP request, retries included (an httpx event hook sees
    each one); `calls` counts model answers received.
    """

    def __init__(
        self,
        base_url: str | None,
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
        structured_output: bool = True,
        extra_body: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        super().__init__(cache, draw_marks)
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base_url (or $OPENAI_BASE_URL) must be http(s)://host[:port]/prefix, got {url!r}")
        self.base_url = url
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
        self.structured_output = structured_output
        self.extra_body = dict(extra_body or {})
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._client_lock = threading.Lock()
        self._sdk: Any = None
        # json_schema constrains decoding, so it is part of what answered (and of the cache key)
        self.model_id = model_id or (f"openai:{model}|max_tokens={max_tokens}|temperature={temperature}"
                                     + ("|json_schema" if structured_output else ""))
        self.requests_sent = 0  # HTTP requests incl. retries (self.calls counts model calls)

    def __repr__(self) -> str:
        return (
            f"OpenAIVLM(base_url={self.base_url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"
        )

    def __getstate__(self) -> dict[str, Any]:  # Ray/Beam ship the client to workers: rebuild the SDK there
        state = self.__dict__.copy()
        for k in ("_slots", "_client_lock", "_calls_lock", "_sdk"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._client_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._sdk = None

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- the SDK client ------------------------------------------------------------------
    def _on_request(self, request: Any) -> None:
        with self._calls_lock:
            self.requests_sent += 1

    def _on_response(self, response: Any) -> None:
        if response.status_code >= 400:
            response.read()
            ra = response.headers.get("retry-after")
            log.warning("%s: HTTP %d%s: %s", self.base_url, response.status_code,
                        f" (Retry-After {ra})" if ra else "", self._scrub(response.text[:200]))

    def _client(self) -> Any:
        with self._client_lock:
            if self._sdk is None:
                import httpx2
                import openai

                http = openai.DefaultHttpxClient(
                    event_hooks={"request": [self._on_request], "response": [self._on_response]},
                    limits=httpx2.Limits(max_connections=self.max_concurrency,
                                         max_keepalive_connections=self.max_concurrency),
                )
                cls = _tuned_openai_class()
                sdk = cls(base_url=self.base_url, api_key=self._api_key or "unused", timeout=self.timeout,
                          max_retries=self.max_retries, http_client=http)
                sdk.gr3d_backoff, sdk.gr3d_max_backoff = self.backoff, self.max_backoff
                self._sdk = sdk
            return self._sdk

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

    def _response_format(self, kind: str | None) -> dict[str, Any] | None:
        if self.structured_output and kind in _STRUCTURED_SCHEMAS:
            return {"type": "json_schema",
                    "json_schema": {"name": kind, "schema": _STRUCTURED_SCHEMAS[kind], "strict": True}}
        if self.json_mode:
            return {"type": "json_object"}
        return None

    def _send(self, messages: list[dict[str, Any]], kind: str | None) -> bytes:
        """One SDK call (with its retries): the 200 body, or VLMTransportError."""
        import openai

        sdk = self._client()
        while True:
            rf = self._response_format(kind)
            kw: dict[str, Any] = {}
            if rf is not None:
                kw["response_format"] = rf
            if self._api_key is None:
                kw["extra_headers"] = {"Authorization": openai.Omit()}
            if self.extra_body:
                kw["extra_body"] = self.extra_body
            try:
                with self._slots:
                    raw = sdk.chat.completions.with_raw_response.create(
                        model=self.model, messages=messages, temperature=self.temperature,
                        max_tokens=self.max_tokens, **kw)
                return raw.http_response.content
            except openai.APIStatusError as exc:
                status = exc.status_code
                body = self._scrub(exc.response.text[:300])
                if (status == 400 and rf is not None and rf["type"] == "json_schema" and self.structured_output
                        and re.search(r"response_format|json_schema|structured", body, re.I)):
                    log.warning("%s: structured output (response_format json_schema) refused (%s); "
                                "asking without it from now on", self.base_url, body[:120])
                    self.structured_output = False
                    continue
                retried = status in (408, 409, 429) or status >= 500
                lead = f"gave up after {self.max_retries + 1} attempts; last: " if retried else ""
                raise VLMTransportError(f"{self.base_url}: {lead}HTTP {status}: {body}", status) from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                root = _root_cause(exc)
                raise VLMTransportError(
                    f"{self.base_url}: gave up after {self.max_retries + 1} attempts; last: "
                    f"{type(root).__name__}: {self._scrub(str(root))}", None) from None

    def _post(self, image: Any, prompt: str, kind: str | None = None) -> str:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": to_data_url(image, self.image_format)}},
                    {"type": "text", "text": prompt},
                ],
            }
        ]
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            data = self._send(messages, kind)
            try:
                text = self._content(json.loads(data))
            except ValueError as exc:
                last = f"malformed response body: {self._scrub(str(exc))[:200]}"
            else:
                self._count()
                return text
            if attempt < self.max_retries:
                wait_s = min(self.backoff * 2**attempt, self.max_backoff)
                log.warning("%s: attempt %d failed (%s); retrying in %.2fs", self.base_url, attempt + 1,
                            last[:120], wait_s)
                time.sleep(wait_s)
        raise VLMTransportError(
            f"{self.base_url}: gave up after {self.max_retries + 1} attempts; last: {last}", 200)

    def _complete_kinds(self, batch: list[tuple[Any, str]], kinds: Sequence[str | None],
                        on_done: Callable[[int, str], None]) -> None:
        if len(batch) == 1:
            on_done(0, self._post(*batch[0], kinds[0]))
            return
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(batch))) as pool:
            futures = {pool.submit(self._post, im, p, k): i for i, ((im, p), k) in enumerate(zip(batch, kinds))}
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

    def _complete(self, batch: list[tuple[Any, str]], on_done: Callable[[int, str], None]) -> None:
        self._complete_kinds(batch, [None] * len(batch), on_done)
