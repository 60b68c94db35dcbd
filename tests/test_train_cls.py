"""The torch model matches llama.cpp, and the cls recipe learns a separable signal on a tiny model."""
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from runtime.backends.base import Sampling  # noqa: E402
from runtime.backends.llama import LlamaBackend, LlamaModelFile  # noqa: E402
from safechat.train.cls_recipe import (Encoded, KVCache, auroc, calibrate, encode, score_gguf,  # noqa: E402
                               shared_prefixes, train_cls)  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402


@pytest.fixture(scope="module")
def frozen(tiny_safe):
    return FrozenLlama(tiny_safe)


def test_torch_forward_matches_llama_cpp(frozen, tiny_safe):
    import llama_cpp as ll
    mf = LlamaModelFile(tiny_safe)
    toks = mf.tokenize("<|im_start|>user\nthe weather in spring<|im_end|>\n", True)
    be = LlamaBackend(mf, n_ctx=256, threads=1, safety_ids=mf.safety_meta().token_ids)
    p_ll = be.start(toks, Sampling(), check=True)
    row = np.ctypeslib.as_array(ll.llama_get_logits_ith(be.ctx, len(toks) - 1), shape=(mf.n_vocab,))
    _, _, logits = frozen.prefill(torch.tensor([toks]), return_logits=True)
    np.testing.assert_allclose(logits[0, -1].numpy(), row, rtol=2e-3, atol=1e-2)  # llama.cpp keeps K/V in F16
    # [CLS] against cached keys/values == [CLS] as the last token of a full sequence == llama.cpp
    cls, safe, unsafe = mf.safety_meta().token_ids
    kv, _ = frozen.prefill(torch.tensor([toks]))
    h = frozen.cls_forward(frozen.w["token_embd.weight"][cls], kv, torch.tensor([len(toks)]))
    _, full = frozen.prefill(torch.tensor([toks + [cls]]))
    torch.testing.assert_close(h[0], full[0, -1], atol=1e-5, rtol=1e-5)
    head = frozen.w["token_embd.weight"][[safe, unsafe]]
    p_torch = torch.softmax(h @ head.T, -1)[0, 1].item()
    assert p_torch == pytest.approx(p_ll, abs=1e-3)


def test_cls_forward_respects_each_query_context_length(frozen):
    toks = list(range(10, 40))
    kv, full = frozen.prefill(torch.tensor([toks]))
    cls_row = torch.randn(frozen.cfg.n_embd)
    lens = torch.tensor([5, 17, 30])
    h = frozen.cls_forward(cls_row, kv[:, :, [0, 0, 0]], lens)
    for q, n in enumerate(lens.tolist()):
        ref = frozen.cls_forward(cls_row, kv[:, :, :, :n], torch.tensor([n]))
        torch.testing.assert_close(h[q], ref[0], atol=1e-5, rtol=1e-5)


def test_chained_side_tokens_equal_appending_them_to_the_sequence(frozen):
    """K side rows against cached keys/values == the rows appended after the context in one causal pass."""
    toks = list(range(10, 30))
    kv, _ = frozen.prefill(torch.tensor([toks]))
    rows = torch.randn(3, frozen.cfg.n_embd)
    lens = torch.tensor([8, 20])
    h = frozen.cls_forward(rows, kv[:, :, [0, 0]], lens)
    for q, n in enumerate(lens.tolist()):
        x = torch.cat([frozen.embed(torch.tensor(toks[:n])), rows])[None]
        full, _ = frozen.forward(x, torch.arange(n + 3)[None])
        torch.testing.assert_close(h[q], full[0, -1], atol=1e-5, rtol=1e-5)
    one = frozen.cls_forward(rows[-1:], kv, torch.tensor([20]))  # K=1 given as (1, D) == as (D,)
    torch.testing.assert_close(one, frozen.cls_forward(rows[-1], kv, torch.tensor([20])))


def test_cls_read_after_fewer_layers_equals_a_model_of_those_layers(frozen, tmp_path):
    """read_layer (`bench cls_variants --read-layers`): the [CLS] read after the first n layers
    (output norm applied) == the last hidden state of the same model cut to n layers, from the cache too."""
    import copy
    import dataclasses
    toks = list(range(10, 30))
    n = frozen.cfg.n_layer - 1
    cut = copy.copy(frozen)
    cut.cfg = dataclasses.replace(frozen.cfg, n_layer=n)
    row = torch.randn(frozen.cfg.n_embd)
    full, _ = cut.forward(torch.cat([frozen.embed(torch.tensor(toks)), row[None]])[None], torch.arange(21)[None])
    kv, _ = frozen.prefill(torch.tensor([toks]))
    h = frozen.cls_forward(row, kv[:n], torch.tensor([20]))  # the first n layers' keys/values
    torch.testing.assert_close(h[0], full[0, -1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h, frozen.cls_forward(row, kv, torch.tensor([20])), atol=1e-3)  # not the last layer
    cache = KVCache(frozen, [toks], tmp_path / "kv.npy")
    assert cache.gather([0], [20], n).shape[0] == n
    torch.testing.assert_close(frozen.cls_forward(row, cache.gather([0], [20], n), torch.tensor([20])), h,
                               atol=2e-3, rtol=2e-3)  # fp16 cache


def test_kv_cache_stores_a_prefix_once_and_serves_every_sequence_its_own_keys(frozen, tmp_path):
    a = list(range(10, 30))
    seqs = [a, a + [5, 6, 7], list(range(40, 52)), list(a), a[:7], [9, 9]]
    cache = KVCache(frozen, seqs, tmp_path / "kv.npy")
    assert cache.n_tokens == len(seqs[1]) + len(seqs[2]) + len(seqs[5])  # a, its copy and a[:7] live in a + [5, 6, 7]
    assert cache.start[0] == cache.start[1] == cache.start[3] == cache.start[4]
    for i, s in enumerate(seqs):
        kv, _ = frozen.prefill(torch.tensor([s]))
        torch.testing.assert_close(cache.gather([i], [len(s)])[:, :, 0], kv[:, :, 0], atol=2e-3, rtol=2e-3)  # fp16
    again = KVCache(frozen, seqs, tmp_path / "kv.npy")  # a finished cache is reused
    assert not again.data.flags.writeable and np.array_equal(again.data, cache.data)


def test_kv_cache_computes_a_shared_prefix_once_and_gives_every_sequence_its_own_keys(frozen, tmp_path):
    """Sequences sharing first tokens (chat template, jailbreak template, prompt) continue from the stored
    keys/values of the one they share them with; every sequence still reads what a full pass gives."""
    chat, tmpl = list(range(10, 22)), list(range(60, 75))
    seqs = [chat + tmpl + [3, 4, 5, 6, 7, 8, 9, 2, 1], chat + [30, 31], chat + tmpl + [3, 4, 5, 6, 7, 8, 9, 2, 8, 8],
            chat + tmpl + [90, 91, 92], list(range(100, 140)), chat + tmpl + [3, 4, 5, 6, 7, 8, 9, 2, 1, 7]]
    # ranked: 1, 0, 5, 2, 3, 4; each reads from the lowest-ranked sequence sharing its longest prefix
    assert shared_prefixes(seqs) == [(1, 12), (None, 0), (0, 35), (0, 27), (None, 0), (0, 36)]
    cache = KVCache(frozen, seqs, tmp_path / "kv.npy", max_batch_tokens=64)
    for i, s in enumerate(seqs):
        kv, _ = frozen.prefill(torch.tensor([s]))
        torch.testing.assert_close(cache.gather([i], [len(s)])[:, :, 0], kv[:, :, 0], atol=2e-3, rtol=2e-3)  # fp16


def test_cls_recipe_learns_and_scores_through_the_converted_file(frozen, tiny_base, tmp_path):
    """Label 1 = the prompt mentions 'qz'; trained rows, folded into a GGUF, separate in llama.cpp."""
    from runtime.artifact import Artifact
    from runtime.fold import convert_gguf
    mf = LlamaModelFile(tiny_base)
    rng = random.Random(0)
    words = ["the", "a", "sun", "rain", "tree", "hill", "road", "lamp", "book", "door"]
    exs = []
    for i in range(160):
        label = i % 2
        text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))
        if label:
            text = text + " qz qz qz"
        exs.append(encode({"prompt": text, "label": label, "augmentation": "none"}, mf, mf.chat_template))
    train, test = exs[:120], exs[120:]
    val = exs[100:120]
    cls_row, head, info = train_cls(frozen, train[:100], tmp_path / "kv.npy", epochs=6, lr=2e-2, val=val,
                                    log=lambda *_: None)
    assert 1 <= info["best_epoch"] <= 6 and info["best_val_auroc_torch"] > 0.9
    assert not (tmp_path / "kv.npy").exists()
    art = Artifact(cls_row, head, {"threshold": 0.5})
    out = convert_gguf(tiny_base, art, tmp_path / "trained.gguf", progress=False)
    assert out.cls_token_id == mf.n_vocab
    scores = np.array([s[0] for s in score_gguf(tmp_path / "trained.gguf", test, threads=1)])
    labels = np.array([e.label for e in test])
    assert auroc(scores, labels) > 0.95
    thr = calibrate(scores, labels, max_fpr=0.05)
    assert (scores[labels == 0] >= thr).mean() <= 0.05


def test_calibrate_respects_the_false_positive_budget():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(0, 0.6, 500), rng.uniform(0.4, 1, 500)])
    y = np.array([0] * 500 + [1] * 500)
    for fpr in (0.0, 0.01, 0.05, 0.2):
        thr = calibrate(s, y, fpr)
        assert (s[y == 0] >= thr).mean() <= fpr
    assert auroc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0


def test_encode_places_cls_after_prompt_and_inside_responses(tiny_base):
    mf = LlamaModelFile(tiny_base)
    e = encode({"prompt": "hi", "response": "word " * 40, "label": 0}, mf, mf.chat_template)
    assert isinstance(e, Encoded) and e.positions[0] < e.positions[-1] <= len(e.tokens)
    p = encode({"prompt": "hi", "prefill": "Sure, here is", "label": 1}, mf, mf.chat_template)
    assert p.positions == [len(p.tokens)] and p.tokens[-len(mf.tokenize("Sure, here is", False)):] == \
        mf.tokenize("Sure, here is", False)


def test_report_names_a_directory_without_a_card(tmp_path):
    from safechat.train.__main__ import main
    with pytest.raises(SystemExit, match="card.json not found.*not a safety artifact"):
        main(["report", str(tmp_path)])


def test_report_states_the_calibration_of_old_and_new_cards():
    import json

    from runtime.default_model import ASSET
    from safechat.train.__main__ import metrics_table
    card = json.loads((ASSET / "card.json").read_text())  # calibrated on every val conversation
    line = metrics_table(card).splitlines()[-1]
    cal = card["calibration"]
    assert f"val attacks caught {cal['val_attacks_caught']}" in line
    assert f"plain benign refused {cal['val_plain_refused']}" in line and "lookalikes refused" in line
    assert "inside answers never" in line or "inside answers 0." in line
    near = dict(card, answer_threshold=0.9999798)  # an answer threshold close to 1 is not rounded to 1
    assert "inside answers 0.999980 " in metrics_table(near).splitlines()[-1]
    # a card of the previous calibration (prefill attacks and lookalikes only) still reads
    old = dict(card, calibration={"budget": 0.05, "val_attacks_caught": "29/47", "val_benign_refused": "6/138"})
    assert "benign refused 6/138" in metrics_table(old).splitlines()[-1]
