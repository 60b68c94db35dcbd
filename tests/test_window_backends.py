"""Windowed checks on the tiny model: llama.cpp == torch under the joint recipe's 4D window mask (and != the
sees-everything verdict), the windowed step leaves generation unchanged, the native loop declines windows
(the Python loop runs), ONNX == llama.cpp, and the training mask == the specification."""
import random
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import runtime  # noqa: E402
from runtime.backends.base import Sampling  # noqa: E402
from runtime.backends.llama import LlamaBackend, LlamaModelFile  # noqa: E402
from runtime.policy import SafetyPolicy  # noqa: E402
from runtime.window import check_ranges, cls_position, positions  # noqa: E402
from safechat.convert.llama_torch import FrozenLlama  # noqa: E402
from safechat.train.joint import JointSeq, hidden, layout  # noqa: E402
from safechat.train.joint_window import cls_windows  # noqa: E402

pytestmark = pytest.mark.timeout(1200)  # the ONNX export alone took 509 s on a loaded 2-core machine
W = (3, 5, 2)
PROMPT = [{"role": "user", "content": "the rain in spain falls on the plain"}]


@pytest.fixture(scope="module")
def mf(tiny_safe):
    f = LlamaModelFile(tiny_safe)
    yield f
    f.close()


@pytest.fixture(scope="module")
def ref(tiny_safe):
    torch.set_num_threads(1)
    return FrozenLlama(tiny_safe)


def _backend(mf):
    return LlamaBackend(mf, n_ctx=512, threads=1, safety_ids=mf.safety_meta().token_ids)


def _prompt(mf):
    from runtime.prompt import build_prompt, prompt_tokens
    return prompt_tokens(build_prompt(mf.chat_template, PROMPT), mf)


def _answer(be, prompt, n, sampling=Sampling()):
    be.start(prompt, sampling, check=False)
    toks = []
    for _ in range(n):
        toks.append(be.sample())
        be.advance(toks[-1], False)
    return toks


def _torch_p(ref, meta, tokens, cls_at, labels, window):
    """p_unsafe of the last [CLS] of a sequence laid out by the joint recipe (its prompt check first)."""
    seq = JointSeq(tokens, cls_at, labels[0], cls_labels=labels)
    b = layout([seq], window)
    cls_row = ref.w["token_embd.weight"][meta.cls_token_id]
    with torch.no_grad():
        h = hidden(ref, None, cls_row, b)[0, cls_at[-1] + len(cls_at) - 1]
        z = h @ ref.output_matrix()[[meta.safe_token_id, meta.unsafe_token_id]].T
    return float(torch.softmax(z.double(), -1)[1])


def test_llama_windowed_verdicts_equal_torch_under_the_window_mask(mf, ref):
    meta = mf.safety_meta()
    prompt = _prompt(mf)
    q = len(prompt)
    be = _backend(mf)
    ans = _answer(be, prompt, 24)
    toks = prompt + ans
    n = len(ans)
    full = be.check()
    cases = [  # (labels of the [CLS] at q, [q + S,] q + n; the llama window of the last)
        ([0, 0], check_ranges(q, n, W)),                                  # cleared query
        ([1, 1], check_ranges(q, n, W, prompt_flagged=True)),             # flagged query
        ([0, 1, 1], check_ranges(q, n, W, flip_at=12)),                   # a flip at 12, still unsafe
    ]
    for labels, ranges in cases:
        cls_at = [q, q + 12, q + n] if len(labels) == 3 else [q, q + n]
        p_llama = be.check(window=ranges)
        p_torch = _torch_p(ref, meta, toks, cls_at, labels, W)
        assert p_llama == pytest.approx(p_torch, abs=1e-3), (labels, ranges)
        assert abs(p_llama - full) > 1e-2, (labels, p_llama, full)           # it judges something else
    # the windowed check leaves the cache as it was: the next sees-everything verdict is the same
    assert be.check() == pytest.approx(full, abs=1e-6)
    assert _torch_p(ref, meta, toks, [q, q + n], [0, 0], None) == pytest.approx(full, abs=1e-3)
    be.close()


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)])
def test_a_windowed_check_at_every_step_leaves_generation_unchanged(mf, sampling):
    prompt = _prompt(mf)
    runs = []
    for windowed in (False, True):
        be = _backend(mf)
        be.start(prompt, sampling, check=False)
        toks, stats = [], []
        for i in range(20):
            toks.append(be.sample())
            stats.append(be.hesitation())
            kw = {"window": check_ranges(len(prompt), i + 1, W)} if windowed else {}
            p = be.advance(toks[-1], windowed, **kw)
            assert (p is not None) == windowed
        runs.append((toks, stats))
        be.close()
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[0][1], runs[1][1], rtol=1e-6)


def test_the_native_loop_declines_windows_and_the_python_loop_gives_the_same(tiny_safe):
    pol = SafetyPolicy(every=2, threshold=0.999999, window=W, entropy_trigger=4.0)
    with runtime.load(tiny_safe, n_ctx=512, allow_unverified=True) as m:
        replies = []
        for native in (True, False):
            m.native = native
            replies.append(m.chat(PROMPT, max_tokens=16, temperature=0, safety=pol))
        plain = m.chat(PROMPT, max_tokens=16, temperature=0, safety=SafetyPolicy(every=2, threshold=0.999999,
                                                                              entropy_trigger=4.0))
    a, b = replies
    assert a.text == b.text == plain.text and a.safety.trace == b.safety.trace
    assert a.safety.window == W and [c for c, _ in a.safety.trace] == [c for c, _ in plain.safety.trace]
    assert [p for _, p in a.safety.trace][1:] != [p for _, p in plain.safety.trace][1:]


def test_a_prefill_starts_the_answer_window(tiny_safe):
    msgs = PROMPT + [{"role": "assistant", "content": "Sure, the rain"}]
    with runtime.load(tiny_safe, n_ctx=512, allow_unverified=True) as m:
        tokens = m.tokenize_messages(msgs)
        start = m.answer_start(msgs, tokens)
        assert start == len(m.tokenize_messages(PROMPT)) and start < len(tokens)
        assert m.answer_start(PROMPT, m.tokenize_messages(PROMPT)) == len(m.tokenize_messages(PROMPT))


@pytest.fixture(scope="module")
def onnx_model(tiny_safe, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from safechat.convert.onnx_export import export_onnx
    d = tmp_path_factory.mktemp("onnx-window")
    shutil.copy(tiny_safe, d / "model.gguf")
    export_onnx(tiny_safe, d / "model.onnx", progress=False)
    m = runtime.load(d / "model.onnx", backend="onnx", n_ctx=512)
    yield m
    m.close()


def test_onnx_windowed_verdicts_equal_llama(mf, onnx_model):
    prompt = _prompt(mf)
    q = len(prompt)
    bl, bo = _backend(mf), onnx_model.backend
    s = Sampling()
    bl.start(prompt, s, check=False)
    bo.start(prompt, s, check=False)
    for i in range(16):
        tl, to = bl.sample(), bo.sample()
        assert tl == to
        ranges = [check_ranges(q, i + 1, W), check_ranges(q, i + 1, W, prompt_flagged=True),
                  check_ranges(q, i + 1, W, flip_at=max(1, i - 2))][i % 3]
        pl, po = bl.advance(tl, True, window=ranges), bo.advance(to, True, window=ranges)
        assert abs(pl - po) < 5e-3, (i, ranges)                          # llama.cpp keeps K/V in F16
    assert abs(bl.check(window=((0, 3),)) - bo.check(window=((0, 3),))) < 5e-3
    assert abs(bl.check() - bo.check()) < 5e-3                           # and the cache is intact
    bl.close()
    # a family with sliding-window layers: the graph masks by index in its past, so windows are refused
    from runtime.errors import ModelFileError
    vf = bo.mf.vocab_file
    assert vf.architecture == "llama" and vf.meta_value("llama.attention.sliding_window") is None
    assert vf.meta_value("general.architecture") == "llama"
    vf.meta_value = lambda key: "8" if key == "llama.attention.sliding_window" else None  # as gemma3's file says
    try:
        with pytest.raises(ModelFileError, match="sliding-window"):
            bo.check(window=((0, 3),))
        r = onnx_model.chat(PROMPT, max_tokens=4, temperature=0, safety=SafetyPolicy(every=1, window=W,
                                                                                     threshold=0.999999))
        assert r.refused and "sliding-window" in r.safety.reason                # fail closed
    finally:
        del vf.meta_value


def test_the_training_mask_is_the_specification():
    rng = random.Random(0)
    for trial in range(40):
        q = rng.randint(1, 12)
        n = rng.randint(1, 30)
        inside = sorted(rng.sample(range(q + 1, q + n + 1), rng.randint(1, min(6, n))))
        cls_at, kind = [q] + inside, rng.choice(["answer", "two_turn"])
        toks = list(range(10, 10 + q + n + (4 if kind == "two_turn" else 0)))
        if kind == "two_turn":
            cls_at.append(len(toks))
        labels = [rng.randint(0, 1) for _ in cls_at]
        seq = JointSeq(toks, cls_at, labels[0], cls_labels=labels, meta={"kind": kind})
        window = (rng.randint(0, 6), rng.randint(1, 8), rng.randint(0, 5))
        b = layout([seq], window)
        plain = layout([seq])
        for k, (p, ranges) in enumerate(zip(seq.cls_at, cls_windows(seq, window))):
            r = p + k
            keys = b.mask[0, 0, r, :r]
            seen = sorted(int(x) for x in b.pos[0, :r][keys & ~b.is_cls[0, :r]])
            if ranges is None:  # a prompt check: everything before it, as without windows
                assert seen == list(range(p)) and torch.equal(b.mask[0, 0, r], plain.mask[0, 0, r])
                assert int(b.pos[0, r]) == p
            else:
                assert seen == positions(ranges) and int(b.pos[0, r]) == cls_position(ranges), (trial, k)
        real = ~b.is_cls[0]
        assert torch.equal(b.mask[0, 0][real], plain.mask[0, 0][real]) and torch.equal(b.pos[0][real], plain.pos[0][real])
    # the history the mask uses is the runtime's: a flagged prompt, then a flip after a cleared one
    seq = JointSeq(list(range(40)), [10, 20, 25, 30], 0, cls_labels=[0, 1, 1, 0])
    assert cls_windows(seq, W) == [None, check_ranges(10, 10, W), check_ranges(10, 15, W, flip_at=10),
                                   check_ranges(10, 20, W, flip_at=10)]
    seq = JointSeq(list(range(40)), [10, 20], 1)
    assert cls_windows(seq, W) == [None, check_ranges(10, 10, W, prompt_flagged=True)]


def test_train_joint_with_windows_records_them_and_resume_refuses_others(tiny_base, tmp_path):
    from safechat.train.joint import CHECKPOINT, train_joint
    model = FrozenLlama(tiny_base)
    rng = random.Random(1)
    seqs = [JointSeq([rng.randrange(10, 200) for _ in range(30)], [10, 20, 30], i % 2, lm_from=10) for i in range(4)]
    quiet = lambda *a, **k: None  # noqa: E731
    res = train_joint(model, seqs, tmp_path, steps=2, rank=2, window=W, log=quiet, ckpt_every=1)
    assert res.info["finished"]
    st = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert st["config"]["window"] == list(W)
    with pytest.raises(ValueError, match="different run"):  # the same data without windows is another run
        train_joint(model, seqs, tmp_path, steps=3, rank=2, resume=True, log=quiet)


def test_a_prefill_is_answer_text_in_training_too(mf):
    from runtime.prompt import build_prompt, prompt_tokens
    from safechat.train.joint_data import prepare
    examples = [{"id": "a", "split": "train", "prompt": "the rain in spain", "label": 1, "augmentation": "none",
                 "prefill": "Sure, the rain"},
                {"id": "b", "split": "train", "prompt": "the sun on the hill", "label": 0, "augmentation": "none"}]
    prep = prepare(examples, mf, mf.chat_template, None, [0], mf.n_vocab, comply=1)
    a, b = prep["train"]
    plain = prompt_tokens(build_prompt(mf.chat_template, [{"role": "user", "content": "the rain in spain"}]), mf)
    assert a["answer_at"] == len(plain) < len(a["tokens"]) and "answer_at" not in b
    assert all(0 < c["answer_at"] < len(c["tokens"]) for c in prep["comply"])
    # the windows then start at the prefill, as the runtime's do
    q, n = a["answer_at"], len(a["tokens"])
    seq = JointSeq(a["tokens"] + [40, 41, 42], [n, n + 3], 0, meta={"answer_at": q})
    assert cls_windows(seq, W)[1] == check_ranges(q, n + 3 - q, W)
