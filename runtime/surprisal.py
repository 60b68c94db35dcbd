"""Prompt surprisal evidence (issue 35): an optimised adversarial suffix is gibberish, and the model says so.

The one specification every backend is held to (pure Python: no backend, no numpy). A backend hands back,
from the prompt's prefill, the log-probability of each *user-text* token given everything before it
(`Backend.prompt_logprobs`). From those:

* `evidence(logprobs, window)`: the maximum, over runs of `window` consecutive user-text tokens, of the
  mean surprisal (-log p, nats). The user-text tokens of every user turn are taken in order, as one
  sequence (a window may span the end of one turn and the start of the next). A text shorter than
  `window` is one window whose missing tokens count as unsurprising (its surprisal sum / `window`): the
  first words of a message have little context, and on the default model 3-token prompts ("flu baby
  feed") averaged 13 nats, above most optimised suffixes, which are 20 tokens or more. No user-text
  token gives 0.0 (nothing was typed that could surprise).
* `flags(value, threshold)`: the rule at the prompt check. It is an OR with the [CLS] verdict: the prompt
  is refused when p_unsafe reaches its threshold *or* the evidence reaches `surprisal_threshold`, at
  once (patience does not apply: the evidence is computed once per prompt, not re-checked).

Which tokens count (`user_positions`): only text that a `user` message carried, in every user turn. Not
the chat template, not the system prompt, not earlier assistant answers, not the assistant prefill (an
attacker-written prefill is the [CLS] check's business). A token that the tokenizer merged across the
border of user text and template text counts as user text. The first token of the prompt has no
context and is never scored.

Fail closed: a log-probability that is missing, NaN, or above 0 raises `SurprisalError`, and the strategy
then refuses without generating (runtime/strategy.py), as it does for a verdict that cannot be computed.
"""
from __future__ import annotations

import math
from typing import Sequence

from .contract import DEFAULT_SURPRISAL_WINDOW as DEFAULT_WINDOW, MAX_EVERY as MAX_WINDOW, valid_surprisal_window


class SurprisalError(ValueError):
    """The evidence cannot be computed (bad log-probabilities, or user text that cannot be located)."""


def evidence(logprobs: Sequence[float], window: int = DEFAULT_WINDOW) -> float:
    """Max over `window`-token runs of the mean surprisal -log p (nats) of the user-text tokens, in order (a
    text shorter than `window`: its surprisal sum / `window`)."""
    if not valid_surprisal_window(window):
        raise ValueError(f"the surprisal window must be an integer 1..{MAX_WINDOW}, got {window!r}")
    s = []
    for i, lp in enumerate(logprobs):
        if lp is None or not isinstance(lp, (int, float)) or math.isnan(lp) or lp > 1e-6:
            raise SurprisalError(f"log-probability {lp!r} of user-text token {i} is not a log-probability")
        s.append(-float(lp))  # -inf log p (a token the model rules out) is +inf surprisal: flagged
    if not s:
        return 0.0
    w = min(window, len(s))
    return max(math.fsum(s[i:i + w]) for i in range(len(s) - w + 1)) / window


def flags(value: float, threshold: float | None) -> bool:
    """The surprisal rule: the evidence reaches the threshold (None or inf: the rule is off)."""
    return threshold is not None and math.isfinite(threshold) and value >= threshold


def user_positions(pieces: Sequence[tuple[bytes, bool]], tokens: Sequence[bytes], offset: int = 0) -> list[int]:
    """Which of `tokens` (their bytes, in order) overlap user text, as indices + `offset`.

    `pieces`: the text the tokens were made from, as (bytes, is user text) pieces in order. The tokens'
    bytes must spell the pieces' bytes, or that with one leading space (a SentencePiece vocabulary's
    "▁" before a run); otherwise the user text cannot be located: SurprisalError."""
    text = b"".join(p for p, _ in pieces)
    spelled = b"".join(tokens)
    lead = 0
    if spelled != text:
        if spelled == b" " + text:
            lead = 1
        else:
            raise SurprisalError("the tokens do not spell the prompt's text; the user text cannot be located")
    spans, at = [], lead
    for p, user in pieces:
        if user and p:
            spans.append((at, at + len(p)))
        at += len(p)
    out, at, k = [], 0, 0
    for i, t in enumerate(tokens):
        a, b = at, at + len(t)
        at = b
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        if k < len(spans) and spans[k][0] < b and a < spans[k][1] and b > a:
            out.append(i + offset)
    return out
