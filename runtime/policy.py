"""The policy: when to check, when to act, and the per-app rules over a model's category head.

Pure data and pure functions (no backend, no generation): `SafetyPolicy` is what callers pass,
`Categories` what a model file declares, `apply_rules` the one place the allow/block/controversial
rules are decided (the token loop in strategy.py and `bench categories` both call it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from runtime.contract import (DEFAULT_EVERY, parse_window, valid_answer_threshold, valid_surprisal_threshold,
                              valid_surprisal_window, valid_window)

ACTIONS = ("refuse", "stop")
TIERS = ("strict", "loose")
DEFAULT_REFUSAL = "I can't help with that."


@dataclass(frozen=True)
class Categories:
    """A model file's category head (`safety.categories`): names in row order, the per-category
    thresholds calibrated on val, the controversial tier's threshold; `none` names the no-harm row."""

    names: tuple[str, ...]
    thresholds: tuple[float, ...]
    controversial_threshold: float
    none: str = "none"

    def scores(self, probs) -> dict[str, float]:
        return {n: round(float(q), 6) for n, q in zip(self.names, probs)}

    def top(self, probs) -> tuple[str, float]:
        """The most likely harm category (the no-harm row left out) and its probability."""
        return max(((n, float(q)) for n, q in zip(self.names, probs) if n != self.none), key=lambda x: x[1])

    def best(self, probs) -> str:
        """The most likely row, the no-harm row included."""
        return max(zip(self.names, probs), key=lambda x: x[1])[0]

    def confident(self, probs, names) -> str | None:
        """The first of `names` whose probability reaches its threshold, or None."""
        for n in sorted(names):
            i = self.names.index(n)
            if probs[i] >= self.thresholds[i]:
                return n
        return None


@dataclass(frozen=True)
class SafetyPolicy:
    """When to check, when to act, and how.

    Checks always run at the end of the prompt (and prefill) and at the end of generation.
    In between: every `every` tokens (0 = no regular cadence), and, adaptively, right after a
    token sampled while the model hesitated (`entropy_trigger`: entropy in nats at or above;
    `margin_trigger`: top-1 minus top-2 probability at or below), after a token that ends a
    sentence or line (`sentence_ends`), and never more than `max_gap` tokens apart.
    """

    every: int | None = None        # check every k generated tokens (0: only triggers / max_gap); None: the
                                    # model file's calibrated cadence (`safety.every`), else DEFAULT_EVERY
    threshold: float | None = None  # None: the calibrated threshold from the model file
    answer_threshold: float | None = None  # for the checks after the prompt; None: `threshold`; inf: none there
    patience: int = 1               # consecutive unsafe verdicts before acting
    action: str = "refuse"          # "refuse" | "stop"
    refusal: str = DEFAULT_REFUSAL
    max_gap: int | None = None      # k_max: never more tokens than this without a check
    entropy_trigger: float | None = None
    margin_trigger: float | None = None
    sentence_ends: bool = False
    # per-app rules over the category head (a model file with `safety.categories`):
    allow: frozenset = frozenset()  # answer a flagged request when one of these categories reaches its threshold
    block: frozenset = frozenset()  # refuse a request the binary verdict clears when one of these reaches its
    controversial: str = "strict"   # "loose": answer a flagged request the controversial tier reaches
    # the prompt surprisal rule (runtime/surprisal.py): refuse a prompt whose user text reaches this evidence
    # (nats); None: the model file's `safety.surprisal_threshold` (absent: off); inf: off
    surprisal_threshold: float | None = None
    surprisal_window: int | None = None  # tokens per window; None: the file's, else surprisal.DEFAULT_WINDOW
    # windowed strategic attention inside the answer (runtime/window.py): (r1, r2, r3) tokens, or "all" (every
    # check sees everything before it); None: the model file's `safety.window`, else "all"
    window: tuple[int, int, int] | str | None = None

    @property
    def has_category_rules(self) -> bool:
        return bool(self.allow or self.block or self.controversial == "loose")

    def with_every(self, every: int | None) -> "SafetyPolicy":
        """This policy with `every` resolved: its own cadence, else the model file's `every`, else DEFAULT_EVERY."""
        if self.every is not None:
            return self
        return replace(self, every=DEFAULT_EVERY if every is None else int(every))

    def with_window(self, window: tuple[int, int, int] | None) -> "SafetyPolicy":
        """This policy with `window` resolved: its own, else the model file's, else "all"."""
        return self if self.window is not None else replace(self, window=window or "all")

    @property
    def windowed(self) -> tuple[int, int, int] | None:
        """The window of the checks inside the answer, or None when they see everything."""
        return self.window if isinstance(self.window, tuple) else None

    def __post_init__(self):
        if self.window is not None and self.window != "all":
            w = self.window
            try:
                w = parse_window(w) if isinstance(w, (str, list)) else w
            except ValueError as e:
                raise ValueError(f"SafetyPolicy.window: {e}") from None
            if not valid_window(w):
                raise ValueError(f'SafetyPolicy.window must be (r1, r2, r3) tokens with r1 >= 0, r2 >= 1, r3 >= 0, '
                                 f'"all" or None, got {self.window!r}')
            object.__setattr__(self, "window", w)
        for name in ("allow", "block"):
            v = getattr(self, name)
            v = frozenset([v] if isinstance(v, str) else v or ())
            if not all(isinstance(c, str) and c for c in v):
                raise ValueError(f"SafetyPolicy.{name} must be category names")
            object.__setattr__(self, name, v)
        if self.allow & self.block:
            raise ValueError(f"SafetyPolicy: {sorted(self.allow & self.block)} both allowed and blocked")
        if self.controversial not in TIERS:
            raise ValueError(f"SafetyPolicy.controversial must be one of {TIERS}, got {self.controversial!r}")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 0):
            raise ValueError("SafetyPolicy.every must be an integer >= 0 (or None: the model file's cadence)")
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
        if self.surprisal_threshold is not None and not valid_surprisal_threshold(self.surprisal_threshold):
            raise ValueError("SafetyPolicy.surprisal_threshold must be nats > 0, or math.inf for off")
        if self.surprisal_window is not None and not valid_surprisal_window(self.surprisal_window):
            raise ValueError("SafetyPolicy.surprisal_window must be an integer number of tokens >= 1")
        if self.answer_threshold is not None and not valid_answer_threshold(self.answer_threshold):
            raise ValueError("SafetyPolicy.answer_threshold must be in (0, 1), or math.inf to never act inside the answer")


def apply_rules(unsafe: bool, scores, cats: Categories, policy: SafetyPolicy) -> tuple[bool, str | None]:
    """The per-app rules on one check: (unsafe after the rules, the category that changed it or None).

    A flagged check is cleared when an allowed category reaches its threshold, or, with
    `controversial="loose"`, when the controversial tier reaches its own; a cleared check is flagged when
    a blocked category reaches its threshold. `scores` = (category probabilities, tier probability)."""
    probs, tier = scores
    if unsafe:
        hit = cats.confident(probs, policy.allow)
        if hit is None and policy.controversial == "loose" and tier >= cats.controversial_threshold:
            hit = "controversial"
        return (hit is None), hit
    hit = cats.confident(probs, policy.block)
    return (hit is not None), hit


class LoopSpec(NamedTuple):
    """What the token loops act on, for one generation: the one specification both read.

    The Python loop (runtime/strategy.py) calls `due`; the C loop (cpp_ext/loop.c) receives this tuple
    as its `Policy` struct, field for field in this order (`runtime._native.POLICY_FIELDS`, compared
    with `LoopSpec._fields` before the first native loop runs). A field added here and there is the
    whole change; `loop_spec` is the one place a SafetyPolicy becomes a LoopSpec.
    """
    enabled: bool
    every: int                # 0: no regular cadence
    max_gap: int              # 0: none
    entropy_trigger: float    # nan: off
    margin_trigger: float     # nan: off
    sentence_ends: bool
    threshold: float          # the threshold of the checks inside the answer
    patience: int

    @property
    def needs_stats(self) -> bool:
        return not (math.isnan(self.entropy_trigger) and math.isnan(self.margin_trigger))

    def due(self, n: int, since: int, stats: tuple[float, float] | None, piece: bytes) -> str | None:
        """Why a check is due after the n-th generated token, `since` tokens after the last one (None: not due)."""
        if self.every and n % self.every == 0:
            return "every"
        if self.max_gap and since >= self.max_gap:
            return "max_gap"
        if stats is not None:
            entropy, margin = stats
            if not math.isnan(self.entropy_trigger) and entropy >= self.entropy_trigger:
                return "entropy"
            if not math.isnan(self.margin_trigger) and margin <= self.margin_trigger:
                return "margin"
        if self.sentence_ends and piece.rstrip(b" \t").endswith((b".", b"!", b"?", b"\n", b":")):
            return "sentence"
        return None


def loop_spec(policy: SafetyPolicy | None, threshold: float) -> LoopSpec:
    """The loops' view of `policy` (None: no checks; its `every` resolved, `generate` does it) with the answer's
    threshold."""
    if policy is None:
        return LoopSpec(False, 0, 0, math.nan, math.nan, False, 2.0, 1)
    off = lambda v: math.nan if v is None else float(v)  # noqa: E731
    return LoopSpec(True, int(policy.every), int(policy.max_gap or 0), off(policy.entropy_trigger),
                    off(policy.margin_trigger), bool(policy.sentence_ends), float(threshold), int(policy.patience))
