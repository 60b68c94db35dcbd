"""Strategic decoding: generate while re-checking the [CLS] verdict, backend-agnostic.

The verdict is computed at the end of the prompt (and of a prefill), then every
`policy.every` generated tokens, and once more at the end. A hold-back buffer keeps every
generated token from the user until a *safe* verdict has covered it; an unsafe verdict
(after `policy.patience` consecutive ones) drops what is held back and either ends with a
refusal (`refuse`) or just ends (`stop`). A verdict that cannot be computed (an exception,
NaN) is treated as unsafe at once: fail closed.
"""
from __future__ import annotations

import codecs
import math
import time
from dataclasses import dataclass
from typing import Iterator

from .backends.base import Backend, Sampling
from .reply import Reply, Safety, Usage

ACTIONS = ("refuse", "stop")
DEFAULT_REFUSAL = "I can't help with that."


@dataclass(frozen=True)
class SafetyPolicy:
    """When to check, when to act, and how.

    Checks always run at the end of the prompt (and prefill) and at the end of generation.
    In between: every `every` tokens (0 = no regular cadence), and, adaptively, right after a
    token sampled while the model hesitated (`entropy_trigger`: entropy in nats at or above;
    `margin_trigger`: top-1 minus top-2 probability at or below), after a token that ends a
    sentence or line (`sentence_ends`), and never more than `max_gap` tokens apart.
    """

    every: int = 4                  # check every k generated tokens (0: only triggers / max_gap)
    threshold: float | None = None  # None: the calibrated threshold from the model file
    patience: int = 1               # consecutive unsafe verdicts before acting
    action: str = "refuse"          # "refuse" | "stop"
    refusal: str = DEFAULT_REFUSAL
    max_gap: int | None = None      # k_max: never more tokens than this without a check
    entropy_trigger: float | None = None
    margin_trigger: float | None = None
    sentence_ends: bool = False

    @property
    def needs_stats(self) -> bool:
        return self.entropy_trigger is not None or self.margin_trigger is not None

    def due(self, n: int, since: int, stats: tuple[float, float] | None, piece: bytes) -> str | None:
        """Why a check is due after the n-th generated token (None: not due)."""
        if self.every and n % self.every == 0:
            return "every"
        if self.max_gap and since >= self.max_gap:
            return "max_gap"
        if stats is not None:
            entropy, margin = stats
            if self.entropy_trigger is not None and entropy >= self.entropy_trigger:
                return "entropy"
            if self.margin_trigger is not None and margin <= self.margin_trigger:
                return "margin"
        if self.sentence_ends and piece.rstrip(b" \t").endswith((b".", b"!", b"?", b"\n", b":")):
            return "sentence"
        return None

    def __post_init__(self):
        if self.every < 0:
            raise ValueError("SafetyPolicy.every must be >= 0")
        if self.every == 0 and not self.max_gap:
            raise ValueError("SafetyPolicy needs every >= 1 or a max_gap")
        if self.max_gap is not None and self.max_gap < 1:
            raise ValueError("SafetyPolicy.max_gap must be >= 1")
        if self.patience < 1:
            raise ValueError("SafetyPolicy.patience must be >= 1")
        if self.action not in ACTIONS:
            raise ValueError(f"SafetyPolicy.action must be one of {ACTIONS}, got {self.action!r}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError("SafetyPolicy.threshold must be in (0, 1)")


class _Intervene(Exception):
    def __init__(self, covered: int, reason: str):
        super().__init__(reason)
        self.covered, self.reason = covered, reason


def generate(backend: Backend, prompt_tokens: list[int], *, policy: SafetyPolicy | None,
             threshold: float | None, sampling: Sampling, max_tokens: int) -> Iterator[str]:
    """Yield text pieces as they are cleared for display; return the final `Reply`.

    `policy=None` runs without checks (an explicit caller choice). Use through `Generation`.
    """
    t0 = time.perf_counter()
    enabled = policy is not None
    thr = (policy.threshold or threshold) if enabled else None
    if enabled and thr is None:
        raise ValueError("safety is on but no threshold is known (model metadata or SafetyPolicy.threshold)")
    safety = Safety(enabled=enabled, threshold=thr)
    generated: list[int] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    shown: list[str] = []
    released = 0
    streak = 0
    finish = "length"

    def release(upto: int) -> str:
        nonlocal released
        data = b"".join(backend.token_bytes(t) for t in generated[released:upto])
        released = upto
        return decoder.decode(data)

    def verdict(p: float | None, covered: int) -> str:
        """Record a verdict; return newly cleared text, or raise _Intervene."""
        nonlocal streak
        safety.checks += 1
        p = float("nan") if p is None else float(p)
        safety.trace.append((covered, p))
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            raise _Intervene(covered, f"safety verdict could not be computed (p_unsafe={p}) at token {covered}")
        if p >= thr:
            streak += 1
            if streak >= policy.patience:
                where = "the prompt" if covered == 0 else f"token {covered}"
                raise _Intervene(covered, f"unsafe: p_unsafe={p:.3f} >= {thr:.3f} at {where}")
            return ""
        streak = 0
        return release(covered)

    try:
        p = backend.start(prompt_tokens, sampling, check=enabled)
        if enabled:
            safety.triggers.append("prompt")
            verdict(p, 0)
        while True:
            if len(prompt_tokens) + len(generated) + 2 >= backend.n_ctx:
                finish = "length"
                break
            tok = backend.sample()
            if backend.is_eog(tok):
                finish = "stop"
                break
            generated.append(tok)
            last = len(generated) >= max_tokens
            why = None
            if enabled:
                stats = backend.hesitation() if policy.needs_stats else None
                since = len(generated) - safety.trace[-1][0]
                piece_bytes = backend.token_bytes(tok) if policy.sentence_ends else b""
                why = "end" if last else policy.due(len(generated), since, stats, piece_bytes)
            check = why is not None
            if check or not last:
                p = backend.advance(tok, check)
            if check:
                safety.triggers.append(why)
                piece = verdict(p, len(generated))
            elif not enabled:
                piece = release(len(generated))
            else:
                piece = ""
            if piece:
                shown.append(piece)
                yield piece
            if last:
                finish = "length"
                break
        if enabled and (released < len(generated) or streak):
            if released < len(generated) and not safety.trace[-1][0] == len(generated):
                safety.triggers.append("end")
                piece = verdict(backend.check(), len(generated))
                if piece:
                    shown.append(piece)
                    yield piece
            if streak:  # the last verdicts were unsafe (below patience): never show what they covered
                raise _Intervene(len(generated), f"unsafe verdict at the end of generation "
                                                 f"(p_unsafe={safety.trace[-1][1]:.3f} >= {thr:.3f})")
        tail = decoder.decode(b"", final=True)
        if tail:
            shown.append(tail)
            yield tail
        refused = False
    except _Intervene as stop:
        safety.intervened_at, safety.reason = stop.covered, stop.reason
        finish, refused = "safety", True
        if policy.action == "refuse":
            msg = ("\n\n" if shown else "") + policy.refusal
            shown.append(msg)
            yield msg
    except Exception as e:  # a backend failure mid-generation: fail closed when checking
        if not enabled:
            raise
        safety.intervened_at = released
        safety.reason = f"safety check failed: {type(e).__name__}: {e}"
        finish, refused = "safety", True
        msg = ("\n\n" if shown else "") + policy.refusal
        shown.append(msg)
        yield msg
    usage = Usage(len(prompt_tokens), len(generated), time.perf_counter() - t0)
    return Reply(text="".join(shown), refused=refused, safety=safety, usage=usage, finish_reason=finish)


class Generation:
    """Iterate for text pieces; `.reply` holds the final Reply once iteration has finished."""

    def __init__(self, gen: Iterator[str]):
        self._gen = gen
        self.reply: Reply | None = None

    def __iter__(self):
        self.reply = yield from self._gen

    def run(self) -> Reply:
        for _ in self:
            pass
        return self.reply
