"""The desktop example runs headless: streaming through a background thread, and Cancel."""
import sys
from pathlib import Path

import runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import desktop_chat  # noqa: E402


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
