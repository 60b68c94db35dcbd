"""Strategic decoding: generate while re-checking the [CLS] verdict, backend-agnostic.

The verdict is computed at the end of the prompt (and of a prefill), then every
`policy.every` generated tokens, and once more at the end. A hold-back buffer keeps every
generated token from the user until a *safe* verdict has covered it; an unsafe verdict
(after `policy.patience` consecutive ones) drops what is held back and either ends with a
refusal (`refuse`) or just ends (`stop`). A verdict that cannot be computed (an exception,
NaN) is treated as unsafe at once: fail closed. With an answer threshold of inf (never act
inside the answer) only the prompt is checked: a check that cannot act is not computed, and
the answer is shown as it is generated.

With a surprisal threshold (the policy's, else the model file's), the prompt check also weighs the
prompt surprisal evidence of the user's text (runtime/surprisal.py): the backend scores the user-text
tokens during the prefill it runs anyway, and the prompt is refused when the [CLS] verdict *or* the
evidence reaches its threshold. Evidence that cannot be computed refuses (fail closed). Without a
threshold nothing is scored: no extra cost.

With a window (the policy's, else the model file's `safety.window`), a check inside the answer attends to the
positions runtime/window.py names (the verdict history it needs is kept here); the prompt check is unchanged.
"""
from __future__ import annotations

import codecs
import logging
import math
import time
from typing import Iterator

from .backends.base import Backend, Sampling
from .policy import (ACTIONS, DEFAULT_REFUSAL, TIERS, Categories, SafetyPolicy, apply_rules,  # noqa: F401 (re-exported)
                     loop_spec)
from .reply import Reply, Safety, Usage
from .stops import StopMatcher
from .surprisal import DEFAULT_WINDOW, SurprisalError, evidence, flags
from .window import WindowTrack


log = logging.getLogger("safechat")  # refusals at INFO; fail-closed refusals (no verdict) at WARNING


class _Intervene(Exception):
    def __init__(self, covered: int, reason: str, failed: bool = False):
        super().__init__(reason)
        self.covered, self.reason, self.failed = covered, reason, failed  # failed: no verdict, fail closed


class _Run:
    """The state of one generation: generated tokens, hold-back buffer, verdicts."""

    def __init__(self, backend: Backend, policy: SafetyPolicy | None, thr: float | None,
                 answer_thr: float | None, stop: list[str] | None = None, categories: Categories | None = None):
        self.backend, self.policy, self.thr, self.answer_thr = backend, policy, thr, answer_thr
        self.cats = categories if policy is not None else None
        self.enabled = policy is not None
        self.safety = Safety(enabled=self.enabled, threshold=thr, answer_threshold=answer_thr,
                             every=policy.every if policy is not None else None)
        self.generated: list[int] = []
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.released = 0
        self.streak = 0
        self.shown: list[str] = []  # every piece shown so far, in order
        self.stopper = StopMatcher(stop or [])
        self.track: WindowTrack | None = None  # a windowed policy's verdict history (generate sets it)

    def window_kw(self, covered: int) -> dict:
        """The backend's keywords for a check after `covered` generated tokens: {} when it sees everything."""
        return {} if self.track is None or covered == 0 else {"window": self.track.ranges(covered)}

    @property
    def stopped(self) -> bool:
        """A stop sequence was reached: nothing after it is shown, generation ends."""
        return self.stopper.hit

    def show(self, text: str, final: bool = False) -> str:
        text = self.stopper.feed(text) + (self.stopper.flush() if final else "")
        if text:
            self.shown.append(text)
        return text

    def release(self, upto: int) -> str:
        """Decode generated[released:upto] for display."""
        data = b"".join(self.backend.token_bytes(t) for t in self.generated[self.released:upto])
        self.released = upto
        return self.show(self.decoder.decode(data))

    def _record(self, scores, flagged: bool) -> str | None:
        """Keep a check's category scores on the trace and name its category: the top harm category when
        the check flagged the conversation, else the top row (`none` for a request with no harm topic)."""
        if scores is None:
            return None
        probs, tier = scores
        s = self.safety
        s.category = self.cats.top(probs)[0] if flagged else self.cats.best(probs)
        s.category_scores, s.controversial = self.cats.scores(probs), round(float(tier), 6)
        return s.category

    def verdict(self, p: float | None, covered: int, why: str, fresh: bool = True) -> str:
        """Record a verdict; return newly cleared text, or raise _Intervene.

        `fresh`: the backend's category scores belong to this check (False when the native loop's checks
        are replayed: its scores are then recomputed for an intervention only, to name the category)."""
        s = self.safety
        s.checks += 1
        s.triggers.append(why)
        p = float("nan") if p is None else float(p)
        s.trace.append((covered, p))
        where = "the prompt" if covered == 0 else f"token {covered}"
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise _Intervene(covered, f"safety verdict could not be computed (p_unsafe={p}) at token {covered}",
                             failed=True)
        thr = self.thr if covered == 0 else self.answer_thr
        scores = self.backend.categories() if self.cats is not None and fresh else None
        if self.cats is not None:
            s.category_trace.append(self.cats.best(scores[0]) if scores is not None else None)
        if covered == 0 or p >= thr:
            self._record(scores, flagged=p >= thr)
        unsafe, reason = p >= thr, None
        pol = self.policy
        if self.cats is not None and pol.has_category_rules:  # (the Python loop: every check is fresh)
            if scores is None and pol.block:  # fail closed: a blocked topic cannot be ruled out
                raise _Intervene(covered, f"category scores could not be computed at {where}", failed=True)
            if scores is not None:
                flipped, hit = apply_rules(unsafe, scores, self.cats, pol)
                if flipped != unsafe and not flipped:
                    s.allowed.append((covered, hit))
                elif flipped != unsafe:
                    self._record(scores, flagged=True)
                    s.category = hit
                    i = self.cats.names.index(hit)
                    reason = (f"blocked category {hit}: p={scores[0][i]:.3f} >= {self.cats.thresholds[i]:.3f} "
                              f"at {where}")
                unsafe = flipped
        if self.track is not None:
            self.track.record(covered, flagged_prompt=p >= thr, unsafe=unsafe, streak=self.streak)
        if unsafe:
            self.streak += 1
            if self.streak >= pol.patience:
                if reason is None:
                    if self.cats is not None and not fresh:
                        self.backend.check()  # the same position again: scores that name the category
                        self._record(self.backend.categories(), flagged=True)
                    named = f" ({s.category})" if self.cats is not None and s.category else ""
                    reason = f"unsafe{named}: p_unsafe={p:.3f} >= {thr:.3f} at {where}"
                raise _Intervene(covered, reason)
            return ""
        self.streak = 0
        return self.release(covered)


def _python_loop(run: _Run, n_prompt: int, max_tokens: int) -> Iterator[str]:
    """Sample, decode (+ side [CLS] when a check is due) and release, one token per iteration.

    The reference implementation; returns the finish reason ("stop" or "length").
    """
    backend, generated = run.backend, run.generated
    spec = loop_spec(run.policy if run.enabled else None, run.answer_thr)  # what the C loop reads too
    while True:
        if n_prompt + len(generated) + 2 >= backend.n_ctx:
            return "length"
        tok = backend.sample()
        if backend.is_eog(tok):
            return "stop"
        generated.append(tok)
        last = len(generated) >= max_tokens
        why = None
        if spec.enabled:
            stats = backend.hesitation() if spec.needs_stats else None
            since = len(generated) - run.safety.trace[-1][0]
            piece_bytes = backend.token_bytes(tok) if spec.sentence_ends else b""
            why = "end" if last else spec.due(len(generated), since, stats, piece_bytes)
        if why is not None or not last:
            p = backend.advance(tok, why is not None, **(run.window_kw(len(generated)) if why is not None else {}))
        if why is not None:
            piece = run.verdict(p, len(generated), why)
        else:
            piece = "" if run.enabled else run.release(len(generated))
        if piece:
            yield piece
        if run.stopped:
            return "stop"
        if last:
            return "length"


def _fused_loop(run: _Run, loop) -> Iterator[str]:
    """The same loop run by the backend (natively, GIL released) between hand-overs.

    Each event brings the tokens and checks made since the last one; the verdicts are replayed
    through `run.verdict`, so this module stays the one authority over what is shown.
    """
    while True:
        kind, tokens, checks, info = loop.run()
        run.generated.extend(tokens)
        for covered, p, why in checks:  # one at a time: a later unsafe verdict must not hide a shown piece
            piece = run.verdict(p, covered, why, fresh=False)
            if piece:
                yield piece
            if run.stopped:
                return "stop"
        piece = run.release(len(run.generated)) if not run.enabled and tokens else ""
        if piece:
            yield piece
        if run.stopped:
            return "stop"
        if kind == "error":
            raise RuntimeError(info)
        if kind == "unsafe":  # the replay above must have raised: the two disagree, fail closed
            raise RuntimeError("the native loop stopped on a verdict the strategy did not confirm")
        if kind == "done":
            return info


def _evidence(backend: Backend, safety: Safety, positions: list[int] | None, window: int) -> str | None:
    """Record the prompt surprisal evidence of the last `start` on `safety`; why it cannot be, or None."""
    if positions is None:
        return "the user text's tokens could not be located in the prompt"
    try:
        lps = backend.prompt_logprobs()
        if lps is None or len(lps) != len(positions):
            return (f"the backend scored {'no' if lps is None else len(lps)} of the {len(positions)} "
                    "user-text tokens")
        safety.surprisal = evidence(lps, window)
    except SurprisalError as e:
        return str(e)
    return None


def generate(backend: Backend, prompt_tokens: list[int], *, policy: SafetyPolicy | None,
             threshold: float | None, sampling: Sampling, max_tokens: int, native: bool = False,
             answer_threshold: float | None = None, stop: list[str] | None = None,
             categories: Categories | None = None, surprisal: tuple[float | None, int | None] = (None, None),
             user_positions: list[int] | None = None, answer_start: int | None = None) -> Iterator[str]:
    """Yield text pieces as they are cleared for display; return the final `Reply`.

    `policy=None` runs without checks (an explicit caller choice). `native=True` runs the token
    loop inside the backend (`backend.fused_loop`, the C loop for llama.cpp). `stop`: strings that
    end the answer where they first appear in the released text (not shown; runtime/stops.py).
    `categories`: the model's category head; the policy's allow/block/controversial rules need it, and
    run in the Python loop (the native loop knows thresholds only). `answer_start`: where the answer text
    begins in `prompt_tokens` (before a prefill; None: at the end), for a windowed policy. Use through
    `Generation`.
    """
    t0 = time.perf_counter()
    enabled = policy is not None
    if enabled:
        policy = policy.with_every(None).with_window(None)  # unresolved: the defaults
    thr = (policy.threshold or threshold) if enabled else None
    if enabled and thr is None:
        raise ValueError("safety is on but no threshold is known (model metadata or SafetyPolicy.threshold)")
    if not enabled:
        answer_thr = None
    elif policy.answer_threshold is not None:
        answer_thr = policy.answer_threshold
    elif policy.threshold is None and answer_threshold is not None:  # the model file's calibrated pair
        answer_thr = answer_threshold
    else:  # one threshold for every check: a policy threshold of its own also governs the answer
        answer_thr = thr
    if enabled and policy.has_category_rules and categories is None:
        raise ValueError("the policy's allow/block/controversial rules need a model with a category head")
    if enabled and categories is not None and policy.has_category_rules:
        native = False  # the C loop does not apply the category rules
    attend = policy.windowed if enabled else None
    if attend is not None:
        native = False  # nor windows (the Python loop computes the same tokens and verdicts otherwise)
    s_thr = None
    if enabled:
        s_thr = policy.surprisal_threshold if policy.surprisal_threshold is not None else surprisal[0]
        s_thr = s_thr if s_thr is not None and math.isfinite(s_thr) else None
    window = (policy.surprisal_window or surprisal[1] or DEFAULT_WINDOW) if s_thr is not None else None
    run = _Run(backend, policy, thr, answer_thr, stop, categories)
    safety = run.safety
    if attend is not None:
        start = len(prompt_tokens) if answer_start is None else answer_start
        if not 0 <= start <= len(prompt_tokens):
            raise ValueError(f"answer_start {answer_start} is outside the prompt's {len(prompt_tokens)} tokens")
        run.track = WindowTrack(attend, start, len(prompt_tokens))
        safety.window = attend
    safety.surprisal_threshold, safety.surprisal_window = s_thr, window
    shown = run.shown
    loop = None
    finish = "length"
    t_loop = t_end = None
    try:
        score = {} if s_thr is None or user_positions is None else {"score": list(user_positions)}
        p = backend.start(prompt_tokens, sampling, check=enabled, **score)  # scores only when the rule is on
        problem = _evidence(backend, safety, score.get("score"), window) if s_thr is not None else None
        if enabled:
            run.verdict(p, 0, "prompt")
        if problem is not None:
            raise _Intervene(0, f"prompt surprisal could not be computed: {problem}", failed=True)
        if s_thr is not None and flags(safety.surprisal, s_thr):
            raise _Intervene(0, f"gibberish in the prompt: surprisal {safety.surprisal:.2f} >= {s_thr:.2f} nats "
                                f"over {window} user-text tokens")
        if enabled:
            run.enabled = math.isfinite(answer_thr)  # inf: no check inside the answer could act
        if native:
            loop = backend.fused_loop(policy if run.enabled else None, run.answer_thr, max_tokens,
                                      len(prompt_tokens), run.streak)
            steps = _fused_loop(run, loop)
        else:
            steps = _python_loop(run, len(prompt_tokens), max_tokens)
        t_loop = time.perf_counter()
        finish = yield from steps
        t_end = time.perf_counter()
        generated = run.generated
        if run.enabled and not run.stopped and (run.released < len(generated) or run.streak):
            if run.released < len(generated) and not safety.trace[-1][0] == len(generated):
                piece = run.verdict(backend.check(**run.window_kw(len(generated))), len(generated), "end")
                if piece:
                    yield piece
            if run.streak:  # the last verdicts were unsafe (below patience): never show what they covered
                raise _Intervene(len(generated), f"unsafe verdict at the end of generation "
                                                 f"(p_unsafe={safety.trace[-1][1]:.3f} >= {run.answer_thr:.3f})")
        tail = "" if run.stopped else run.show(run.decoder.decode(b"", final=True), final=True)
        if tail:
            yield tail
        refused = False
    except _Intervene as stop:
        safety.intervened_at, safety.reason = stop.covered, stop.reason
        (log.warning if stop.failed else log.info)("refused (%s): %s", "fail closed" if stop.failed else
                                                   policy.action, stop.reason)
        finish, refused = "safety", True
        if policy.action == "refuse":
            msg = ("\n\n" if shown else "") + policy.refusal
            shown.append(msg)
            yield msg
    except Exception as e:  # a backend failure mid-generation: fail closed when checking
        if not enabled:
            raise
        safety.intervened_at = run.released
        safety.reason = f"safety check failed: {type(e).__name__}: {e}"
        log.warning("refused (fail closed): %s", safety.reason)
        finish, refused = "safety", True
        msg = ("\n\n" if shown else "") + policy.refusal
        shown.append(msg)
        yield msg
    t = time.perf_counter()
    usage = Usage(len(prompt_tokens), len(run.generated), t - t0,
                  loop_seconds=((t_end or t) - t_loop) if t_loop is not None else 0.0,
                  native_seconds=loop.seconds if loop is not None else None)
    return Reply(text="".join(shown), refused=refused, safety=safety, usage=usage, finish_reason=finish)


class Generation:
    """Iterate for text pieces; `.reply` holds the final Reply once iteration has finished.

    A stream holds its model until it ends: read it to the end, `close()` it, or use it as a
    context manager (`with m.chat(q, stream=True) as g: ...`), which closes it however the block
    ends. A closed stream releases the model at once and yields nothing more (`.reply` stays None
    when it was closed before the end). Dropping the last reference to a stream closes it too, at
    once: the Generation is its own iterator and nothing it holds refers back to it, so no
    reference cycle waits for the garbage collector (an app's "stop" button that just forgets the
    stream frees the model for the next chat).
    """

    def __init__(self, gen: Iterator[str]):
        self._gen = gen  # never a generator that refers back to this object: that would be a cycle
        self._done = False
        self.reply: Reply | None = None

    def __iter__(self) -> "Generation":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._gen)
        except StopIteration as end:
            self._done = True
            self.reply = end.value
            raise StopIteration from None
        except BaseException:
            self._done = True
            raise

    def close(self) -> None:
        """Stop generating and release the model (idempotent)."""
        self._done = True
        self._gen.close()

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> Reply:
        for _ in self:
            pass
        return self.reply
