"""The prompt surprisal rule (issue 35) on real backends over the tiny model: which tokens are the user's,
the log-probabilities the llama.cpp backend scores at prefill against a row-by-row reference, the rule
end to end through `runtime.load` (Python and native loops), its metadata and stamp. The rule itself is
specified and tested against a fake backend in test_strategy.py; ONNX is compared in test_onnx.py."""
import json
import math

import llama_cpp as ll
import numpy as np
import pytest

import runtime
from runtime.backends.base import Sampling, logprob_py
from runtime.contract import PREFIX, VERIFICATION, VERIFIED, SafetyMeta, stamp_mismatches
from runtime.prompt import Segment, build_prompt, prompt_tokens, user_token_positions
from runtime.surprisal import SurprisalError, evidence, user_positions
from runtime.strategy import DEFAULT_REFUSAL

CONVERSATION = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "the rain in spain"},
                {"role": "assistant", "content": "ok then"}, {"role": "user", "content": "falls on the plain"}]
GIBBERISH = "the rain in spain }}]( Spain == --!! 743 )( zx"


@pytest.fixture(scope="module")
def model(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=512)
    yield m
    m.close()


def reference_logprobs(be, toks, positions):
    """Each scored token's log-probability from a fresh prefill of the tokens before it (one row each)."""
    out = []
    for p in positions:
        be.start(toks[:p], Sampling(), check=False, reuse=False)
        row = np.ctypeslib.as_array(ll.llama_get_logits_ith(be.ctx, be._row), shape=(be.mf.n_vocab,)).copy()
        out.append(logprob_py(row, be.mf.n_vocab, be.masked_ids, toks[p]))
    return out


def test_user_positions_cover_user_text_only(model):
    toks, users = model.user_tokens(CONVERSATION)
    assert toks == model.tokenize_messages(CONVERSATION)
    text = b"".join(model.backend.token_bytes(toks[i]) for i in users)
    assert text == b"the rain in spainfalls on the plain"  # both user turns; no system, template or answer
    prompt = build_prompt(model.file.chat_template, CONVERSATION + [{"role": "assistant", "content": "Sure"}])
    ids, users2 = user_token_positions(prompt, model.backend)
    assert ids == prompt_tokens(prompt, model.backend) and users2[:len(users)] == users  # the prefill is not user text
    assert b"Sure" not in b"".join(model.backend.token_bytes(ids[i]) for i in users2)


def test_a_token_merged_across_the_border_counts_and_a_misspelt_run_is_an_error():
    # "Ġthe" spans a template space and the user's "he": it carries user text, so it counts
    assert user_positions([(b"x t", False), (b"he", True)], [b"x", b" the"]) == [1]
    assert user_positions([(b"ab", False), (b"cd", True), (b"ef", False)], [b"a", b"bc", b"d", b"ef"], 5) == [6, 7]
    assert user_positions([(b"hi", True)], [b" hi"]) == [0]  # a SentencePiece "▁" before the run
    with pytest.raises(SurprisalError, match="cannot be located"):
        user_positions([(b"hi", True)], [b"ho"])
    seg = Segment("hi", False)
    assert seg.role is None  # template-less segments built by hand stay valid


def test_llama_backend_scores_match_a_row_by_row_reference(model):
    be = model.backend
    toks, users = model.user_tokens(CONVERSATION)
    be.start(toks, Sampling(), check=True, reuse=False, score=users)
    got = be.prompt_logprobs()
    ref = reference_logprobs(be, toks, users)
    assert len(got) == len(users) and all(lp <= 0 for lp in got)
    assert got == pytest.approx(ref, abs=2e-2)  # batched vs one row at a time: float rounding only


def test_scores_survive_prefix_reuse_and_many_rows(model, monkeypatch):
    import runtime.backends.llama as llama_backend
    be = model.backend
    toks, users = model.user_tokens([{"role": "user", "content": "the rain in spain " * 12}])
    be.start(toks, Sampling(), check=False, reuse=False, score=users)
    fresh = be.prompt_logprobs()
    monkeypatch.setattr(llama_backend, "MAX_SCORED_ROWS", 5)  # many decodes of at most 5 rows each
    be.start(toks, Sampling(), check=False, reuse=False, score=users)
    assert be.prompt_logprobs() == pytest.approx(fresh, abs=2e-2)
    # the next turn keeps the cached prefix and still knows the earlier turn's scores
    more = [{"role": "user", "content": "the rain in spain " * 12}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "on the plain"}]
    toks2, users2 = model.user_tokens(more)
    be.start(toks2, Sampling(), check=True, reuse=True, score=users2)
    assert be.reused > len(users)  # the first turn was not decoded again
    assert be.prompt_logprobs()[:len(users)] == pytest.approx(fresh, abs=2e-2)
    assert not any(math.isnan(v) for v in be.prompt_logprobs())


def test_no_rows_are_scored_when_the_rule_is_off(model):
    model.chat("the rain in spain", max_tokens=2, temperature=0)
    assert model.backend._score == [] or model.backend.prompt_logprobs() == []


@pytest.mark.parametrize("native", [False, True])
def test_rule_end_to_end_in_both_loops(tiny_safe, native):
    from runtime.backends.native_loop import available
    if native and not available():
        pytest.skip("native loop not built")
    with runtime.load(tiny_safe, n_ctx=512, native=native) as m:
        plain = m.chat("the rain in spain", max_tokens=4, temperature=0, safety={"threshold": 0.99,
                                                                                 "surprisal_threshold": 1e6})
        odd = m.chat(GIBBERISH, max_tokens=4, temperature=0, safety={"threshold": 0.99, "surprisal_threshold": 1e6})
        assert not plain.refused and not odd.refused and plain.safety.surprisal != odd.safety.surprisal
        cut = (plain.safety.surprisal + odd.safety.surprisal) / 2
        lo, hi = sorted([("the rain in spain", plain), (GIBBERISH, odd)], key=lambda x: x[1].safety.surprisal)
        policy = {"threshold": 0.99, "surprisal_threshold": cut}
        r_lo = m.chat(lo[0], max_tokens=4, temperature=0, safety=policy)
        r_hi = m.chat(hi[0], max_tokens=4, temperature=0, safety=policy)
        assert not r_lo.refused and r_lo.text == lo[1].text
        assert r_hi.refused and r_hi.safety.intervened_at == 0 and r_hi.usage.completion_tokens == 0
        assert "gibberish in the prompt" in r_hi.safety.reason and r_hi.text == DEFAULT_REFUSAL
        d = json.loads(json.dumps(r_hi.to_dict()))["safety"]
        assert d["surprisal"] == pytest.approx(hi[1].safety.surprisal, abs=2e-2) and d["surprisal_window"] == 8


def test_threshold_travels_in_the_file_and_binds_the_stamp(tiny_base, tmp_path):
    from safechat.convert.stamp import write_stamped
    from tests.tiny_model import random_artifact
    from runtime.fold import convert_gguf
    art = random_artifact()
    art.card.update(surprisal_threshold=3.25, surprisal_window=4)
    f = tmp_path / "s.gguf"
    meta = convert_gguf(tiny_base, art, f, progress=False)
    assert (meta.surprisal_threshold, meta.surprisal_window) == (3.25, 4)
    with runtime.load(f, n_ctx=512) as m:
        assert m.meta.surprisal_threshold == pytest.approx(3.25) and m.meta.surprisal_window == 4
        r = m.chat(GIBBERISH, max_tokens=2, temperature=0, safety={"threshold": 0.99})
        assert r.safety.surprisal_threshold == pytest.approx(3.25) and r.safety.surprisal_window == 4
        assert r.refused == (r.safety.surprisal >= 3.25)
        toks, users = m.user_tokens(GIBBERISH)
        m.backend.start(toks, Sampling(), check=False, reuse=False, score=users)
        assert r.safety.surprisal == pytest.approx(evidence(m.backend.prompt_logprobs(), 4), abs=2e-2)
    kv = {k: str(v) for k, v in meta.to_kv().items()}
    rec = {"threshold": 0.5, "surprisal_threshold": 3.25, "surprisal_window": 4}
    assert stamp_mismatches(kv, rec) == []
    assert "surprisal_threshold is 3.5" in stamp_mismatches(kv | {PREFIX + "surprisal_threshold": "3.5"}, rec)[0]
    assert "absent (off)" in stamp_mismatches({k: v for k, v in kv.items() if "surprisal_threshold" not in k},
                                              rec)[0]
    assert "surprisal_window is 8" in stamp_mismatches(kv | {PREFIX + "surprisal_window": "8"}, rec)[0]
    assert "in its stamp" in stamp_mismatches(kv, rec | {"surprisal_threshold": None})[0]  # stamped off, now on
    stamped = write_stamped(f, tmp_path / "st.gguf", {VERIFIED: "pass", VERIFICATION: json.dumps(rec)})
    runtime.load(stamped).close()
    with pytest.raises(ValueError, match="invalid surprisal threshold"):
        SafetyMeta.from_kv(kv | {PREFIX + "surprisal_threshold": "-1"}, 10_000)
