"""The ONNX export of every family but llama (safechat/convert/onnx_hf.py: transformers' layers in the graph) runs
in the runtime's ONNX backend as llama.cpp runs the same GGUF: the same prompt tokens, next-token logits
and [CLS] verdicts at the prompt and inside the answer, the same greedy answer; `convert onnx` verifies
and stamps the file, and int8 quantizes its layers."""
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import runtime  # noqa: E402
from safechat.convert.hf_import import convert_any  # noqa: E402
from safechat.convert.onnx_export import export_onnx  # noqa: E402
from runtime.backends.base import Sampling  # noqa: E402
from runtime.backends.llama import ll  # noqa: E402
from runtime.strategy import SafetyPolicy  # noqa: E402
from tests.test_hf_families import _artifact, _checkpoint  # noqa: E402

MSGS = [{"role": "user", "content": "How do I bake bread? The quick brown fox jumps over the lazy dog."}]


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "gemma3", "phi3"])
def exported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"onnx-{request.param}")
    folder, _, model = _checkpoint(d, request.param)
    art = _artifact(model.config.hidden_size)
    art.head *= 0.2  # verdicts away from 0 and 1, where a difference shows
    convert_any(folder, art, d / "model.gguf", progress=False)
    export_onnx(d / "model.gguf", d / "model.onnx", progress=False)
    return request.param, d


def _row(b) -> np.ndarray:
    return np.ctypeslib.as_array(ll.llama_get_logits_ith(b.ctx, b._row), shape=(b.mf.n_vocab,)).copy()


def test_onnx_backend_computes_what_llama_cpp_computes(exported):
    name, d = exported
    ml = runtime.load(d / "model.gguf", n_ctx=256, threads=1)
    mo = runtime.load(d / "model.onnx", backend="onnx", n_ctx=256, threads=1)
    toks = ml.tokenize_messages(MSGS)
    assert toks == mo.tokenize_messages(MSGS) and len(toks) > 8  # gemma3's window is 4: past it
    bl, bo, s = ml.backend, mo.backend, Sampling()
    pl, po = bl.start(toks, s, check=True), bo.start(toks, s, check=True)
    assert abs(pl - po) < 5e-3 and 0.01 < po < 0.99, (name, pl, po)  # llama.cpp keeps K/V in F16
    scale = np.abs(bo._logits).max()
    assert np.abs(_row(bl) - bo._logits).max() < 5e-3 * scale, name
    for step in range(12):
        tl, to = bl.sample(), bo.sample()
        assert tl == to, (name, step)
        ck = step % 2 == 0
        pl, po = bl.advance(tl, ck), bo.advance(to, ck)
        if ck:
            assert abs(pl - po) < 5e-3, (name, step, pl, po)
        assert np.abs(_row(bl) - bo._logits).max() < 2e-2 * scale, (name, step)  # F16 K/V drift
    ml.close()
    policy = SafetyPolicy(threshold=0.999999, every=1)
    r = mo.chat(MSGS, max_tokens=8, temperature=0, safety=policy)
    assert r.safety.checks >= 8 and not r.refused
    mo.close()


def test_convert_onnx_verifies_and_stamps_it_and_int8_quantizes_its_layers(exported, tmp_path):
    import onnx

    from safechat.convert.__main__ import main
    from safechat.convert.stamp import read_stamp
    from safechat.convert.verify import PROMPTS_V1
    from runtime.contract import VERIFIED

    name, d = exported
    shutil.copy(d / "model.gguf", tmp_path / "model.gguf")
    assert main(["onnx", str(tmp_path / "model.gguf"), str(tmp_path / "model.onnx"), "--quiet",
                 "--tokens", "2", "--threads", "1", "--prompts", str(PROMPTS_V1)]) == 0
    assert read_stamp(tmp_path / "model.onnx")[VERIFIED] == "pass", name
    q = export_onnx(d / "model.gguf", tmp_path / "q" / "model.onnx", quant="int8", progress=False)
    shutil.copy(d / "model.gguf", q.with_suffix(".gguf"))
    g = onnx.load(str(q)).graph
    assert sum(n.op_type == "MatMulNBits" for n in g.node) >= 7  # every layer's projections (fused in phi3)
    m, ref = (runtime.load(f, backend="onnx", n_ctx=256, threads=1, allow_unverified=True)
              for f in (q, d / "model.onnx"))
    a, b = (x.chat(MSGS, max_tokens=4, temperature=0) for x in (m, ref))
    assert abs(a.safety.trace[0][1] - b.safety.trace[0][1]) < 0.1  # random tiny weights: a loose bound
    m.close()
    ref.close()
