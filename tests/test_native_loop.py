"""The native decode loop (cpp_ext/loop.c) gives what the pure-Python reference loop gives.

Same tokens, same verdicts (trace, triggers, intervention, reason), same streamed pieces, on
the tiny random Llama; thresholds are chosen from the reference run so that interventions
really happen mid-generation. And an ABI mismatch is a clear error, never a crash.
"""
import ctypes
import math
import statistics

import llama_cpp.llama_cpp as llc
import pytest

from runtime.backends.native_loop import NativeLoopError, check_abi
from runtime.model import Model
from runtime.strategy import SafetyPolicy

PROMPTS = ["Tell me about the weather in spring.", "Write a poem about the sea and the wind.",
           [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Sure, first"}]]
POLICIES = {
    "every1": dict(every=1),
    "every4": dict(every=4),
    "every3-patience2": dict(every=3, patience=2),
    "stop-action": dict(every=2, action="stop"),
    "adaptive": dict(every=0, max_gap=5, sentence_ends=True),
}


@pytest.fixture(scope="module")
def models(tiny_safe):
    py = Model(tiny_safe, n_ctx=512, threads=1, native=False)
    nat = Model(tiny_safe, n_ctx=512, threads=1, native=True)
    yield py, nat
    py.close()
    nat.close()


def _run(model, prompt, **kw):
    kw.setdefault("seed", 0)  # seed=None draws a fresh seed per call: two runs compared must share one
    gen = model.chat(prompt, stream=True, **kw)
    pieces = list(gen)
    return pieces, gen.reply


def _same(a, b):
    (pa, ra), (pb, rb) = a, b
    assert pb == pa
    assert rb.text == ra.text and rb.refused == ra.refused and rb.finish_reason == ra.finish_reason
    assert rb.safety.trace == ra.safety.trace
    assert rb.safety.triggers == ra.safety.triggers
    assert (rb.safety.intervened_at, rb.safety.reason) == (ra.safety.intervened_at, ra.safety.reason)
    assert rb.usage.completion_tokens == ra.usage.completion_tokens


def test_models_really_use_different_loops(models):
    py, nat = models
    assert not py.native and nat.native
    calm = SafetyPolicy(threshold=0.999999)
    assert py.chat("hi", max_tokens=4, safety=calm).usage.native_seconds is None
    assert nat.chat("hi", max_tokens=4, safety=calm).usage.native_seconds > 0


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("prompt", range(len(PROMPTS)))
def test_native_matches_python(models, policy, prompt):
    py, nat = models
    kw = dict(max_tokens=40, temperature=0.0)
    # a threshold that never trips, then the median verdict of that run: an intervention mid-way
    calm = SafetyPolicy(threshold=0.999999, **POLICIES[policy])
    ref = _run(py, PROMPTS[prompt], safety=calm, **kw)
    _same(ref, _run(nat, PROMPTS[prompt], safety=calm, **kw))
    generated = [p for c, p in ref[1].safety.trace if c > 0]
    thr = min(max(statistics.median(generated), 1e-6), 0.999999)
    tight = SafetyPolicy(threshold=thr, **POLICIES[policy])
    ref = _run(py, PROMPTS[prompt], safety=tight, **kw)
    _same(ref, _run(nat, PROMPTS[prompt], safety=tight, **kw))


def test_native_matches_python_with_an_answer_threshold(models):
    py, nat = models
    kw = dict(max_tokens=40, temperature=0.0)
    calm = SafetyPolicy(threshold=0.999999, every=2)
    ref = _run(py, PROMPTS[0], safety=calm, **kw)
    p0 = ref[1].safety.trace[0][1]
    generated = [p for c, p in ref[1].safety.trace if c > 0]
    mid = min(max(statistics.median(generated), 1e-6), 0.999999)
    # the prompt passes (its threshold is above its verdict), the answer threshold acts mid-way
    split = SafetyPolicy(threshold=min(p0 + 1e-6, 0.999999), answer_threshold=mid, every=2)
    ref = _run(py, PROMPTS[0], safety=split, **kw)
    _same(ref, _run(nat, PROMPTS[0], safety=split, **kw))
    assert ref[1].refused and ref[1].safety.intervened_at > 0  # not at the prompt: inside the answer
    never = SafetyPolicy(threshold=min(p0 + 1e-6, 0.999999), answer_threshold=math.inf, every=2)
    ref = _run(py, PROMPTS[0], safety=never, **kw)
    _same(ref, _run(nat, PROMPTS[0], safety=never, **kw))
    assert not ref[1].refused and len(ref[1].safety.trace) == 1  # only the prompt is checked


@pytest.mark.parametrize("trigger", [dict(entropy_trigger=0.1), dict(margin_trigger=0.96)])
def test_native_matches_python_with_hesitation_triggers_and_sampling(models, trigger):
    py, nat = models
    # the tiny random model grows less certain along a text: these triggers fire part of the time
    policy = SafetyPolicy(threshold=0.999999, every=0, max_gap=8, **trigger)
    fired = 0
    for seed in range(3):
        kw = dict(max_tokens=30, temperature=0.9, seed=seed, safety=policy)
        a, b = _run(py, PROMPTS[1], **kw), _run(nat, PROMPTS[1], **kw)
        _same(a, b)
        fired += sum(t in ("entropy", "margin") for t in a[1].safety.triggers)
    assert fired > 0


def test_native_with_safety_off_and_eog_and_context_end(models, tiny_safe):
    py, nat = models
    for kw in (dict(safety="off", max_tokens=25), dict(max_tokens=1), dict(max_tokens=2, temperature=1.5, seed=3)):
        _same(_run(py, PROMPTS[0], **kw), _run(nat, PROMPTS[0], **kw))
    small_py = Model(tiny_safe, n_ctx=48, threads=1, native=False)
    small_nat = Model(tiny_safe, n_ctx=48, threads=1, native=True)
    a = _run(small_py, PROMPTS[0], max_tokens=1000, safety=SafetyPolicy(threshold=0.999999))
    b = _run(small_nat, PROMPTS[0], max_tokens=1000, safety=SafetyPolicy(threshold=0.999999))
    _same(a, b)
    assert a[1].finish_reason == "length" and a[1].usage.completion_tokens < 1000
    small_py.close()
    small_nat.close()


def test_native_loop_leaves_the_cache_ready_for_the_next_turn(models):
    _, nat = models
    first = nat.chat(PROMPTS[0], max_tokens=12, seed=0, safety=SafetyPolicy(threshold=0.999999, every=3))
    again = nat.chat(PROMPTS[0], max_tokens=12, seed=0, safety=SafetyPolicy(threshold=0.999999, every=3))
    assert again.text == first.text and again.safety.trace == first.safety.trace


class _ShortBatch(ctypes.Structure):  # llama_batch without its last field
    _fields_ = [(n, t) for n, t in llc.llama_batch._fields_[:-1]]


class _ReorderedBatch(ctypes.Structure):
    _fields_ = [llc.llama_batch._fields_[0], llc.llama_batch._fields_[3], llc.llama_batch._fields_[2],
                llc.llama_batch._fields_[1]] + list(llc.llama_batch._fields_[4:])


@pytest.mark.parametrize("batch", [_ShortBatch, _ReorderedBatch])
def test_batch_layout_mismatch_is_a_clear_error(batch):
    with pytest.raises(NativeLoopError, match="llama_batch layout"):
        check_abi(batch_type=batch)


def test_function_signature_mismatch_is_a_clear_error():
    class Lib:  # llama-cpp-python's functions, one declared with a different argument list
        def __getattr__(self, name):
            return getattr(llc._lib, name)

    lib = Lib()
    wrong = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)(lambda ctx: 0)
    wrong.argtypes, wrong.restype = [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int32
    lib.llama_sampler_sample = wrong
    with pytest.raises(NativeLoopError, match="llama_sampler_sample"):
        check_abi(lib=lib)
    check_abi()  # the real one passes


def test_native_true_on_onnx_is_refused(tiny_safe):
    with pytest.raises(ValueError, match="llama backend only"):
        Model(tiny_safe, backend="onnx", native=True)


def test_closing_a_native_stream_midway_releases_the_model(models):
    _, nat = models
    calm = SafetyPolicy(threshold=0.999999, every=2)
    whole = nat.chat(PROMPTS[1], max_tokens=30, seed=0, safety=calm)
    gen = nat.chat(PROMPTS[1], max_tokens=30, seed=0, safety=calm, stream=True)
    it = iter(gen)
    first = next(it)
    assert whole.text.startswith(first) and len(first) < len(whole.text)
    it.close()  # what a Cancel button or a disconnected client does
    assert nat._lock.acquire(blocking=False)  # the model is free again
    nat._lock.release()
    again = nat.chat(PROMPTS[1], max_tokens=30, seed=0, safety=calm)
    assert again.text == whole.text and again.safety.trace == whole.safety.trace


def test_both_loops_read_one_policy_spec_and_a_mismatch_is_refused(monkeypatch):
    import runtime._native as native
    from runtime.backends import native_loop
    from runtime.policy import LoopSpec, loop_spec

    assert native.POLICY_FIELDS == LoopSpec._fields
    spec = loop_spec(SafetyPolicy(every=0, max_gap=5, entropy_trigger=2.0, patience=2), 0.7)
    assert (spec[:4], spec[5:]) == ((True, 0, 5, 2.0), (False, 0.7, 2))
    assert math.isnan(spec.margin_trigger) and spec.needs_stats and spec.due(3, 5, (2.5, 0.1), b"") == "max_gap"
    assert not loop_spec(None, 0.5).enabled
    monkeypatch.setattr(native, "POLICY_FIELDS", native.POLICY_FIELDS[:-1])
    with pytest.raises(NativeLoopError, match="reads the policy as"):
        native_loop.check_abi()


def test_native_matches_python_on_a_file_with_category_rows_and_hesitation_triggers(tiny_base, tmp_path):
    """The category rows are never sampled, so both loops leave them out of the entropy/margin statistics
    (the C loop used to count them, and such files ran in Python)."""
    from runtime.fold import convert_gguf
    from tests.test_categories import NAMES, _with_categories
    from tests.tiny_model import random_artifact

    art = _with_categories(random_artifact(threshold=0.5), thresholds={n: 1.0 for n in NAMES})
    path = tmp_path / "cat.gguf"
    convert_gguf(tiny_base, art, path, progress=False)
    py = Model(path, n_ctx=512, threads=1, native=False)
    nat = Model(path, n_ctx=512, threads=1, native=True)
    fired = 0
    for seed in range(3):  # the thresholds of the hesitation test above: they fire part of the time
        for trig in (dict(entropy_trigger=0.1), dict(margin_trigger=0.96)):
            pol = SafetyPolicy(threshold=0.999999, every=0, max_gap=9, **trig)
            a = _run(py, PROMPTS[1], max_tokens=30, temperature=0.9, seed=seed, safety=pol)
            b = _run(nat, PROMPTS[1], max_tokens=30, temperature=0.9, seed=seed, safety=pol)
            assert b[1].usage.native_seconds is not None  # the C loop really ran
            _same(a, b)
            fired += sum(t in ("entropy", "margin") for t in a[1].safety.triggers)
    assert fired > 0
    py.close()
    nat.close()
