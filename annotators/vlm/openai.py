"""The HTTP backend: an OpenAI-compatible chat-completions endpoint such as vLLM (`OpenAIVLM`), with retries."""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from annotators.cache import ResponseCache
from annotators.images import to_data_url
from annotators.vlm.base import VLMTransportError, _ChatVLM

log = logging.getLogger(__name__)


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
