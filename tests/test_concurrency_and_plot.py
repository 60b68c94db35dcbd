"""Several threads chatting through one loaded model; the p_unsafe trace plot."""
import threading

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


def test_plot_trace_writes_a_png(model, tmp_path):
    pytest.importorskip("matplotlib")
    from runtime.plot import plot_trace
    r = model.chat("draw me", max_tokens=10)
    out = plot_trace(r, tmp_path / "trace.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    off = runtime.load(model.path, safety="off", n_ctx=256).chat("x", max_tokens=2)
    with pytest.raises(ValueError, match="no safety checks"):
        plot_trace(off, tmp_path / "none.png")
