"""Own answers for the cls recipe: the runtime's greedy tokens, [CLS] placed inside them."""
from runtime.backends.base import Sampling
from runtime.backends.llama import LlamaBackend, LlamaModelFile
from safechat.train.cls_recipe import Encoded, encode
from safechat.train.own_answers import add_own_answers, generate, pick, with_answer


def _encoded(mf, n):
    rows = []
    for i in range(n):
        ex = {"prompt": f"question number {i}", "label": i % 2, "prefill": "Sure, here is" if i % 3 == 0 else None,
              "response": "a reference answer" if i % 5 == 1 else None}
        rows.append(encode(ex, mf, mf.chat_template))
    return rows


def test_generate_gives_the_runtime_backends_greedy_tokens(tiny_base):
    mf = LlamaModelFile(tiny_base)
    prompts = [e.tokens for e in _encoded(mf, 4)]
    answers = generate(tiny_base, prompts, max_new=12, threads=1)
    be = LlamaBackend(mf, n_ctx=256, threads=1)
    for toks, ans in zip(prompts, answers):
        be.start(toks, Sampling(), check=False)
        ref = []
        while len(ref) < 12:
            t = be.sample()
            if mf.is_eog(t):
                break
            ref.append(t)
            be.advance(t, check=False)
        assert ans == ref and 0 < len(ans) <= 12
    be.close()


def test_pick_takes_every_prefill_and_skips_reference_responses(tiny_base):
    mf = LlamaModelFile(tiny_base)
    enc = _encoded(mf, 30)
    idx = pick(enc, n_harmful=3, n_benign=2, seed=0)
    prefills = {i for i, e in enumerate(enc) if e.meta["prefill"]}
    assert prefills <= set(idx) and len(idx) == len(prefills) + 5
    assert not any(enc[i].meta["response"] and not enc[i].meta["prefill"] for i in idx)
    assert pick(enc, 3, 2, seed=0) == idx  # deterministic
    for i in (4, 8):  # two benign look-dangerous prompts: every one of them is taken with hardneg=True
        enc[i].meta["augmentation"] = "hardneg_template"
    with_hn = pick(enc, 3, 2, seed=0, hardneg=True)
    assert {4, 8} <= set(with_hn) and len(with_hn) == len(idx) + 2


def test_with_answer_puts_cls_inside_the_answer_with_the_same_label():
    e = Encoded([1, 2, 3], [3], 1, {"id": "x"})
    out = with_answer(e, list(range(100, 120)), points=(4, 12, 32))
    assert out.tokens == [1, 2, 3] + list(range(100, 120)) and out.positions == [3, 7, 15] and out.label == 1
    assert e.positions == [3] and out.meta["own_answer"] == 20  # the input is not modified


def test_add_own_answers_extends_only_the_picked_sequences(tiny_base):
    mf = LlamaModelFile(tiny_base)
    enc = _encoded(mf, 12)
    out, summary = add_own_answers(tiny_base, enc, n_harmful=1, n_benign=1, threads=1, points=(2, 5))
    changed = [i for i, (a, b) in enumerate(zip(enc, out)) if a.tokens != b.tokens]
    assert len(changed) == summary["sequences"] == len(pick(enc, 1, 1))
    for i in changed:
        assert out[i].tokens[:len(enc[i].tokens)] == enc[i].tokens and out[i].positions[0] == enc[i].positions[0]
        assert all(p <= len(out[i].tokens) for p in out[i].positions)
    assert summary["cls_positions_added"] == sum(len(out[i].positions) - len(enc[i].positions) for i in changed)
