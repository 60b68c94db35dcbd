"""The examples run headless: the desktop worker (background thread, streaming, Cancel), and the
OpenAI-client example against a real `python -m runtime serve` subprocess on the tiny model."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import runtime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import desktop_chat  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
KEY = "sk-example"


def test_worker_streams_and_cancel_releases_the_model(tiny_safe):
    model = runtime.load(tiny_safe, n_ctx=512, threads=1, safety={"every": 1})
    w = desktop_chat.ChatWorker(model)
    w.start("hello", max_tokens=20)
    pieces = []
    while (p := w.pieces.get(timeout=30)) is not desktop_chat.DONE:
        pieces.append(p)
    w.join(5)
    assert w.reply is not None and "".join(pieces) == w.reply.text
    w.start("hello", max_tokens=400, temperature=1.0, top_k=0, min_p=0.0)
    w.pieces.get(timeout=30)
    w.cancel()
    while w.pieces.get(timeout=30) is not desktop_chat.DONE:
        pass
    w.join(5)
    # the lock is free again: another chat completes
    assert model.chat("again", max_tokens=3).usage.completion_tokens <= 3


def test_headless_prints_the_streamed_reply(tiny_safe, capsys):
    r = desktop_chat.headless("hi", str(tiny_safe), max_tokens=5, cancel_after=None)
    out = capsys.readouterr().out
    assert r is not None and r.usage.completion_tokens <= 5
    assert out.startswith(r.text) and len(out) >= len(r.text) + 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(tiny_safe, tiny_base, tmp_path_factory):
    """`python -m runtime serve` on two tiny models: "tiny", and "strict" (a threshold that refuses all)."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from runtime.fold import convert_gguf
    from tests.tiny_model import random_artifact

    strict = tmp_path_factory.mktemp("strict") / "strict.gguf"
    convert_gguf(tiny_base, random_artifact(threshold=0.0001), strict, progress=False)
    port = _free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", "--model", f"tiny={tiny_safe}", "--model", f"strict={strict}",
           "--port", str(port), "--api-key", KEY, "--threads", "1", "--max-queue", "3", "--max-tokens-cap", "64",
           "--n-ctx", "512", "--max-tokens", "5", "--temperature", "0", "--every", "2"]  # the flags chat has too
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        assert proc.poll() is None, f"the server exited: {proc.stderr.read()}"
        assert time.time() < deadline, "the server did not come up within 60 s"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait(10)


def _example(*args):
    return subprocess.run([sys.executable, str(REPO / "examples" / "openai_client.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


def _split(stdout: str) -> tuple[str, dict]:
    """(everything before the 'safety:' line, the safety object)."""
    head, sep, tail = stdout.rpartition("safety: ")
    assert sep, stdout
    return head, json.loads(tail)


def test_serve_cli_flags_reach_the_server(cli_server):
    import httpx
    health = httpx.get(f"{cli_server}/health").json()
    assert health["models"] == ["tiny", "strict"]
    assert health["queues"]["tiny"] == {"in_flight": 0, "waiting": 0, "max_queue": 3}
    assert httpx.get(f"{cli_server}/v1/models").status_code == 401  # --api-key is enforced
    r = subprocess.run([sys.executable, "-m", "runtime", "serve", "--max-queue", "-1"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--max-queue must be >= 0" in r.stderr and "Traceback" not in r.stderr
    # the shared sampling and policy flags: the defaults of what a request leaves out, and the model's policy
    auth = {"Authorization": f"Bearer {KEY}"}
    ask = lambda **kw: httpx.post(f"{cli_server}/v1/chat/completions", headers=auth, timeout=60,  # noqa: E731
                                  json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **kw}).json()
    short, longer = ask(), ask(max_tokens=12)
    assert short["usage"]["completion_tokens"] <= 5 < longer["usage"]["completion_tokens"]
    assert ask()["choices"][0]["message"]["content"] == short["choices"][0]["message"]["content"]  # temperature 0
    assert short["safety"]["checks"] >= 3  # the prompt, then every 2 tokens


def test_openai_client_example_streams_and_prints_safety(cli_server):
    base = ["--base-url", f"{cli_server}/v1", "--api-key", KEY, "--max-tokens", "8"]
    streamed = _example("hello", *base)  # no --model: the server's first model
    assert streamed.returncode == 0, streamed.stderr
    text, safety = _split(streamed.stdout)
    assert safety["refused"] is False and safety["reason"] is None and safety["checks"] >= 1
    assert 0.0 <= safety["max_p_unsafe"] <= 1.0 and "[refused" not in text
    whole = _example("hello", *base, "--model", "tiny", "--no-stream")
    assert whole.returncode == 0, whole.stderr
    assert _split(whole.stdout) == (text, safety)  # streaming and not: the same answer and verdicts


def test_openai_client_example_shows_a_refusal(cli_server):
    r = _example("hello", "--base-url", f"{cli_server}/v1", "--api-key", KEY, "--model", "strict",
                 "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    text, safety = _split(r.stdout)
    assert text.startswith("I can't help with that.")
    assert safety["refused"] is True and safety["intervened_at"] == 0
    assert f"[refused: {safety['reason']}]" in text and safety["reason"].startswith("unsafe:")


def test_openai_client_example_errors_are_clear(cli_server):
    r = _example("hello", "--base-url", f"{cli_server}/v1", "--api-key", "wrong")
    assert r.returncode == 1 and "error: HTTP 401: missing or invalid API key" in r.stderr
    r = _example("hello", "--base-url", f"{cli_server}/v1", "--api-key", KEY, "--max-tokens", "65")
    assert r.returncode == 1 and "error: HTTP 400: 'max_tokens' is 65; this server allows at most 64" in r.stderr
    r = _example("hello", "--base-url", f"http://127.0.0.1:{_free_port()}/v1", "--max-retries", "0")
    assert r.returncode == 1 and "error: no server at" in r.stderr and "Traceback" not in r.stderr
