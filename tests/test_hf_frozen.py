"""The `cls` recipe's base through transformers (safechat/convert/hf_frozen.py) computes what the hand-written
models compute, and, for the families only it serves, what llama.cpp computes on the folded file.

- On the tiny llama and gemma3 GGUFs: final hidden states, the [CLS] hidden state against cached
  keys/values (one row and chained side rows) and its gradient in the [CLS] row equal FrozenLlama's /
  FrozenGemma3's (their keys are laid out differently, so each reads its own cache).
- On tiny random Qwen2, Qwen3 and Phi-3 checkpoints: `train_cls` on FrozenHF learns rows whose torch
  scores equal llama.cpp's p_unsafe on the folded GGUF at every [CLS] position (the recipe's own check
  that what it trained is what ships).
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safechat.convert.hf_frozen import FrozenHF  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402
from safechat.convert.reference import load_frozen  # noqa: E402
from runtime.artifact import Artifact  # noqa: E402
from tests.tiny_model import write_tiny_gemma3  # noqa: E402
from safechat.train.cls_recipe import Encoded, KVCache, score_cached, score_gguf, train_cls  # noqa: E402


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return write_tiny_gemma3(tmp_path_factory.mktemp("g") / "tiny-gemma3.gguf", window=8)


def _pair(path):
    hand, hf = load_frozen(path), load_frozen(path, impl="transformers")
    assert type(hand) is not FrozenHF and isinstance(hf, FrozenHF)
    return hand, hf


def _cls_and_grad(model, row, toks, lens):
    kv, _ = model.prefill(torch.tensor([toks]))
    ctx = kv[:, :, [0] * len(lens)]
    r = row.clone().requires_grad_(True)
    h = model.cls_forward(r, ctx, torch.tensor(lens))
    (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
    return h.detach(), r.grad


@pytest.mark.parametrize("which", ["llama", "gemma3"])
def test_transformers_base_equals_the_hand_written_model(which, tiny_base, gemma):
    hand, hf = _pair(tiny_base if which == "llama" else gemma)
    toks = list(range(10, 40))  # 30 positions: past gemma3's 8-token window
    _, h1, l1 = hand.prefill(torch.tensor([toks]), return_logits=True)
    _, h2, l2 = hf.prefill(torch.tensor([toks]), return_logits=True)
    torch.testing.assert_close(h2, h1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(l2, l1, atol=1e-3, rtol=1e-4)
    torch.manual_seed(0)
    for rows in (hand.w["token_embd.weight"][77], torch.randn(3, hand.cfg.n_embd) * 0.1):
        a, ga = _cls_and_grad(hand, rows, toks, [6, 25, 30])
        b, gb = _cls_and_grad(hf, rows, toks, [6, 25, 30])
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gb, ga, atol=1e-4, rtol=1e-3)


def test_transformers_cls_against_a_prefix_sharing_cache_equals_the_row_appended(gemma, tmp_path):
    """Through KVCache (fp16 rows, a prefix computed once and extended: FrozenHF.forward with past)."""
    hf = load_frozen(gemma, impl="transformers")
    a, b = list(range(10, 30)), list(range(10, 30)) + list(range(50, 62))  # b extends a: shared rows
    c = list(range(10, 22)) + [90, 91, 92]                                 # shares 12 tokens with both
    cache = KVCache(hf, [a, b, c], tmp_path / "kv.npy")
    row = hf.w["token_embd.weight"][77]
    for i, seq in enumerate([a, b, c]):
        for n in (5, len(seq)):
            h = hf.cls_forward(row, cache.gather([i], [n]), torch.tensor([n]))
            _, full = hf.prefill(torch.tensor([seq[:n] + [77]]))
            torch.testing.assert_close(h[0], full[0, -1], atol=3e-3, rtol=3e-3)  # fp16 cache


def test_load_frozen_refuses_an_unknown_implementation(tmp_path):
    with pytest.raises(ValueError, match="impl must be"):
        load_frozen(tmp_path / "x.gguf", impl="onnx")


# -- the families only transformers serves: train, fold, and llama.cpp agrees ----------------
from tests.test_hf_families import _checkpoint  # noqa: E402


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_train_cls_on_a_transformers_base_gives_what_llama_cpp_scores(family, tmp_path):
    from safechat.convert.hf_import import hf_to_gguf
    from runtime.fold import convert_gguf

    folder, tok, _ = _checkpoint(tmp_path, family)
    base = hf_to_gguf(folder, tmp_path / "base.gguf")
    model = load_frozen(base)
    assert isinstance(model, FrozenHF) and model.arch == family
    rng = np.random.default_rng(0)
    seqs = [tok.encode(t, add_special_tokens=False) for t in
            ["How do I bake bread?", "The quick brown fox jumps.", "they'll eat 7 of them!", "Indented text"]]
    encoded = []
    for k in range(24):  # the label is a token the sequence holds: learnable by a [CLS] that reads it
        s = [int(x) for x in rng.choice(seqs[k % 4], size=8)] + [int(rng.integers(5, 300))]
        encoded.append(Encoded(s, [4, len(s)], int(s[-1] % 2), {}))
    cls_row, head, _ = train_cls(model, encoded, tmp_path / "kv.npy", epochs=3, lr=3e-2, log=lambda *_: None)
    torch_scores = score_cached(model, KVCache(model, [e.tokens for e in encoded], tmp_path / "kv2.npy"),
                                encoded, torch.from_numpy(cls_row), torch.from_numpy(head))
    safe = tmp_path / "safe.gguf"
    convert_gguf(base, Artifact(cls_row, head, {"threshold": 0.5}), safe, progress=False)
    file_scores = score_gguf(safe, encoded, threads=1)
    got, want = np.array(sum(file_scores, [])), np.array(sum(torch_scores, []))
    assert np.abs(got - want).max() < 2e-2, (family, np.abs(got - want).max())
    assert want.std() > 0.01  # the rows learned something: a constant score would agree trivially


@pytest.mark.parametrize("impl", ["auto", "transformers"])
def test_category_features_scale_the_cls_row_as_the_file_does(gemma, impl):
    """`train categories` reads the [CLS] appended in one plain pass: on Gemma its row is scaled by
    sqrt(d) like every token's (the folded file's row is), so it equals the cached-context [CLS]."""
    from safechat.train.category_head import cls_features

    model = load_frozen(gemma, impl=impl)
    toks = list(range(10, 30))
    row = model.w["token_embd.weight"][77].detach()
    kv, _ = model.prefill(torch.tensor([toks]))
    want = model.cls_forward(row, kv, torch.tensor([len(toks)]))[0].detach().numpy()
    np.testing.assert_allclose(cls_features(model, [toks], row.numpy())[0], want, atol=1e-4, rtol=1e-4)
