"""Bad input gets a clear error naming the problem."""
import pytest

import runtime
from runtime.errors import ContextOverflowError, MessagesError, ModelFileError


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        runtime.load(tmp_path / "missing.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        runtime.load(p)


def test_truncated_gguf(tiny_safe, tmp_path):
    p = tmp_path / "truncated.gguf"
    p.write_bytes(tiny_safe.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="corrupt or unsupported"):
        runtime.load(p)


def test_gguf_without_safety_metadata_is_refused_unless_safety_off(tiny_base):
    with pytest.raises(ModelFileError, match="no safety metadata.*safety='off'"):
        runtime.load(tiny_base)
    m = runtime.load(tiny_base, safety="off", n_ctx=256)
    r = m.chat("hello", max_tokens=5)
    assert not r.safety.enabled and r.usage.completion_tokens <= 5
    with pytest.raises(ModelFileError, match="only safety='off'"):
        m.chat("hello", safety="on")


def test_malformed_messages_and_arguments(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=256)
    with pytest.raises(MessagesError):
        m.chat([{"role": "user", "content": None}])
    with pytest.raises(runtime.ParameterError, match="max_tokens"):
        m.chat("hi", max_tokens=0)
    with pytest.raises(ValueError, match="safety must be"):
        m.chat("hi", safety="maybe")
    with pytest.raises(ValueError, match="backend"):
        runtime.load(tiny_safe, backend="tensorflow")


def test_history_longer_than_the_context_is_a_clear_error(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=256)
    with pytest.raises(ContextOverflowError, match="context window"):
        m.chat("word " * 2000)


def test_model_chat_and_stream_agree(tiny_safe):
    m = runtime.load(tiny_safe, n_ctx=512, safety={"every": 3, "threshold": 0.99})
    r = m.chat("tell me", max_tokens=24, seed=0)
    g = m.chat("tell me", max_tokens=24, seed=0, stream=True)
    assert "".join(g) == g.reply.text == r.text
    assert m.path.name.endswith(".gguf")
