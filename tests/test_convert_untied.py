"""An untied tiny Llama (separate output.weight): the head rows go into output.weight, harmless rows into the
input embedding, and llama.cpp's p_unsafe equals the torch reference of the base weights plus the artifact."""
import gguf
import numpy as np
import pytest

import runtime
from runtime.fold import convert_gguf
from runtime.contract import SPECIAL_TOKENS
from tests.tiny_model import N_EMBD, random_artifact, write_tiny_base

PROMPTS = [[{"role": "user", "content": "hello there"}],
           [{"role": "user", "content": "the rain in spain"}, {"role": "assistant", "content": "Sure, here is"}],
           [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the theory of heat?"}],
           [{"role": "user", "content": "at the end"}]]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    d = tmp_path_factory.mktemp("untied")
    base = write_tiny_base(d / "untied-base.gguf", tied=False)
    art = random_artifact(seed=3, head_scale=0.3)
    convert_gguf(base, art, d / "untied-safe.gguf", progress=False)
    return base, d / "untied-safe.gguf", art


def _rows(t) -> np.ndarray:
    return np.asarray(t.data).reshape(-1, N_EMBD)


def test_head_rows_go_into_output_weight(untied):
    base, safe, art = untied
    bt = {t.name: t for t in gguf.GGUFReader(str(base)).tensors}
    st = {t.name: t for t in gguf.GGUFReader(str(safe)).tensors}
    assert set(bt) == set(st) and "output.weight" in st
    n = _rows(bt["token_embd.weight"]).shape[0]
    emb, out = _rows(st["token_embd.weight"]), _rows(st["output.weight"])
    np.testing.assert_array_equal(emb[:n], _rows(bt["token_embd.weight"]))
    np.testing.assert_array_equal(out[:n], _rows(bt["output.weight"]))
    np.testing.assert_array_equal(emb[n], art.cls_embedding)          # the learned [CLS] input row
    np.testing.assert_array_equal(emb[n + 1:], 0)                    # label tokens: never fed, zero rows
    np.testing.assert_array_equal(out[n], 0)                         # [CLS]: never predicted (and masked)
    np.testing.assert_array_equal(out[n + 1:], art.head)             # the classifier rows
    for name in set(bt) - {"token_embd.weight", "output.weight"}:
        assert np.asarray(st[name].data).tobytes() == np.asarray(bt[name].data).tobytes()
    toks = gguf.GGUFReader(str(safe)).fields["tokenizer.ggml.tokens"].contents()
    assert toks[n:] == list(SPECIAL_TOKENS)


def test_llama_cpp_p_unsafe_matches_the_reference_of_base_plus_artifact(untied):
    torch = pytest.importorskip("torch")
    from safechat.convert.llama_torch import FrozenLlama

    base, safe, art = untied
    ref = FrozenLlama(base)  # the BASE's weights; the [CLS] row and head come from the artifact itself
    assert not ref.tied
    m = runtime.load(safe, n_ctx=256)
    got, want = [], []
    for msgs in PROMPTS:
        toks = m.tokenize_messages(msgs)
        got.append(m.chat(msgs, max_tokens=1).safety.trace[0][1])   # the check at the end of the prompt
        kv, _ = ref.prefill(torch.tensor([toks]))
        with torch.no_grad():
            hid = ref.cls_forward(torch.from_numpy(art.cls_embedding), kv, torch.tensor([len(toks)]))
        logits = hid.reshape(-1).double().numpy() @ art.head.astype(np.float64).T
        want.append(float(1 / (1 + np.exp(logits[0] - logits[1]))))
    m.close()
    np.testing.assert_allclose(got, want, atol=5e-3)          # llama.cpp keeps K/V in F16
    assert 0.6 < min(want) and max(want) < 0.95 and max(want) - min(want) > 0.05  # not saturated, not 0.5


def test_untied_quantize_reports_and_verifies_the_output_rows(untied, tmp_path):
    pytest.importorskip("torch")
    from safechat.convert.quantize import quantize
    from safechat.convert.verify import PROMPTS_V1

    _, safe, _ = untied
    res = quantize(safe, tmp_path / "q8.gguf", "Q8_0", n_tokens=2, prompts=PROMPTS_V1, threads=1)
    assert res.output_type == "Q8_0" and "head rows in output.weight (Q8_0)" in res.summary()
    v = res.verification
    assert v.passed and v.embedding == "Q8_0" and v.verdict_agreement == 1.0 and v.mean_abs_dp < 0.02
