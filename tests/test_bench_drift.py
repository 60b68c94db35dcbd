"""`bench drift`: what a safe file's language model moved from a reference (greedy answers, per-token KL)."""
import numpy as np
import pytest

from safechat.bench.drift import kl, measure, prefix

EXAMPLES = [{"prompt": p} for p in ("hello there", "what is a cat", "tell me about bread")]


def test_kl_is_zero_for_equal_rows_and_positive_otherwise():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    keep = np.ones(50, dtype=bool)
    assert kl(a, a, keep) == pytest.approx(0.0, abs=1e-12)
    assert kl(a, b, keep) > 0.01
    keep[np.argmax(a)] = False  # an excluded row does not count, however large
    big = a.copy()
    big[np.argmax(a)] += 100
    assert kl(a, big, keep) == pytest.approx(0.0, abs=1e-12)
    # a file with more rows (its category rows) compares over the shared ids only
    longer = np.concatenate([a, [50.0, -3.0]]).astype(np.float32)
    assert kl(a, longer, keep) == pytest.approx(0.0, abs=1e-12)


def test_prefix_counts_tokens_before_the_first_difference():
    assert prefix([1, 2, 3], [1, 2, 4]) == 2 and prefix([1, 2], [1, 2, 3]) == 2 and prefix([5], [6]) == 0


def test_same_language_model_has_no_drift(tiny_base, tmp_path):
    """Two files folding different safety artifacts into one base: the LM is the same, so nothing moved."""
    from runtime.model import load
    from tests.tiny_model import write_tiny_safe

    a, b = (write_tiny_safe(tiny_base, tmp_path / f"{s}.gguf", seed=s) for s in (1, 2))
    with load(a, threads=1, allow_unverified=True) as m, load(b, threads=1, allow_unverified=True) as r:
        out = measure(m, r, EXAMPLES, 6)
    assert out["identical"] == 3 and out["prompts"] == 3 and out["positions"] >= 3
    assert out["max_kl"] < 1e-4


def test_another_language_model_drifts(tiny_base, tmp_path):
    from runtime.model import load
    from tests.tiny_model import write_tiny_base, write_tiny_safe

    other = write_tiny_base(tmp_path / "other-base.gguf", seed=5)
    a, b = write_tiny_safe(other, tmp_path / "a.gguf"), write_tiny_safe(tiny_base, tmp_path / "b.gguf")
    with load(a, threads=1, allow_unverified=True) as m, load(b, threads=1, allow_unverified=True) as r:
        out = measure(m, r, EXAMPLES, 6)
    assert out["mean_kl"] > 0.01


def test_refusal_phrases_are_counted_per_file(tiny_base, tmp_path, monkeypatch):
    """The refusal-phrase columns count the model's and the reference's own answers separately (the tiny
    model's text is random, so the decoded answer of one file is replaced by a refusal sentence)."""
    import safechat.bench.drift
    from runtime.model import load
    from tests.tiny_model import write_tiny_safe

    a, b = (write_tiny_safe(tiny_base, tmp_path / f"{s}.gguf", seed=s) for s in (1, 2))
    with load(a, threads=1, allow_unverified=True) as m, load(b, threads=1, allow_unverified=True) as r:
        assert measure(m, r, EXAMPLES, 4)["refusals"] == 0
        real_text = safechat.bench.drift._text
        monkeypatch.setattr(safechat.bench.drift, "_text", lambda model, toks: "I can't help with that." if model is m
                            else real_text(model, toks))
        out = measure(m, r, EXAMPLES, 4)
    assert out["refusals"] == 3 and out["ref_refusals"] == 0
