"""The torch Gemma 3 (the `cls` recipe's second base) computes what llama.cpp computes, sliding window included."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.tiny_model import write_tiny_gemma3  # noqa: E402
from safechat.train.cls_recipe import KVCache  # noqa: E402
from safechat.convert.gemma3_torch import FrozenGemma3  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama
from safechat.convert.reference import load_frozen  # noqa: E402

WINDOW = 8


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    path = write_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "tiny-gemma3.gguf", window=WINDOW)
    return path, load_frozen(path)


def test_load_frozen_picks_the_architecture_and_the_llama_class_refuses_gemma(gemma, tiny_base):
    path, model = gemma
    assert isinstance(model, FrozenGemma3) and model.cfg.head_dim == 32 and model.window == WINDOW
    assert type(load_frozen(tiny_base)) is FrozenLlama
    with pytest.raises(ValueError, match="architecture 'gemma3'"):
        FrozenLlama(path)


def test_torch_gemma3_matches_llama_cpp_at_every_position_past_the_window(gemma):
    import llama_cpp
    path, model = gemma
    toks = list(range(10, 40))  # 30 positions: the sliding-window layers drop keys >= 8 back
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(toks)
    ref = np.array(llm.scores[:len(toks)])
    llm.close()
    _, _, logits = model.prefill(torch.tensor([toks]), return_logits=True)
    np.testing.assert_allclose(logits[0].numpy(), ref, rtol=2e-3, atol=1e-2)  # llama.cpp: F16 K/V, GELU table
    unwindowed = type(model).__new__(type(model))
    unwindowed.__dict__.update(model.__dict__, window=None)  # every layer global: a different model
    _, _, other = unwindowed.prefill(torch.tensor([toks]), return_logits=True)
    assert np.abs(other[0, WINDOW:].numpy() - ref[WINDOW:]).max() > 0.1


def test_gemma3_cls_against_cached_keys_equals_the_token_appended(gemma, tmp_path):
    """A [CLS] row (scaled like any token's embedding) against cached keys/values, one or chained side
    rows, from a prefix-sharing fp16 cache, == the same rows appended to the sequence in one pass."""
    _, model = gemma
    toks = list(range(10, 35))
    kv, _ = model.prefill(torch.tensor([toks]))
    row = model.w["token_embd.weight"][77]
    h = model.cls_forward(row, kv, torch.tensor([len(toks)]))
    _, full = model.prefill(torch.tensor([toks + [77]]))
    torch.testing.assert_close(h[0], full[0, -1], atol=1e-5, rtol=1e-5)
    rows = torch.randn(3, model.cfg.n_embd) * 0.1
    lens = torch.tensor([6, 25])
    hs = model.cls_forward(rows, kv[:, :, [0, 0]], lens)
    for q, n in enumerate(lens.tolist()):
        x = torch.cat([model.embed(torch.tensor(toks[:n])), rows * model.embed_scale])[None]
        ref, _ = model.forward(x, torch.arange(n + 3)[None])
        torch.testing.assert_close(hs[q], ref[0, -1], atol=1e-5, rtol=1e-5)
    seqs = [toks, toks[:20] + [5, 6, 7, 8, 9, 11, 12, 13, 14, 15]]  # the second continues the first's stored rows
    cache = KVCache(model, seqs, tmp_path / "kv.npy", max_batch_tokens=32)
    for i, s in enumerate(seqs):
        kv_i, _ = model.prefill(torch.tensor([s]))
        torch.testing.assert_close(cache.gather([i], [len(s)])[:, :, 0], kv_i[:, :, 0], atol=2e-3, rtol=2e-3)


def test_prompts_use_the_file_s_template_or_gemma_turns_for_a_gemma3_file_without_one(gemma, tiny_base):
    from runtime.backends.llama import LlamaModelFile
    from tests.tiny_model import CHATML
    from runtime.prompt import GEMMA_TURNS, prompt_template
    g, llama = LlamaModelFile(gemma[0], vocab_only=True), LlamaModelFile(tiny_base, vocab_only=True)
    assert (g.architecture, g.chat_template, prompt_template(g)) == ("gemma3", None, GEMMA_TURNS)
    assert (llama.architecture, prompt_template(llama)) == ("llama", CHATML)
