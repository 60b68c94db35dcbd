"""Property-based fuzzing of chat(): odd input never escapes as an unhandled error from llama.cpp."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import runtime
from convert.metadata import SPECIAL_TOKENS
from runtime.errors import ContextOverflowError, MessagesError

TEXT = st.text(alphabet=st.characters(codec="utf-8", categories=None), max_size=300) | st.sampled_from(
    ["", "\x00", "\ufffd", "\u202e", "\r\n", *SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>", "<|endoftext|>",
     "\ud7ff\ue000", "🙂" * 50])
ROLE = st.sampled_from(["system", "user", "assistant"]) | st.text(max_size=8)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": TEXT | st.integers() | st.none()})


@pytest.fixture(scope="module")
def model(tiny_safe):
    return runtime.load(tiny_safe, n_ctx=512, threads=1, safety={"every": 2})


def _check(model, messages):
    try:
        r = model.chat(messages, max_tokens=6)
    except (MessagesError, ContextOverflowError) as e:
        assert str(e)  # a clear, named error
        return None
    ids = set(model.meta.token_ids)
    assert isinstance(r.text, str) and r.usage.completion_tokens <= 6
    assert r.safety.checks >= 1 and r.safety.trace[0][0] == 0
    prompt_ids = model.tokenize_messages(messages)
    assert not ids & set(prompt_ids)  # typed text never becomes a safety token
    return r


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MESSAGE, min_size=0, max_size=4))
def test_arbitrary_messages(model, messages):
    _check(model, messages)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXT, TEXT)
def test_arbitrary_user_text_and_prefill(model, text, prefill):
    _check(model, [{"role": "user", "content": text}, {"role": "assistant", "content": prefill}])


def test_huge_message_is_a_clear_context_error(model):
    with pytest.raises(ContextOverflowError, match="context window"):
        model.chat("x" * 100_000)


def test_history_longer_than_context(model):
    history = []
    for i in range(200):
        history += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "and now?"})
    with pytest.raises(ContextOverflowError):
        model.chat(history)
