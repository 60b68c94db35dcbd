"""The side [CLS] position does not disturb generation, and gives the incremental verdict."""

import llama_cpp as ll
import numpy as np
import pytest

from runtime.backends.base import Sampling
from runtime.backends.llama import LlamaBackend, LlamaModelFile


@pytest.fixture(scope="module")
def mf(tiny_safe):
    return LlamaModelFile(tiny_safe)


def _prompt(mf):
    from runtime.prompt import build_prompt, prompt_tokens
    return prompt_tokens(build_prompt(mf.chat_template, "Tell me about the weather in spring."), mf)


def _greedy(mf, prompt, n, check_every):
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=mf.safety_meta().token_ids)
    toks, verdicts = [], []
    p = be.start(prompt, Sampling(), check=check_every > 0)
    verdicts.append(p)
    for i in range(n):
        t = be.sample()
        toks.append(t)
        check = check_every > 0 and (i + 1) % check_every == 0
        verdicts.append(be.advance(t, check))
    be.close()
    return toks, verdicts


def test_checks_every_step_do_not_change_greedy_tokens(mf):
    prompt = _prompt(mf)
    plain, _ = _greedy(mf, prompt, 64, 0)
    checked, verdicts = _greedy(mf, prompt, 64, 1)
    assert checked == plain
    assert all(v is not None and 0.0 <= v <= 1.0 for v in verdicts)
    assert len(set(plain)) > 1 or True  # a random model may repeat; identity is what matters


def _cls_logits_fresh(mf, tokens):
    """Decode tokens one by one in a fresh context, then [CLS]; return the label logits."""
    cls, safe, unsafe = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=(cls, safe, unsafe))
    be.start(tokens[:1], Sampling(), check=False)
    for t in tokens[1:]:
        be.advance(t, check=False)
    be._decode([], be.n_past, want_last=False, cls=True)
    row = ll.llama_get_logits_ith(be.ctx, 0)
    out = np.array([row[safe], row[unsafe]])
    be.close()
    return out


def test_side_cls_logits_equal_incremental_decode(mf):
    prompt = _prompt(mf)
    cls, safe, unsafe = mf.safety_meta().token_ids
    toks, _ = _greedy(mf, prompt, 12, 0)
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=(cls, safe, unsafe))
    be.start(prompt, Sampling(), check=False)
    for n in range(1, 13):
        be.advance(toks[n - 1], check=True)  # side [CLS] after prompt + n tokens
        row = ll.llama_get_logits_ith(be.ctx, 1)
        side = np.array([row[safe], row[unsafe]])
        fresh = _cls_logits_fresh(mf, prompt + toks[:n])
        np.testing.assert_allclose(side, fresh, rtol=1e-4, atol=1e-4)
    be.close()


def test_cls_cell_is_removed_from_the_cache(mf):
    prompt = _prompt(mf)
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=mf.safety_meta().token_ids)
    be.start(prompt, Sampling(), check=True)
    mem = be.mem
    assert ll.llama_memory_seq_pos_max(mem, 0) == len(prompt) - 1
    t = be.sample()
    be.advance(t, check=True)
    assert ll.llama_memory_seq_pos_max(mem, 0) == len(prompt)
    be.check()
    assert ll.llama_memory_seq_pos_max(mem, 0) == len(prompt)
    be.close()


def test_safety_tokens_are_never_sampled(tiny_base, tmp_path):
    """Even when the label tokens have large logits, the sampler must not pick them."""
    from tests.tiny_model import write_tiny_safe
    mf = LlamaModelFile(write_tiny_safe(tiny_base, tmp_path / "loud-head.gguf", head_scale=3.0))
    prompt = _prompt(mf)
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=mf.safety_meta().token_ids)
    be.start(prompt, Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3), check=False)
    ids = set(mf.safety_meta().token_ids)
    for _ in range(300):
        t = be.sample()
        assert t not in ids
        be.advance(t, check=False)
    be.close()
    # the same sampling without the mask does draw them: the test above can fail
    raw = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=None)
    raw.start(prompt, Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3), check=False)
    seen = set()
    for _ in range(300):
        t = raw.sample()
        seen.add(t)
        raw.advance(t, check=False)
    raw.close()
    assert seen & ids


def test_verdicts_in_one_pass_equal_one_start_per_position(mf):
    toks = _prompt(mf) + mf.tokenize(" it is mild and often rainy" * 8, False)
    positions = [len(toks) - 40, 9, len(toks), 9, 30]
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, n_batch=16, threads=1, safety_ids=ids)  # stretches longer than a batch
    fresh = [be.start(toks[:p], Sampling(), check=True) for p in positions]
    assert be.verdicts(toks, positions) == pytest.approx(fresh, abs=1e-5)  # batch splits differ: not bit-equal
    with pytest.raises(ValueError, match="positions must lie in"):
        be.verdicts(toks, [len(toks) + 1])
    be.close()


def test_verdicts_equal_the_runtimes_step_by_step_checks(mf):
    """Scoring a reference answer in one pass gives what generation would: prompt, then a token per step."""
    prompt = _prompt(mf)
    answer = mf.tokenize(" it is mild and often rainy, with blossoms everywhere", False)
    toks, positions = prompt + answer, [len(prompt), len(prompt) + 3, len(prompt) + len(answer)]
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=ids)
    stepped = [be.start(prompt, Sampling(), check=True)]
    for i, t in enumerate(answer):
        p = be.advance(t, check=len(prompt) + i + 1 in positions)
        if p is not None:
            stepped.append(p)
    one_pass = be.verdicts(toks, positions)
    # the end of the prompt is the same batch; a stretch of tokens vs one at a time may round
    # differently in float32 matmuls (bit-identical on the default Q4_1 model, 30 of 30 positions)
    assert one_pass[0] == stepped[0] and one_pass == pytest.approx(stepped, abs=1e-6)
    be.close()


def test_verdicts_reuse_the_shared_prefix_of_the_previous_call(mf):
    """Scoring examples that share a prefix keeps its cells; the verdicts match fresh passes."""
    head = _prompt(mf) + mf.tokenize(" it is mild and often rainy" * 3, False)
    a = head + mf.tokenize(" with blossoms everywhere", False)
    b = head + mf.tokenize(" and windy in the north", False)
    c = mf.tokenize("something else entirely", False)
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, n_batch=16, threads=1, safety_ids=ids)
    cases = [(a, [len(head), len(a)]), (b, [len(head) - 5, len(b)]), (b, [len(b)]),
             (c, [2, len(c)]), (a, [3, len(a)])]
    fresh = [be.verdicts(t, ps) for t, ps in cases]
    be.start(c, Sampling(), check=False)  # generation in between: nothing from it may be reused
    reused = [be.verdicts(t, ps, reuse=True) for t, ps in cases]
    assert reused == [pytest.approx(f, abs=1e-5) for f in fresh]
    assert be._cells == a[:len(a)]
    be.verdicts(b, [len(b)], reuse=True)  # shares `head` with a: the cells past it were cut
    assert be.n_past == len(b) and be.verdicts(b, [len(b)]) == pytest.approx(fresh[2], abs=1e-5)
    be.close()


def _generate(be, prompt, n, reuse):
    p = be.start(prompt, Sampling(), check=True, reuse=reuse)
    out = []
    for _ in range(n):
        t = be.sample()
        out.append(t)
        be.advance(t, check=False)
    return p, out


def test_start_reuses_the_shared_prompt_prefix(mf):
    """Generation from prompts sharing a template keeps the shared cells and gives the fresh result."""
    head = _prompt(mf) + mf.tokenize(" tell me about the weather in spring" * 3, False)
    a = head + mf.tokenize(" in the mountains", False)
    b = head + mf.tokenize(" by the sea", False)
    ids = mf.safety_meta().token_ids
    be = LlamaBackend(mf, n_ctx=512, n_batch=16, threads=1, safety_ids=ids)
    prompts = [a, b, b, a, a[:len(head)], mf.tokenize("unrelated", False)]
    fresh = [_generate(be, t, 6, reuse=False) for t in prompts]
    be.verdicts(b, [len(b)])  # scoring in between leaves b's cells: the next start reuses them
    reused = [_generate(be, t, 6, reuse=True) for t in prompts]
    for (pf, tf), (pr, tr) in zip(fresh, reused):
        assert tr == tf and pr == pytest.approx(pf, abs=1e-5)
    assert be._cells == prompts[-1] + reused[-1][1] and be.n_past == len(be._cells)
    be.close()
