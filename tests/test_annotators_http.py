"""OpenAI-compatible backend (the `openai` SDK) against a real loopback chat-completions server.

Every retry is asserted from what the stub saw (`stub.requests`), not from the client's own account.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from annotators.cache import ResponseCache
from annotators.parsing import REWRITE_SCHEMA, VERDICT_SCHEMA, ModelOutputError
from annotators.testing import OpenAIStub, Step
from annotators.vlm import OpenAIVLM, RewriteRequest, VerifyRequest, VLMTransportError

SECRET = "sk-test-5f3a9c1e-DO-NOT-LOG"
ENV = "GR3D_TEST_VLM_KEY"


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(ENV, SECRET)
    with OpenAIStub(api_key=SECRET) as s:
        yield s


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


def _client(stub: OpenAIStub, **kw: Any) -> OpenAIVLM:
    args: dict[str, Any] = dict(model="tiny-vlm", api_key_env=ENV, timeout=2.0, max_retries=3, backoff=0.01)
    args.update(kw)
    return OpenAIVLM(stub.url, **args)


def _img(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (120, 160, 3), dtype=np.uint8)


def _texts(req: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in req["messages"][-1]["content"] if p["type"] == "text")


def _assert_no_secret(*things: Any) -> None:
    for t in things:
        assert SECRET not in str(t) and SECRET not in repr(t)


def _header(stub: OpenAIStub, i: int, name: str) -> str | None:
    return {k.lower(): v for k, v in stub.headers[i].items()}.get(name.lower())


def test_request_payload_and_answer(stub: OpenAIStub, logs: pytest.LogCaptureFixture) -> None:
    client = _client(stub, max_tokens=64, json_mode=True, extra_body={"seed": 7})
    v = client.verify(_img(), "the cup", [(10, 10, 60, 60), (80, 20, 150, 100)])
    assert (v.choice, v.confidence, v.raw) == (0, 0.8, '{"choice": 0, "confidence": 0.8}')
    (req,) = stub.requests
    assert req["model"] == "tiny-vlm" and req["temperature"] == 0.0 and req["max_tokens"] == 64
    assert req["seed"] == 7
    # structured output: the verdict's JSON schema (what parse_verdict accepts)
    rf = req["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "verdict"
    assert rf["json_schema"]["schema"] == VERDICT_SCHEMA
    parts = req["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    url = parts[0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert sent.shape == (120, 160, 3)
    assert not np.array_equal(sent, _img())  # the numbered boxes are drawn on it
    assert "0: [62, 83, 375, 500]" in parts[1]["text"]
    assert _header(stub, 0, "Authorization") == f"Bearer {SECRET}"
    _assert_no_secret(client, logs.text)


def test_429_500_and_timeout_are_retried_with_backoff(
    stub: OpenAIStub, logs: pytest.LogCaptureFixture
) -> None:
    stub.script(Step(status=429, retry_after="0.3"), Step(status=500), Step(delay=2.5))
    client = _client(stub, timeout=1.0)
    t0 = time.monotonic()
    rw = client.rewrite(_img(), "chair", (0, 0, 50, 100), [(100, 0, 150, 100)])
    elapsed = time.monotonic() - t0
    assert rw.text == "the small object near the left edge"
    assert len(stub.requests) == 4 and client.requests_sent == 4 and client.calls == 1
    assert elapsed >= 0.3 + 1.0  # honoured Retry-After, then waited out the timeout
    assert "HTTP 429 (Retry-After 0.3)" in logs.text and "HTTP 500" in logs.text
    assert [_header(stub, i, "x-stainless-retry-count") for i in range(4)] == ["0", "1", "2", "3"]
    _assert_no_secret(logs.text)


def test_gives_up_after_max_retries(stub: OpenAIStub, logs: pytest.LogCaptureFixture) -> None:
    stub.script(*[Step(status=503)] * 3)
    client = _client(stub, max_retries=2)
    with pytest.raises(VLMTransportError) as ei:
        client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert ei.value.status == 503 and "gave up after 3 attempts" in str(ei.value)
    assert len(stub.requests) == 3 and client.calls == 0
    _assert_no_secret(ei.value, logs.text)


def test_other_4xx_fail_fast_and_echoed_key_is_scrubbed(
    stub: OpenAIStub, logs: pytest.LogCaptureFixture
) -> None:
    stub.script(Step(status=400, body=f'{{"error": "bad header: Bearer {SECRET}"}}'.encode()))
    client = _client(stub)
    with pytest.raises(VLMTransportError) as ei:
        client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert ei.value.status == 400 and len(stub.requests) == 1
    assert "Bearer ***" in str(ei.value)
    _assert_no_secret(ei.value, ei.value.args, logs.text)


def test_wrong_key_is_401_without_retry(stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "sk-wrong")
    with pytest.raises(VLMTransportError) as ei:
        _client(stub).verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert ei.value.status == 401 and len(stub.requests) == 1


def test_unreachable_endpoint_raises_after_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, SECRET)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    client = OpenAIVLM(
        f"http://127.0.0.1:{port}/v1", "m", api_key_env=ENV, max_retries=1, backoff=0.01, timeout=1
    )
    with pytest.raises(VLMTransportError) as ei:
        client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert "ConnectionRefusedError" in str(ei.value) and client.requests_sent == 2
    _assert_no_secret(ei.value)


def test_malformed_content_gets_one_repair_retry(stub: OpenAIStub) -> None:
    stub.script(
        Step(content="Sure! It is box 0."),  # unusable -> repair prompt
        Step(body=b"<html>bad gateway</html>"),  # not the protocol: transport retry of the same prompt
        Step(content='{"choice": 0, "confidence": 0.5}'),
        Step(content="box 0"),  # second request: unusable twice -> ModelOutputError
        Step(content='```json\n{"choice": 0}\n```'),
    )
    client = _client(stub)
    v = client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert v.choice == 0 and v.confidence == 0.5 and client.calls == 2 and len(stub.requests) == 3
    assert "could not be used (output does not start with a JSON object)" in _texts(stub.requests[1])
    assert _texts(stub.requests[1]).startswith(_texts(stub.requests[0]))
    with pytest.raises(ModelOutputError) as ei:
        client.verify(_img(1), "the bowl", [(1, 1, 9, 9)])
    assert ei.value.attempts == ["box 0", '```json\n{"choice": 0}\n```'] and "missing key" in ei.value.reason


def test_bounded_concurrency_and_order(stub: OpenAIStub) -> None:
    def responder(req: dict[str, Any]) -> str:
        i = int(re.search(r'mentions "obj(\d+)"', _texts(req)).group(1))  # type: ignore[union-attr]
        return f'{{"choice": {i % 2}, "confidence": 0.5}}'

    stub.responder = responder
    stub.script(*[Step(delay=0.2)] * 8)
    client = _client(stub, max_concurrency=3)
    reqs = [VerifyRequest(_img(), f"obj{i}", [(1, 1, 9, 9), (20, 20, 40, 40)]) for i in range(8)]
    res = client.verify_many(reqs)
    assert [r.choice for r in res] == [i % 2 for i in range(8)]  # type: ignore[union-attr]
    assert 2 <= stub.max_in_flight <= 3  # concurrent, and never above the bound
    assert client.calls == 8


def test_rerun_makes_zero_http_requests(stub: OpenAIStub, tmp_path: Path) -> None:
    vreqs = [VerifyRequest(_img(i), "the cup", [(1, 1, 9, 9), (20, 20, 40, 40)]) for i in range(3)]
    rreqs = [RewriteRequest(_img(i), "cup", (1, 1, 9, 9), [(20, 20, 40, 40)]) for i in range(2)]
    stub.script(Step(content="nope"))  # one malformed answer: its repair call is cached as well
    first = _client(stub, cache=ResponseCache(tmp_path / "c.sqlite"), max_concurrency=4)
    v1, r1 = first.verify_many(vreqs), first.rewrite_many(rreqs)
    assert len(stub.requests) == first.calls == 6
    again = _client(stub, cache=ResponseCache(tmp_path / "c.sqlite"))
    v2, r2 = again.verify_many(vreqs), again.rewrite_many(rreqs)
    assert (v2, r2) == (v1, r1)
    assert len(stub.requests) == 6 and again.calls == 0 and again.requests_sent == 0
    assert again.cache is not None and again.cache.stats()["hits"] == 6
    # a new prompt version / model is a different key: asks again
    other = _client(stub, cache=ResponseCache(tmp_path / "c.sqlite"), model="other-vlm")
    other.verify(vreqs[0].image, "the cup", vreqs[0].candidates)
    assert len(stub.requests) == 7


def test_transport_error_mid_batch_keeps_finished_answers(stub: OpenAIStub, tmp_path: Path) -> None:
    stub.script(Step(delay=0.3), Step(status=400))  # one slow success in flight while the other fails
    cache = ResponseCache(tmp_path / "c.sqlite")
    reqs = [VerifyRequest(_img(i), "the cup", [(1, 1, 9, 9)]) for i in range(4)]
    with pytest.raises(VLMTransportError):
        _client(stub, cache=cache, max_concurrency=2).verify_many(reqs)
    n_cached = len(cache)
    assert n_cached >= 1  # the in-flight answer was cached although the batch failed
    again = _client(stub, cache=ResponseCache(tmp_path / "c.sqlite"), max_concurrency=2)
    res = again.verify_many(reqs)
    assert all(r.choice == 0 for r in res)  # type: ignore[union-attr]
    assert again.requests_sent == 4 - n_cached


def test_structured_output_refused_falls_back_once(stub: OpenAIStub, logs: pytest.LogCaptureFixture) -> None:
    """An endpoint without json_schema support: asked again without it, and not asked with it again."""
    stub.script(Step(status=400, body=b'{"error": {"message": "response_format json_schema is not supported"}}'))
    client = _client(stub, json_mode=True)
    rw = client.rewrite(_img(), "chair", (0, 0, 50, 100))
    assert rw.text == "the small object near the left edge"
    assert [r.get("response_format", {}).get("type") for r in stub.requests] == ["json_schema", "json_object"]
    assert stub.requests[0]["response_format"]["json_schema"]["schema"] == REWRITE_SCHEMA
    client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert stub.requests[2]["response_format"] == {"type": "json_object"} and client.calls == 2
    assert "structured output (response_format json_schema) refused" in logs.text
    plain = _client(stub, structured_output=False)  # neither: no response_format at all
    plain.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert "response_format" not in stub.requests[3]


def test_malformed_json_body_is_retried_and_counted(stub: OpenAIStub) -> None:
    stub.script(Step(body=b'{"choices": [{"message": '), Step(body=b"not json at all"))
    client = _client(stub)
    v = client.verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert v.choice == 0 and len(stub.requests) == 3 and client.requests_sent == 3 and client.calls == 1


def test_no_key_sends_no_authorization(stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV)
    stub.api_key = None
    _client(stub).verify(_img(), "the cup", [(1, 1, 9, 9)])
    assert _header(stub, 0, "Authorization") is None


def test_base_url_from_openai_base_url(stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", stub.url)
    client = OpenAIVLM(None, "tiny-vlm", api_key_env=ENV, max_retries=0)
    assert client.base_url == stub.url and client.verify(_img(), "the cup", [(1, 1, 9, 9)]).choice == 0
    assert len(stub.requests) == 1
    monkeypatch.delenv("OPENAI_BASE_URL")
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        OpenAIVLM(None, "m")


def test_http_proxy_from_the_environment_and_no_proxy(stub: OpenAIStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stub plays the proxy: a request for an unroutable host reaches it via HTTP_PROXY; NO_PROXY bypasses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here
    proxy = stub.url.rsplit("/v1", 1)[0]
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    target = f"http://gr3d-endpoint.invalid:{dead}/v1"
    client = OpenAIVLM(target, "tiny-vlm", api_key_env=ENV, max_retries=0, timeout=2.0)
    assert client.verify(_img(), "the cup", [(1, 1, 9, 9)]).choice == 0
    assert len(stub.requests) == 1 and _header(stub, 0, "Host") == f"gr3d-endpoint.invalid:{dead}"
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "gr3d-endpoint.invalid")
    with pytest.raises(VLMTransportError):
        OpenAIVLM(target, "tiny-vlm", api_key_env=ENV, max_retries=0, timeout=2.0).verify(_img(1), "x", [(1, 1, 9, 9)])
    assert len(stub.requests) == 1
