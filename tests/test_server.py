"""The OpenAI-compatible server: a real uvicorn on a free port, driven by httpx and the `openai` client.

Concurrency through the server lives in test_concurrency_and_plot.py, fuzzing in test_fuzz.py."""
import gc
import json
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import runtime  # noqa: E402
from runtime.server import create_app  # noqa: E402
from tests.live_server import live_server  # noqa: E402

KEY = "test-key"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def models(tiny_safe):
    # the Python token loop (native=False) samples through backend.sample, which is slowed down here to
    # ~50 tokens/s, so a full answer takes ~10 s: long enough to hang up mid-stream or fill the queue
    slow = runtime.load(tiny_safe, n_ctx=512, threads=1, native=False)
    sample = slow.backend.sample

    def slow_sample():
        time.sleep(0.02)
        return sample()

    slow.backend.sample = slow_sample
    ms = {"tiny": runtime.load(tiny_safe, n_ctx=512, threads=1),
          "tiny-refuse": runtime.load(tiny_safe, n_ctx=512, threads=1, safety={"threshold": 0.0001, "every": 1}),
          "tiny-slow": slow}
    yield ms
    for m in ms.values():  # never free a model while a (failed test's) generation still runs on it
        if m._lock.acquire(timeout=15):
            m.close()
            m._lock.release()


@pytest.fixture(scope="module")
def server(models):
    with live_server(create_app(models, api_key=KEY, max_body_bytes=64 * 1024, max_tokens_cap=480)) as url:
        yield url


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)


def _chat(http, **body):
    return http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 16, **body})


def _sse(http, **body):
    """POST a streaming request; return the decoded `data:` events (without [DONE]) and whether [DONE] came."""
    events, done = [], False
    with http.stream("POST", "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 16, "stream": True,
                                                           **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    done = True
                else:
                    events.append(json.loads(line[6:]))
    return events, done


def _assert_error(r, status, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    assert "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_health_and_models(server, http, client):
    r = httpx.get(f"{server}/health")  # no token needed
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["queues"]["tiny"] == {"in_flight": 0, "waiting": 0, "max_queue": 8}
    d = http.get("/v1/models").json()
    assert d["object"] == "list" and [m["id"] for m in d["data"]] == ["tiny", "tiny-refuse", "tiny-slow"]
    assert [m.id for m in client.models.list()] == ["tiny", "tiny-refuse", "tiny-slow"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_bearer_token(server, http):
    _assert_error(httpx.get(f"{server}/v1/models"), 401, "invalid_api_key")
    r = httpx.post(f"{server}/v1/chat/completions", json={"messages": HELLO},
                   headers={"Authorization": "Bearer wrong"})
    _assert_error(r, 401, "invalid_api_key")
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HELLO)


def test_non_streaming_shape(http):
    r = _chat(http)  # no model: the first one is the default
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["object"] == "chat.completion" and d["model"] == "tiny" and d["id"].startswith("chatcmpl-")
    ch = d["choices"][0]
    assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
    assert ch["finish_reason"] in ("stop", "length")
    u = d["usage"]
    assert u["prompt_tokens"] > 0 and 0 < u["completion_tokens"] <= 16
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    s = d["safety"]
    assert s["refused"] is False and s["reason"] is None and s["checks"] >= 2 and s["intervened_at"] is None
    assert 0.0 <= s["max_p_unsafe"] <= 1.0


def test_openai_client_stream_equals_non_stream(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=24, temperature=0)
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    assert full.model_extra["safety"]["refused"] is False
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == text
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == "length"
    assert final[0].model_extra["safety"]["checks"] == full.model_extra["safety"]["checks"]
    assert chunks[-1].usage.completion_tokens == 24


def test_max_completion_tokens_and_sampling_params(http):
    d = _chat(http, max_tokens=None, max_completion_tokens=5, temperature=0.7, top_p=0.9, seed=3).json()
    assert d["usage"]["completion_tokens"] == 5
    again = _chat(http, max_tokens=5, temperature=0.7, top_p=0.9, seed=3).json()
    assert again["choices"] == d["choices"] and again["usage"] == d["usage"]  # same seed, same answer


def test_safety_refusal_is_content_filter(client, http):
    r = client.chat.completions.create(model="tiny-refuse", messages=HELLO, max_tokens=16)
    assert r.choices[0].finish_reason == "content_filter"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "I can't help with that."
    s = r.model_extra["safety"]
    assert s["refused"] is True and s["intervened_at"] == 0 and s["reason"].startswith("unsafe:")
    assert s["checks"] == 1 and s["max_p_unsafe"] >= 0.0001
    events, done = _sse(http, model="tiny-refuse")
    assert done and "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "I can't help with that."
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter" and events[-1]["safety"]["refused"] is True


def test_request_errors(server, http, client):
    r = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    _assert_error(r, 400, "invalid_json")
    _assert_error(http.post("/v1/chat/completions", json=[1, 2]), 400)
    _assert_error(_chat(http, messages=5), 400)
    _assert_error(_chat(http, messages=[{"role": "wizard", "content": "hi"}]), 400)
    _assert_error(_chat(http, messages=[{"role": "user", "content": 3}]), 400)
    r = http.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}')
    _assert_error(r, 400)  # a JSON escape that decodes to a lone surrogate is not text
    assert "unpaired surrogate" in r.json()["error"]["message"]
    _assert_error(_chat(http, n=True), 400)
    _assert_error(_chat(http, messages=[]), 400)
    _assert_error(_chat(http, messages=[{"role": "user", "content": "x" * 3000}]), 400, "context_length_exceeded")
    _assert_error(_chat(http, model="nope"), 404, "model_not_found")
    _assert_error(_chat(http, max_tokens=481), 400)  # above the cap
    _assert_error(_chat(http, max_tokens=0), 400)
    _assert_error(_chat(http, temperature="hot"), 400)
    _assert_error(_chat(http, stream=True, model="nope"), 404)  # streaming errors are plain JSON too
    _assert_error(_chat(http, messages=[{"role": "user", "content": "x" * 70_000}]), 413, "request_too_large")
    _assert_error(http.get("/v1/nothing-here"), 404)
    _assert_error(http.get("/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])
    assert _chat(http).status_code == 200  # the server is still fine


def test_content_parts_are_accepted(http):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    assert _chat(http, messages=parts, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"] == \
        _chat(http, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"]


def test_stop_seed_refusal_and_unsupported_fields(http, client):
    full = _chat(http, max_tokens=24, temperature=0).json()["choices"][0]["message"]["content"]
    cut = full[5:8]
    d = _chat(http, max_tokens=24, temperature=0, stop=[cut]).json()
    assert d["choices"][0]["message"]["content"] == full[:full.index(cut)]
    assert d["choices"][0]["finish_reason"] == "stop"
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, temperature=0, stop=cut)
    assert r.choices[0].message.content == full[:full.index(cut)]
    # no seed: a fresh one per request, so sampled answers differ ("regenerate" works)
    texts = {_chat(http, max_tokens=16, temperature=1.0).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert len(texts) > 1
    refused = _chat(http, model="tiny-refuse").json()["choices"][0]["message"]
    assert refused["refusal"] == refused["content"] == "I can't help with that."
    assert _chat(http).json()["choices"][0]["message"]["refusal"] is None
    for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]), ("logprobs", True),
                         ("top_logprobs", 2), ("tool_choice", "required"),
                         ("response_format", {"type": "yaml"})):
        r = _chat(http, **{field: value})
        _assert_error(r, 400)
        assert r.json()["error"]["param"] == field
    assert _chat(http, response_format={"type": "text"}, tool_choice="none").status_code == 200
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["n"], int)
    for bad in ({"stop": [""]}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": 3}, {"temperature": -1},
                {"top_p": 5}):
        _assert_error(_chat(http, **bad), 400)


def test_cors_localhost_by_default_and_opt_in_origins(models):
    app = create_app({"tiny": models["tiny"]}, cors_origins=["https://app.example"])
    with live_server(app) as url:
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        for origin, allowed in (("http://localhost:5173", True), ("http://127.0.0.1:3000", True),
                                ("https://app.example", True), ("https://evil.example", False)):
            r = httpx.options(f"{url}/v1/chat/completions", headers={"Origin": origin, **pre})
            assert (r.status_code == 200) == allowed, (origin, r.status_code)
            assert (r.headers.get("access-control-allow-origin") == origin) == allowed
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "http://localhost:8080"})
        assert r.headers["access-control-allow-origin"] == "http://localhost:8080"


def test_client_disconnect_releases_model(server, http, models):
    slow = models["tiny-slow"]
    body = {"model": "tiny-slow", "messages": HELLO, "max_tokens": 480, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # the first content piece: the model is busy generating
        assert slow._lock.locked()
        t0 = time.time()  # the event loop stays responsive while the model works in a thread
        assert httpx.get(f"{server}/health", timeout=5).status_code == 200 and time.time() - t0 < 2
    # the connection is closed mid-stream (a full answer would hold the lock for ~10 s)
    deadline = time.time() + 3
    while slow._lock.locked():
        assert time.time() < deadline, "the model's lock was not released after the client disconnected"
        time.sleep(0.02)
    _wait_for(lambda: http.get("/health").json()["queues"]["tiny-slow"]["in_flight"] == 0, "the turn's release")
    t0 = time.time()
    r = _chat(http, model="tiny-slow", max_tokens=4)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4 and time.time() - t0 < 3
    # a non-streaming client that gives up (read timeout) stops its generation too
    errors = []

    def give_up():
        try:
            http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        except httpx.ReadTimeout as e:
            errors.append(e)

    t = threading.Thread(target=give_up)
    t.start()
    deadline = time.time() + 3
    while not slow._lock.locked():  # generating (a full answer would hold the lock for ~10 s)
        assert time.time() < deadline, "the non-streaming request did not start"
        time.sleep(0.01)
    t.join(10)
    assert errors, "the client should have timed out"
    deadline = time.time() + 3
    while slow._lock.locked():
        assert time.time() < deadline, "the model's lock was not released after a non-streaming client left"
        time.sleep(0.02)
    _wait_for(lambda: http.get("/health").json()["queues"]["tiny-slow"]["in_flight"] == 0, "the turn's release")


def test_a_client_that_hangs_up_mid_stream_frees_the_model_without_the_collector(server, models):
    """Issue 34: the server closes the stream of a client that went away (httpx and the openai client, each
    reading two pieces, then closing the connection), with the cyclic garbage collector off: the next
    request is served at once, neither 503 nor after the model's busy_timeout."""
    slow = models["tiny-slow"]
    body = {"model": "tiny-slow", "messages": HELLO, "max_tokens": 480, "stream": True}
    auth = {"Authorization": f"Bearer {KEY}"}

    def with_httpx():
        with httpx.Client(base_url=server, headers=auth, timeout=30) as c:
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                pieces = 0
                for line in r.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        pieces += 1
                        if pieces == 2:
                            break
                assert slow._lock.locked()  # generating: a full answer would hold the model ~10 s

    def with_openai():
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30)
        stream = client.chat.completions.create(model="tiny-slow", messages=HELLO, max_tokens=480, stream=True)
        pieces = 0
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                if pieces == 2:
                    break
        assert slow._lock.locked()
        stream.close()

    collecting = gc.isenabled()
    gc.disable()
    try:
        for hang_up in (with_httpx, with_openai):
            hang_up()
            t0 = time.time()
            with httpx.Client(base_url=server, headers=auth, timeout=30) as c:
                r = c.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, (hang_up.__name__, r.text)
            assert time.time() - t0 < 3, f"{hang_up.__name__}: the next request waited for the model"
    finally:
        if collecting:
            gc.enable()


def _wait_for(cond, what, timeout=5.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_bounded_queue_answers_503_with_retry_after(models):
    """One request generates, `max_queue` wait; the next gets 503 + Retry-After, never an unbounded pile-up."""
    with pytest.raises(ValueError, match="max_queue"):
        create_app(models, max_queue=-1)
    app = create_app({"slow": models["tiny-slow"]}, max_queue=2, retry_after=3)
    queue = app.state.server.queues["slow"]
    short = {"messages": HELLO, "max_tokens": 4}
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={**short, "max_tokens": 480, "stream": True}) as busy:
            assert busy.status_code == 200  # generating: holds the model for ~10 s
            assert queue.stats() == {"in_flight": 1, "waiting": 0, "max_queue": 2}
            # a client that gives up while waiting leaves the queue at once (not when the model frees up)
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/chat/completions", json=short, timeout=0.5)
            _wait_for(lambda: queue.in_flight == 1, "the impatient client to leave the queue")
            results = []

            def wait_in_queue():
                with httpx.Client(base_url=url, timeout=30) as own:
                    results.append(own.post("/v1/chat/completions", json=short))

            waiters = [threading.Thread(target=wait_in_queue) for _ in range(2)]
            for t in waiters:
                t.start()
            _wait_for(lambda: c.get("/health").json()["queues"]["slow"]["waiting"] == 2, "two queued requests")
            for body in (short, {**short, "stream": True}):  # the queue is full: refused at once
                r = c.post("/v1/chat/completions", json=body)
                _assert_error(r, 503, "model_busy")
                assert r.headers["retry-after"] == "3" and r.json()["error"]["type"] == "server_error"
                assert "is busy" in r.json()["error"]["message"] and "2 more are waiting" in r.text
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as e:
                client.chat.completions.create(model="slow", messages=HELLO, max_tokens=4)
            assert e.value.status_code == 503
            assert queue.stats() == {"in_flight": 3, "waiting": 2, "max_queue": 2}  # refusals never joined
            assert not results  # nothing overtook the busy stream
        # the busy stream is closed mid-answer: the waiting requests get the model, in turn
        for t in waiters:
            t.join(20)
        assert [r.status_code for r in results] == [200, 200], [r.text for r in results]
        assert all(r.json()["usage"]["completion_tokens"] == 4 for r in results)
        _wait_for(lambda: queue.in_flight == 0, "the queue to drain")
        assert c.post("/v1/chat/completions", json=short).status_code == 200
