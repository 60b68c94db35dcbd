"""ONNX export (safechat/convert/onnx_export.py) and the ONNX backend (runtime/backends/onnx.py) on the tiny model."""
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("torch")

import runtime  # noqa: E402
from runtime.contract import MetadataError  # noqa: E402
from safechat.convert.onnx_export import export_onnx  # noqa: E402
from runtime.backends.base import Sampling  # noqa: E402
from runtime.backends.llama import ll  # noqa: E402
from runtime.errors import ModelFileError  # noqa: E402

PROMPT = [{"role": "user", "content": "the rain in spain falls on the plain"}]


@pytest.fixture(scope="module")
def onnx_dir(tiny_safe, tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    shutil.copy(tiny_safe, d / "model.gguf")          # the vocabulary, beside the .onnx (same stem)
    export_onnx(tiny_safe, d / "model.onnx", progress=False)
    return d


@pytest.fixture(scope="module")
def models(tiny_safe, onnx_dir):
    ml = runtime.load(tiny_safe, n_ctx=512)
    mo = runtime.load(onnx_dir / "model.onnx", backend="onnx", n_ctx=512)
    yield ml, mo
    ml.close()
    mo.close()


def _llama_row(b) -> np.ndarray:
    return np.ctypeslib.as_array(ll.llama_get_logits_ith(b.ctx, b._row), shape=(b.mf.n_vocab,)).copy()


def test_metadata_and_io(onnx_dir, tiny_safe):
    import onnx

    m = onnx.load(str(onnx_dir / "model.onnx"))
    props = {p.key: p.value for p in m.metadata_props}
    for k in ("format_version", "cls_token_id", "safe_token_id", "unsafe_token_id", "threshold", "metrics"):
        assert "safety." + k in props
    assert "<|im_start|>" in props["tokenizer.chat_template"]
    assert props["safechat.vocab_gguf"] == tiny_safe.name
    assert [o.name for o in m.graph.output][:2] == ["logits", "safety_logits"]
    shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert shapes["safety_logits"] == [1, 2] and shapes["logits"][0] == 1


def test_logits_and_verdicts_match_llama(models):
    ml, mo = models
    toks = ml.tokenize_messages(PROMPT)
    assert toks == mo.tokenize_messages(PROMPT)
    bl, bo = ml.backend, mo.backend
    s = Sampling()
    pl, po = bl.start(toks, s, check=True), bo.start(toks, s, check=True)
    assert abs(pl - po) < 5e-3                       # llama.cpp keeps K/V in F16
    assert np.abs(_llama_row(bl) - bo._logits).max() < 0.05
    for step in range(16):
        tl, to = bl.sample(), bo.sample()
        assert tl == to
        ck = step % 3 == 0
        pl, po = bl.advance(tl, ck), bo.advance(to, ck)
        assert (pl is None) == (po is None) == (not ck)
        if ck:
            assert abs(pl - po) < 5e-3
        assert np.abs(_llama_row(bl) - bo._logits).max() < 0.05
        el, eo = bl.hesitation(), bo.hesitation()
        assert abs(el[0] - eo[0]) < 1e-2 and abs(el[1] - eo[1]) < 1e-2
    assert abs(bl.check() - bo.check()) < 5e-3


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)])
def test_side_cls_does_not_disturb_generation(models, sampling):
    _, mo = models
    b = mo.backend
    toks = mo.tokenize_messages(PROMPT)

    def run(check: bool):
        out, rows = [], []
        b.start(toks, sampling, check=check)
        buffers = [c.ctypes.data for c in b.cache]
        for _ in range(24):
            t = b.sample()
            out.append(t)
            rows.append(b._logits.copy())
            b.advance(t, check)
        assert [c.ctypes.data for c in b.cache] == buffers   # the KV cache is written in place
        assert b.n_past == len(toks) + 24
        return out, np.stack(rows)

    (t_off, r_off), (t_on, r_on) = run(False), run(True)
    assert t_off == t_on
    assert np.abs(r_off - r_on).max() < 1e-4


def test_sampler_never_picks_safety_tokens(models):
    _, mo = models
    b = mo.backend
    b.start(mo.tokenize_messages(PROMPT), Sampling(temperature=1.0, seed=1), check=False)
    b._logits = b._logits.copy()
    b._logits[list(b.safety_ids)] = 1e6
    assert b.sample() not in b.safety_ids
    b._sampling = Sampling()
    assert b.sample() not in b.safety_ids


def test_load_chat_end_to_end(models, onnx_dir):
    ml, mo = models
    assert mo.path == onnx_dir / "model.onnx"
    ro = mo.chat(PROMPT, max_tokens=20, seed=0)
    rl = ml.chat(PROMPT, max_tokens=20, seed=0)
    assert not ro.refused and ro.usage.completion_tokens == rl.usage.completion_tokens
    assert ro.text == rl.text
    assert [c for c, _ in ro.safety.trace] == [c for c, _ in rl.safety.trace]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ro.safety.trace, rl.safety.trace)) < 5e-3
    pieces = list(g := mo.chat(PROMPT, max_tokens=20, seed=0, stream=True))
    assert "".join(pieces) == ro.text and g.reply.text == ro.text
    r = mo.chat(PROMPT, max_tokens=20, seed=0, safety=runtime.SafetyPolicy(threshold=0.01))
    assert r.refused and r.safety.intervened_at == 0 and "unsafe" in r.safety.reason
    off = mo.chat(PROMPT, max_tokens=20, seed=0, safety="off")
    assert off.text == ro.text and off.safety.checks == 0


def test_missing_vocabulary_gguf_is_a_clear_error(onnx_dir, tmp_path):
    shutil.copy(onnx_dir / "model.onnx", tmp_path / "alone.onnx")
    with pytest.raises(ModelFileError, match="GGUF"):
        runtime.load(tmp_path / "alone.onnx", backend="onnx")


def test_export_refuses_a_plain_model(tiny_base, tmp_path):
    with pytest.raises(MetadataError, match="not a safe model"):
        export_onnx(tiny_base, tmp_path / "x.onnx", progress=False)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("quant", ["int8", "int4", "int8-dynamic"])
def test_quantized_export_loads_and_keeps_the_head_float(quant, tiny_safe, models, tmp_path):
    import onnx

    out = export_onnx(tiny_safe, tmp_path / f"model-{quant}.onnx", quant=quant, progress=False)
    shutil.copy(tiny_safe, out.with_suffix(".gguf"))
    g = onnx.load(str(out)).graph
    ops = {n.op_type for n in g.node}
    assert ("MatMulInteger" if quant == "int8-dynamic" else "MatMulNBits") in ops
    heads = [n for n in g.node if n.op_type == "Gemm"]
    assert len(heads) == 2                                    # logits and safety_logits stay float
    inits = {i.name: i for i in g.initializer}
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT for n in heads)
    m = runtime.load(out, backend="onnx", n_ctx=256)
    r = m.chat(PROMPT, max_tokens=8)
    assert r.usage.completion_tokens >= 1 and r.safety.checks >= 2
    _, mo = models
    ref = mo.chat(PROMPT, max_tokens=8)
    assert abs(r.safety.trace[0][1] - ref.safety.trace[0][1]) < 0.1   # random tiny weights: loose bound
    m.close()


def test_convert_cli_onnx_subcommand(tiny_safe, tiny_base, tmp_path):
    import shutil
    import subprocess
    import sys
    gguf = tmp_path / "m.gguf"
    shutil.copy(tiny_safe, gguf)
    r = subprocess.run([sys.executable, "-m", "safechat.convert", "onnx", str(gguf), str(tmp_path / "m.onnx"), "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import runtime
    m = runtime.load(tmp_path / "m.onnx", backend="onnx", n_ctx=256)
    assert m.chat("hi", max_tokens=3).safety.checks >= 1
    r = subprocess.run([sys.executable, "-m", "safechat.convert", "onnx", str(tiny_base), str(tmp_path / "x.onnx")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_prompt_logprobs_match_llama_and_the_rule_runs_on_onnx(models):
    """The surprisal rule's input (runtime/surprisal.py) from the ONNX prefill, cut after each scored row."""
    ml, mo = models
    msgs = PROMPT + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "}}]( zx == --!! 743"}]
    toks, users = ml.user_tokens(msgs)
    assert (toks, users) == mo.user_tokens(msgs)
    pl = ml.backend.start(toks, Sampling(), check=True, reuse=False, score=users)
    po = mo.backend.start(toks, Sampling(), check=True, score=users)
    assert po == pytest.approx(pl, abs=5e-3)  # the verdict is unchanged by the cut prefill
    assert mo.backend.prompt_logprobs() == pytest.approx(ml.backend.prompt_logprobs(), abs=2e-2)
    assert _llama_row(ml.backend) == pytest.approx(mo.backend._logits, abs=2e-2)  # sampling continues alike
    off = mo.chat(msgs, max_tokens=3, temperature=0, safety={"threshold": 0.99, "surprisal_threshold": 1e6})
    on = mo.chat(msgs, max_tokens=3, temperature=0, safety={"threshold": 0.99,
                                                            "surprisal_threshold": off.safety.surprisal - 0.01})
    assert not off.refused and on.refused and "gibberish" in on.safety.reason
