"""Test helpers that are real code, for this package's tests and the CoT builder's tests.

- `OpenAIStub`: a loopback HTTP server (stdlib `ThreadingHTTPServer` on 127.0.0.1, port 0) that
  speaks the OpenAI chat-completions protocol. Responses are scripted per request (200 with
  given content, 429 with Retry-After, 500, a slow answer that trips the client timeout, a
  non-protocol body) and fall back to a responder function. It records every request and the
  peak number of requests in flight, so tests can assert payloads, retries and concurrency.
- `ScriptedLogits`: a transformers `LogitsProcessor` that forces given token sequences. Tiny
  random-weight models emit noise; with this, tests drive the REAL generate / decode /
  post-processing path of the tagger and the VLM backend to a known answer.

Stdlib + torch/transformers only; nothing here is used in production code paths.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from transformers import LogitsProcessor

__all__ = ["OpenAIStub", "Step", "ScriptedLogits", "default_responder"]


@dataclass
class Step:
    """One scripted HTTP answer. `content=None` with status 200 asks the responder."""

    status: int = 200
    content: str | None = None
    delay: float = 0.0
    retry_after: str | None = None
    body: bytes | None = None  # raw body override (e.g. not JSON at all)


def default_responder(request: dict[str, Any]) -> str:
    """A well-formed answer for the annotators' verify/rewrite prompts."""
    text = "".join(p.get("text", "") for p in request["messages"][-1]["content"] if p.get("type") == "text")
    if '"choice"' in text:
        return '{"choice": 0, "confidence": 0.8}'
    return '{"description": "the small object near the left edge"}'


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like vLLM/SGLang behind uvicorn
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # keep test output clean

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        stub = self.server.stub
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        # absolute-form (`POST http://host/v1/...`) is what a client sends to an HTTP proxy: the stub
        # then plays the proxy and answers itself (the proxy test).
        path = urllib.parse.urlsplit(self.path).path if "://" in self.path else self.path
        if path != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        try:
            payload = json.loads(raw)
        except ValueError:
            self._send(400, b'{"error": {"message": "bad json"}}')
            return
        step = stub._record(payload, dict(self.headers.items()))
        try:
            if stub.api_key is not None and self.headers.get("Authorization") != f"Bearer {stub.api_key}":
                self._send(401, b'{"error": {"message": "invalid api key"}}')
                return
            if step.delay:
                time.sleep(step.delay)
            if step.body is not None:
                self._send(step.status, step.body)
                return
            if step.status != 200:
                headers = {"Retry-After": step.retry_after} if step.retry_after is not None else {}
                msg = {"error": {"message": f"scripted {step.status}", "type": "server_error"}}
                self._send(step.status, json.dumps(msg).encode(), headers)
                return
            content = step.content if step.content is not None else stub.responder(payload)
            resp = {
                "id": f"chatcmpl-{len(stub.requests)}",
                "object": "chat.completion",
                "created": 0,
                "model": payload.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
            self._send(200, json.dumps(resp).encode())
        finally:
            stub._leave()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    stub: OpenAIStub


class OpenAIStub:
    """Loopback OpenAI-compatible chat-completions server; use as a context manager.

    `script(*steps)` queues answers for the next requests in arrival order; when the queue is
    empty, `responder(request_json)` produces the content of a 200 answer. `url` is the base URL
    to give a client (`http://127.0.0.1:PORT/v1`).
    """

    def __init__(
        self,
        responder: Callable[[dict[str, Any]], str] = default_responder,
        api_key: str | None = None,
    ) -> None:
        self.responder = responder
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._steps: deque[Step] = deque()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def script(self, *steps: Step) -> None:
        """Queue scripted answers for the next requests."""
        with self._lock:
            self._steps.extend(steps)

    def _record(self, payload: dict[str, Any], headers: dict[str, str]) -> Step:
        with self._lock:
            self.requests.append(payload)
            self.headers.append(headers)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return self._steps.popleft() if self._steps else Step()

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("stub not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> OpenAIStub:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ScriptedLogits(LogitsProcessor):
    """Forces token sequences during `generate`, one target per request, in request order.

    Each new `generate` call (detected when the sequence does not extend the previous step by
    one token) takes the next `batch` targets from the queue; row r of the batch (beam rows
    included: row // num_beams) is forced to emit its target then EOS, then EOS/pad forever.
    Use as `generate_kwargs={"logits_processor": LogitsProcessorList([scripted])}`.
    """

    def __init__(self, targets: Sequence[Sequence[int]], eos_token_id: int, num_beams: int = 1) -> None:
        self.queue: deque[list[int]] = deque(list(t) for t in targets)
        self.eos = eos_token_id
        self.num_beams = num_beams
        self.calls = 0
        self._rows: list[list[int]] = []
        self._start = 0
        self._last: Any = None

    @classmethod
    def from_texts(cls, tokenizer: Any, texts: Sequence[str], num_beams: int = 1) -> ScriptedLogits:
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return cls(ids, tokenizer.eos_token_id, num_beams)

    def _new_call(self, input_ids: Any) -> bool:
        last = self._last
        if last is None or input_ids.shape[0] != last.shape[0] or input_ids.shape[1] != last.shape[1] + 1:
            return True
        if self.num_beams == 1:  # beams reorder rows; without beams the prompt must match too
            return not bool((input_ids[:, : self._start] == last[:, : self._start]).all())
        return False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self._new_call(input_ids):
            n = input_ids.shape[0] // self.num_beams
            if len(self.queue) < n:
                raise RuntimeError(f"ScriptedLogits: {n} targets needed, {len(self.queue)} left")
            self._rows = [self.queue.popleft() for _ in range(n)]
            self._start = input_ids.shape[1]
            self.calls += 1
        self._last = input_ids.clone()
        step = input_ids.shape[1] - self._start
        forced = scores.new_full(scores.shape, -1e9)
        for r in range(input_ids.shape[0]):
            target = self._rows[r // self.num_beams]
            forced[r, target[step] if step < len(target) else self.eos] = 0.0
        return forced
