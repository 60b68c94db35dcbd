"""The decoding strategy against a fake backend that scripts tokens and verdicts."""
import math

import pytest

from runtime.backends.base import Sampling
from runtime.strategy import DEFAULT_REFUSAL, Generation, SafetyPolicy, generate

EOG = 0


class FakeBackend:
    """Token t has text f"<{t}>"; verdicts are p_unsafe as a function of tokens covered."""

    n_ctx = 10_000

    def __init__(self, tokens, verdict=lambda covered: 0.0, fail_at=None, logprob=None):
        self.logprob = logprob  # token -> its log-probability in the prompt (the surprisal rule's input)
        self.scored = None     # the positions the last start was asked to score (None: not asked)
        self.script = list(tokens)
        self.verdict = verdict
        self.fail_at = fail_at
        self.decoded = []      # tokens in the "cache"
        self.checks_at = []    # number of generated tokens each check covered
        self.prompt_len = 0

    def tokenize(self, text, special):
        return [ord(c) for c in text]

    def token_bytes(self, t):
        return f"<{t}>".encode()

    def is_eog(self, t):
        return t == EOG

    def _p(self):
        covered = len(self.decoded) - self.prompt_len
        if self.fail_at is not None and covered >= self.fail_at:
            raise RuntimeError("backend exploded")
        self.checks_at.append(covered)
        return self.verdict(covered)

    def start(self, tokens, sampling, check, **kw):
        self.decoded = list(tokens)
        self.prompt_len = len(tokens)
        if "score" in kw:
            self.scored = list(kw["score"])
        return self._p() if check else None

    def prompt_logprobs(self):
        return [self.logprob(self.decoded[i]) for i in self.scored]

    def sample(self):
        return self.script.pop(0) if self.script else EOG

    def advance(self, token, check):
        self.decoded.append(token)
        return self._p() if check else None

    def check(self):
        return self._p()


def run(backend, policy=SafetyPolicy(every=1), threshold=0.5, max_tokens=100, stream=False):
    g = Generation(generate(backend, [100, 101], policy=policy, threshold=threshold,
                            sampling=Sampling(), max_tokens=max_tokens))
    if stream:
        pieces = list(g)
        return pieces, g.reply
    return None, g.run()


def text_of(tokens):
    return "".join(f"<{t}>" for t in tokens)


def test_benign_generation_is_shown_in_full():
    be = FakeBackend([5, 6, 7, 8, 9])
    _, r = run(be, SafetyPolicy(every=2))
    assert r.text == text_of([5, 6, 7, 8, 9]) and not r.refused
    assert r.finish_reason == "stop"
    assert [c for c, _ in r.safety.trace] == [0, 2, 4, 5]  # prompt, every 2, final
    assert r.usage.completion_tokens == 5


def test_unsafe_prompt_refused_before_any_token():
    be = FakeBackend([5, 6, 7], verdict=lambda c: 0.9)
    pieces, r = run(be, stream=True)
    assert r.refused and r.safety.intervened_at == 0
    assert pieces == [DEFAULT_REFUSAL] and r.text == DEFAULT_REFUSAL
    assert "prompt" in r.safety.reason and "0.900" in r.safety.reason


@pytest.mark.parametrize("every", [1, 2, 3, 4, 8])
def test_intervention_at_the_right_step_and_nothing_unchecked_shown(every):
    # turns unsafe once 6 tokens are covered
    be = FakeBackend(list(range(10, 30)), verdict=lambda c: 0.95 if c >= 6 else 0.1)
    pieces, r = run(be, SafetyPolicy(every=every), stream=True)
    first_unsafe_check = next(c for c in range(0, 40, every) if c >= 6)
    assert r.refused and r.safety.intervened_at == first_unsafe_check
    shown = "".join(pieces[:-1])
    # everything shown was covered by a safe verdict (< 6 tokens), and is a prefix of the output
    last_safe = max(c for c, p in r.safety.trace if p < 0.5)
    assert shown == text_of(range(10, 10 + last_safe))
    assert last_safe < 6
    assert r.text.endswith(DEFAULT_REFUSAL)


def test_hysteresis_needs_consecutive_unsafe_verdicts():
    # one isolated unsafe verdict at 3 tokens, then safe: with patience 2, no intervention
    spikes = {3: 0.9}
    be = FakeBackend(list(range(10, 20)), verdict=lambda c: spikes.get(c, 0.1))
    _, r = run(be, SafetyPolicy(every=1, patience=2))
    assert not r.refused and r.text == text_of(range(10, 20))
    # two in a row: intervene at the second
    spikes = {3: 0.9, 4: 0.9}
    be = FakeBackend(list(range(10, 20)), verdict=lambda c: spikes.get(c, 0.1))
    pieces, r = run(be, SafetyPolicy(every=1, patience=2), stream=True)
    assert r.refused and r.safety.intervened_at == 4
    assert "".join(pieces[:-1]) == text_of(range(10, 12))  # token 3 was never cleared


def test_unsafe_streak_at_the_end_is_not_shown():
    spikes = {5: 0.9}
    be = FakeBackend([10, 11, 12, 13, 14], verdict=lambda c: spikes.get(c, 0.1))
    _, r = run(be, SafetyPolicy(every=1, patience=3))
    assert r.refused and r.text == text_of([10, 11, 12, 13]) + "\n\n" + DEFAULT_REFUSAL


def test_stop_action_ends_without_refusal_message():
    be = FakeBackend(list(range(10, 30)), verdict=lambda c: 0.95 if c >= 4 else 0.1)
    _, r = run(be, SafetyPolicy(every=2, action="stop"))
    assert r.refused and r.finish_reason == "safety"
    assert r.text == text_of(range(10, 12))


@pytest.mark.parametrize("bad", [float("nan"), None, 1.5, -0.1])
def test_missing_or_nan_verdict_fails_closed(bad, caplog):
    be = FakeBackend(list(range(10, 30)), verdict=lambda c: bad if c >= 3 else 0.1)
    with caplog.at_level("INFO", logger="safechat"):
        pieces, r = run(be, SafetyPolicy(every=1), stream=True)
    assert r.refused and r.safety.intervened_at == 3
    assert "".join(pieces[:-1]) == text_of(range(10, 12))
    assert "could not be computed" in r.safety.reason
    # the log says why, at WARNING: a refusal without a verdict is worth an operator's attention
    assert [(x.levelname, x.getMessage()) for x in caplog.records] == [
        ("WARNING", f"refused (fail closed): {r.safety.reason}")]


def test_backend_exception_fails_closed(caplog):
    be = FakeBackend(list(range(10, 30)), fail_at=5)
    with caplog.at_level("INFO", logger="safechat"):
        pieces, r = run(be, SafetyPolicy(every=4), stream=True)
    assert r.refused and "backend exploded" in r.safety.reason
    assert "".join(pieces[:-1]) == text_of(range(10, 14))  # only what the check at 4 cleared
    assert caplog.records[-1].levelname == "WARNING" and "fail closed" in caplog.records[-1].getMessage()


def test_an_ordinary_refusal_is_logged_at_info(caplog):
    be = FakeBackend(list(range(10, 30)), verdict=lambda c: 0.9 if c >= 4 else 0.1)
    with caplog.at_level("INFO", logger="safechat"):
        _, r = run(be, SafetyPolicy(every=4, threshold=0.5))
    assert r.refused
    assert [(x.levelname, x.getMessage()) for x in caplog.records] == [("INFO", f"refused (refuse): {r.safety.reason}")]


def test_backend_exception_propagates_when_safety_is_off():
    be = FakeBackend(list(range(10, 30)), fail_at=0)
    be.start = lambda tokens, s, check: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError):
        run(be, policy=None)


@pytest.mark.parametrize("every", [1, 3, 5])
def test_stream_equals_non_stream(every):
    mk = lambda: FakeBackend(list(range(10, 40)), verdict=lambda c: 0.95 if c >= 17 else 0.2)
    pieces, r1 = run(mk(), SafetyPolicy(every=every), stream=True)
    _, r2 = run(mk(), SafetyPolicy(every=every))
    assert "".join(pieces) == r1.text == r2.text


def test_max_tokens_final_check_covers_the_last_token():
    be = FakeBackend(list(range(10, 40)))
    _, r = run(be, SafetyPolicy(every=4), max_tokens=6)
    assert r.finish_reason == "length" and r.usage.completion_tokens == 6
    assert r.safety.trace[-1][0] == 6 and r.text == text_of(range(10, 16))


def test_safety_off_streams_every_token_without_checks():
    be = FakeBackend([5, 6, 7])
    pieces, r = run(be, policy=None, stream=True)
    assert pieces == ["<5>", "<6>", "<7>"] and r.safety.checks == 0 and not r.safety.enabled


def test_utf8_split_across_tokens_is_reassembled():
    class Bytes(FakeBackend):
        def token_bytes(self, t):
            return {1: "é".encode()[:1], 2: "é".encode()[1:], 3: b"!"}[t]
    _, r = run(Bytes([1, 2, 3]), SafetyPolicy(every=1))
    assert r.text == "é!"


def test_answer_threshold_applies_to_the_checks_after_the_prompt_only():
    import math
    verdict = lambda c: 0.7 if c == 0 else (0.95 if c >= 4 else 0.8)
    # one threshold: the prompt's 0.7 trips it
    _, r = run(FakeBackend(list(range(10, 20)), verdict=verdict), SafetyPolicy(every=2, threshold=0.6))
    assert r.refused and r.safety.intervened_at == 0
    # prompt threshold 0.75 lets the prompt through; answer threshold 0.9 acts at 4 tokens, not at 2 (0.8)
    pieces, r = run(FakeBackend(list(range(10, 20)), verdict=verdict),
                    SafetyPolicy(every=2, threshold=0.75, answer_threshold=0.9), stream=True)
    assert r.refused and r.safety.intervened_at == 4 and "0.950 >= 0.900 at token 4" in r.safety.reason
    assert "".join(pieces[:-1]) == text_of([10, 11]) and r.safety.answer_threshold == 0.9
    # never act inside the answer: no check is computed there, everything is shown as it comes
    be = FakeBackend(list(range(10, 20)), verdict=verdict)
    _, r = run(be, SafetyPolicy(every=2, threshold=0.75, answer_threshold=math.inf))
    assert not r.refused and r.text == text_of(range(10, 20)) and r.safety.trace == [(0, 0.7)]
    assert r.safety.checks == 1 and be.checks_at == [0]
    # the model file's threshold is used for both when the policy names none
    _, r = run(FakeBackend([10, 11, 12], verdict=verdict), SafetyPolicy(every=1), threshold=0.75)
    assert r.refused and r.safety.intervened_at == 1 and r.safety.answer_threshold == 0.75


def test_policy_validation():
    for bad in (dict(every=0), dict(patience=0), dict(action="explode"), dict(threshold=1.5),
                dict(answer_threshold=1.0), dict(answer_threshold=0.0)):
        with pytest.raises(ValueError):
            SafetyPolicy(**bad)


def test_max_p_unsafe_ignores_nan():
    be = FakeBackend([5, 6], verdict=lambda c: 0.3)
    _, r = run(be)
    assert math.isclose(r.safety.max_p_unsafe, 0.3)


class HesitantBackend(FakeBackend):
    """Scripts (entropy, margin) per generated token index (1-based)."""

    def __init__(self, tokens, stats, **kw):
        super().__init__(tokens, **kw)
        self.stats = stats
        self.n_sampled = 0

    def sample(self):
        self.n_sampled += 1
        return super().sample()

    def hesitation(self):
        return self.stats.get(self.n_sampled, (0.1, 0.9))


def test_adaptive_triggers_fire_and_max_gap_is_respected():
    stats = {3: (4.0, 0.5), 7: (0.2, 0.01)}  # high entropy at token 3, tiny margin at token 7
    be = HesitantBackend(list(range(10, 40)), stats)
    pol = SafetyPolicy(every=0, max_gap=10, entropy_trigger=3.0, margin_trigger=0.05)
    _, r = run(be, pol)
    covered = [c for c, _ in r.safety.trace]
    assert covered == [0, 3, 7, 17, 27, 30]
    assert r.safety.triggers == ["prompt", "entropy", "margin", "max_gap", "max_gap", "end"]
    assert max(b - a for a, b in zip(covered, covered[1:])) <= 10
    assert r.text == text_of(range(10, 40))


def test_sentence_end_trigger():
    class Words(FakeBackend):
        def token_bytes(self, t):
            return b" end." if t == 13 else f"<{t}>".encode()
    _, r = run(Words(list(range(10, 20))), SafetyPolicy(every=0, max_gap=100, sentence_ends=True))
    assert [c for c, _ in r.safety.trace] == [0, 4, 10] and r.safety.triggers[1] == "sentence"


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_policy_never_shows_unchecked_text(seed):
    import random
    rnd = random.Random(seed)
    stats = {i: (rnd.uniform(0, 5), rnd.uniform(0, 1)) for i in range(1, 60)}
    turn = rnd.randint(1, 50)
    be = HesitantBackend(list(range(100, 160)), stats, verdict=lambda c: 0.9 if c >= turn else 0.1)
    pol = SafetyPolicy(every=0, max_gap=rnd.randint(1, 12), entropy_trigger=4.0, margin_trigger=0.1,
                       sentence_ends=True)
    pieces, r = run(be, pol, stream=True)
    assert r.refused
    shown = "".join(pieces[:-1])
    last_safe = max(c for c, p in r.safety.trace if p < 0.5)
    assert shown == text_of(range(100, 100 + last_safe)) and last_safe < turn
    assert r.safety.intervened_at - last_safe <= pol.max_gap


# -- the prompt surprisal rule (runtime/surprisal.py) at the prompt check ------------------------------------
PROMPT = [100, 101, 102, 103, 104, 105]  # 100: template, 101..104: user text, 105: template
USERS = [1, 2, 3, 4]


def surprisal_run(be, policy, file_rule=(None, None), users=USERS, threshold=0.5):
    g = Generation(generate(be, PROMPT, policy=policy, threshold=threshold, sampling=Sampling(), max_tokens=10,
                            surprisal=file_rule, user_positions=users))
    pieces = list(g)
    return pieces, g.reply


def test_surprisal_evidence_is_the_max_window_mean():
    from runtime.surprisal import evidence
    assert evidence([-1.0, -1.0, -9.0, -9.0, -1.0], 2) == 9.0
    assert evidence([-1.0, -3.0], 8) == 0.5  # fewer tokens than the window: the rest count as unsurprising
    assert evidence([-1.0, -3.0], 2) == 2.0
    assert evidence([], 8) == 0.0
    assert evidence([-1.0, -math.inf], 1) == math.inf
    for bad in ([float("nan")], [0.5], [None]):
        with pytest.raises(ValueError, match="not a log-probability"):
            evidence(bad, 8)
    with pytest.raises(ValueError, match="window"):
        evidence([-1.0], 0)


def test_gibberish_prompt_refused_by_surprisal_though_cls_clears_it():
    lp = {101: -1.0, 102: -12.0, 103: -13.0, 104: -1.0}.get
    be = FakeBackend([5, 6, 7], verdict=lambda c: 0.1, logprob=lp)
    pieces, r = surprisal_run(be, SafetyPolicy(every=1, surprisal_window=2, surprisal_threshold=10.0))
    assert be.scored == USERS  # only the user's tokens were asked for
    assert r.refused and r.safety.intervened_at == 0 and pieces == [DEFAULT_REFUSAL]
    assert r.safety.surprisal == 12.5 and "surprisal 12.50 >= 10.00" in r.safety.reason
    assert r.safety.trace == [(0, 0.1)]  # the [CLS] verdict was computed and cleared the prompt
    # a higher threshold lets it through; the evidence is still recorded
    be = FakeBackend([5, 6, 7], verdict=lambda c: 0.1, logprob=lp)
    _, r = surprisal_run(be, SafetyPolicy(every=1, surprisal_window=2, surprisal_threshold=12.6))
    assert not r.refused and r.text == text_of([5, 6, 7]) and r.safety.surprisal == 12.5


def test_surprisal_rule_from_the_model_file_and_policy_overrides():
    lp = {101: -1.0, 102: -6.0, 103: -6.0, 104: -1.0}.get  # window 8 (default): 14 / 8; window 2: 6.0
    mk = lambda: FakeBackend([5], logprob=lp)  # noqa: E731
    _, r = surprisal_run(mk(), SafetyPolicy(every=1), file_rule=(1.7, None))
    assert r.refused and r.safety.surprisal == 1.75 and r.safety.surprisal_window == 8
    _, r = surprisal_run(mk(), SafetyPolicy(every=1), file_rule=(5.0, 2))
    assert r.refused and r.safety.surprisal == 6.0
    _, r = surprisal_run(mk(), SafetyPolicy(every=1, surprisal_threshold=math.inf), file_rule=(1.7, None))
    assert not r.refused and r.safety.surprisal is None  # inf: off for this call


def test_surprisal_off_asks_the_backend_for_nothing():
    be = FakeBackend([5, 6], logprob=lambda t: -20.0)
    _, r = surprisal_run(be, SafetyPolicy(every=1))
    assert be.scored is None and not r.refused and r.safety.surprisal is None
    be = FakeBackend([5, 6], logprob=lambda t: -20.0)
    _, r = surprisal_run(be, None)  # safety off: no rule either, even with a threshold in the file
    assert be.scored is None and not r.refused


@pytest.mark.parametrize("case", ["nan", "short", "unlocated", "raises"])
def test_surprisal_that_cannot_be_computed_fails_closed(case, caplog):
    lp = (lambda t: float("nan")) if case == "nan" else (lambda t: -1.0)
    be = FakeBackend([5, 6], logprob=lp)
    if case == "short":
        be.prompt_logprobs = lambda: [-1.0]
    if case == "raises":
        def boom():
            raise RuntimeError("no logits")
        be.prompt_logprobs = boom
    with caplog.at_level("WARNING", logger="safechat"):
        pieces, r = surprisal_run(be, SafetyPolicy(every=1, surprisal_threshold=50.0),
                                  users=None if case == "unlocated" else USERS)
    assert r.refused and pieces == [DEFAULT_REFUSAL] and r.safety.intervened_at == 0
    assert "could not be computed" in r.safety.reason or "failed" in r.safety.reason
    assert "fail closed" in caplog.text


def test_cls_refusal_comes_first_and_surprisal_is_recorded():
    be = FakeBackend([5], verdict=lambda c: 0.9, logprob=lambda t: -2.0)
    _, r = surprisal_run(be, SafetyPolicy(every=1, surprisal_threshold=50.0))
    assert r.refused and "p_unsafe=0.900" in r.safety.reason and r.safety.surprisal == 1.0  # 4 x 2 nats / 8


def test_surprisal_policy_validation():
    for bad in ({"surprisal_threshold": 0.0}, {"surprisal_threshold": -1.0}, {"surprisal_threshold": math.nan},
                {"surprisal_window": 0}, {"surprisal_window": 2.5}):
        with pytest.raises(ValueError, match="surprisal"):
            SafetyPolicy(**bad)
