"""Several threads chatting through one loaded model, and several clients through the server; the plot."""
import json
import statistics
import threading
import time

import pytest

import runtime


@pytest.fixture(scope="module")
def model(tiny_safe):
    return runtime.load(tiny_safe, n_ctx=512, threads=1, safety={"every": 2})


def test_threads_share_one_model_without_cross_talk(model):
    jobs = [(f"question {i} " * (1 + i % 3), 1.5, i) for i in range(12)]
    kw = dict(max_tokens=12, top_k=0, top_p=1.0, min_p=0.0)
    alone = {j: model.chat(j[0], temperature=j[1], seed=j[2], **kw).text for j in jobs}
    results, errors = {}, []

    def worker(chunk):
        try:
            for j in chunk:
                g = model.chat(j[0], temperature=j[1], seed=j[2], stream=True, **kw)
                results[j] = "".join(g)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert results == alone
    assert len(set(alone.values())) > 1  # different requests really differ


N_CLIENTS = 6
PROMPTS = ["hello", "tell me a story please", "what is 2 + 2?", "name three colours",
           "why is the sky blue?", "write a haiku about rain"]


def _ask(client, body: dict, stream: bool) -> tuple[int, tuple, float]:
    """(status, (text, safety) or the error code, seconds) of one request; streams are reassembled."""
    t0 = time.perf_counter()
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        d = r.json()
        answer = (d["choices"][0]["message"]["content"], d["safety"]) if r.status_code == 200 else d["error"]["code"]
        return r.status_code, answer, time.perf_counter() - t0
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]["code"], time.perf_counter() - t0
        pieces, safety, done = [], None, False
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                pieces.append(event["choices"][0]["delta"].get("content") or "")
                safety = event.get("safety", safety)
        assert done, "the stream ended without [DONE]"
        return 200, ("".join(pieces), safety), time.perf_counter() - t0


def _hammer(url: str, rounds: int, max_tokens: int) -> list[tuple[int, int, bool, int, str, float]]:
    """N_CLIENTS threads, each with its own connection and prompt, streaming and not in turn, started together."""
    httpx = pytest.importorskip("httpx")
    barrier = threading.Barrier(N_CLIENTS)
    out, errors = [], []

    def client(i):
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                barrier.wait(30)
                for k in range(rounds):
                    stream = (i + k) % 2 == 1
                    body = _body(i, max_tokens)
                    out.append((i, k, stream, *_ask(c, body, stream)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(N_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "deadlock: a client did not finish within 180 s"
    assert not errors, errors
    return out


def _body(i: int, max_tokens: int) -> dict:
    """Client i's request: its own prompt and seed. Seeded sampling is as reproducible as greedy decoding,
    and tests that sampler state is per request too (greedy on the random tiny model mostly says newlines)."""
    return {"messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": max_tokens,
            "temperature": 1.5, "top_p": 1.0, "seed": 100 + i}


def _alone(url: str, max_tokens: int) -> list[tuple]:
    """Each client's request answered alone: (text, safety object)."""
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=url, timeout=60) as c:
        answers = [_ask(c, _body(i, max_tokens), False) for i in range(N_CLIENTS)]
    assert all(status == 200 for status, _, _ in answers)
    return [answer for _, answer, _ in answers]


def _same(a, b) -> bool:
    """Equal answers, floats within 1e-6: a next request keeps the cache cells of the prefix it shares with the
    last one (reuse_prefix), computed in another batch, so verdicts may differ in the last bits."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _latency_summary(label: str, seconds: list[float]) -> str:
    q = statistics.quantiles(seconds, n=20, method="inclusive")
    return (f"{label}: n={len(seconds)} min={min(seconds):.3f}s median={statistics.median(seconds):.3f}s "
            f"p90={q[17]:.3f}s p95={q[18]:.3f}s max={max(seconds):.3f}s")


@pytest.fixture(scope="module")
def served(tiny_safe):
    """A real uvicorn serving the tiny model (greedy by default) with the default queue (8 waiting)."""
    pytest.importorskip("uvicorn")
    from runtime.server import create_app
    from tests.live_server import live_server

    m = runtime.load(tiny_safe, n_ctx=512, threads=1, safety={"every": 2})
    app = create_app({"tiny": m})
    with live_server(app) as url:
        yield url, app.state.server.queues["tiny"], m


def test_concurrent_clients_through_the_server(served):
    """6 clients at once, streaming and not: each gets its own request's answer, nothing hangs."""
    url, queue, _ = served
    alone = _alone(url, 24)
    # different requests really differ: in the text, and in the p_unsafe trace of their own KV cache
    assert len({text for text, _ in alone}) > 1
    assert len({(text, json.dumps(safety)) for text, safety in alone}) == N_CLIENTS
    results = _hammer(url, rounds=3, max_tokens=24)
    assert len(results) == 3 * N_CLIENTS
    for i, k, stream, status, answer, _ in results:
        assert status == 200, (i, k, stream, answer)  # 6 in flight < 1 + 8: nobody is turned away
        assert _same(answer, alone[i]), f"client {i} round {k} (stream={stream}) got another request's answer"
    assert queue.in_flight == 0
    print("\n" + _latency_summary("6 clients x 3 requests, 24 tokens, queue 8", [r[-1] for r in results]))


def test_overloaded_server_answers_each_request_or_503(served):
    """With room for 1 + 2 requests, 6 clients each get their own answer or a clean 503, never a hang."""
    url, _, m = served
    from runtime.server import create_app
    from tests.live_server import live_server

    app = create_app({"tiny": m}, max_queue=2)
    with live_server(app) as small:
        alone = _alone(small, 48)
        results = _hammer(small, rounds=2, max_tokens=48)
        queue = app.state.server.queues["tiny"]
        assert queue.in_flight == 0
    served_ok = [r for r in results if r[3] == 200]
    for i, k, stream, status, answer, _ in results:
        assert status in (200, 503), (status, answer)
        assert _same(answer, alone[i] if status == 200 else "model_busy"), (i, k, stream, status)
    # the first burst: at most 3 can be in flight, and every admitted request completes
    assert len(served_ok) >= 3
    print("\n" + _latency_summary(f"6 clients x 2 requests, 48 tokens, queue 2 ({len(served_ok)} served, "
                                  f"{len(results) - len(served_ok)} x 503)", [r[-1] for r in results]))


def test_plot_trace_writes_a_png(model, tmp_path):
    pytest.importorskip("matplotlib")
    from runtime.plot import plot_trace
    r = model.chat("draw me", max_tokens=10)
    out = plot_trace(r, tmp_path / "trace.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    off = runtime.load(model.path, safety="off", n_ctx=256).chat("x", max_tokens=2)
    with pytest.raises(ValueError, match="no safety checks"):
        plot_trace(off, tmp_path / "none.png")
