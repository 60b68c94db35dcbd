"""The small interface the decoding strategy needs from an inference engine.

A backend owns one KV cache and one sampler. The strategy drives it:

    p = backend.start(prompt_tokens, sampling, check=True)   # prefill (+ side [CLS])
    tok = backend.sample()                                   # from the last real position
    p = backend.advance(tok, check=...)                      # decode tok (+ side [CLS])
    p = backend.check()                                      # a lone [CLS] on the current cache

`start`, `advance` and `check` return p_unsafe in [0, 1] for a check (the verdict on
everything in the cache), or None when no check was asked for. A side [CLS] never stays in
the cache: the next token takes its position.

    p = backend.advance(tok, check=True, window=ranges)      # a windowed check (runtime/window.py)
    p = backend.check(window=ranges)

`window` (only ever given to a check inside the answer): the half-open position ranges the check's side
tokens and [CLS] attend to, which then take the positions right after the last range's end; the
strategy passes it only for a windowed policy, so the other calls are unchanged.

    p = backend.start(prompt_tokens, sampling, check=True, score=positions)
    lps = backend.prompt_logprobs()                          # log p(tokens[i] | tokens[:i]), i in positions

`score` (the prompt surprisal rule, runtime/surprisal.py) asks the prefill for the log-probabilities of
those prompt tokens (the user's text); the strategy passes it only when the rule is on, so a backend
computes no extra logits otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from ..errors import ContextOverflowError, ParameterError


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. These field defaults are plain greedy decoding (what the tools
    that measure the model use); a chat's defaults are `CHAT_SAMPLING`."""
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0
    grammar: str | None = None  # GBNF the answer must follow (runtime/formats.py); None: free text

    def __post_init__(self):
        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < lo or v > hi or (lo_open and v == lo):
                raise ParameterError(f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}",
                                     param=name)

        def integer(name, lo):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ParameterError(f"{name} must be an integer >= {lo}, got {v!r}", param=name)
        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0)
        number("min_p", 0.0, 1.0)
        number("repeat_penalty", 0.0, 100.0, lo_open=True)
        integer("top_k", 0)
        integer("repeat_last_n", 0)
        integer("seed", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


# A chat's defaults (API, CLI, server): SmolLM2's card suggests a low temperature and top_p 0.9;
# the repetition penalty is Ollama's default (a 135M model loops without one). temperature=0 is
# greedy; seed None means a fresh seed per call.
CHAT_SAMPLING = {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1}


def category_probs(row, ids) -> tuple[tuple[float, ...], float] | None:
    """(softmax over the category rows, sigmoid of the controversial row) of one logits row, or None when
    a logit is not finite. `ids` is `SafetyMeta.category_ids`: (*categories, controversial)."""
    z = [float(row[i]) for i in ids[:-1]]
    t = float(row[ids[-1]])
    if not all(math.isfinite(v) for v in (*z, t)):
        return None
    m = max(z)
    e = [math.exp(v - m) for v in z]
    total = sum(e)
    tier = 1.0 / (1.0 + math.exp(-t)) if t >= 0 else math.exp(t) / (1.0 + math.exp(t))
    return tuple(v / total for v in e), tier


def logprob_py(row, n_vocab: int, excluded, token: int) -> float:
    """log softmax(row)[token] over the vocabulary without the excluded ids (reference of the native one)."""
    import numpy as np

    x = np.ctypeslib.as_array(row, shape=(n_vocab,)) if not isinstance(row, np.ndarray) else row
    x = x.astype(np.float64)
    keep = np.ones(n_vocab, bool)
    keep[[i for i in excluded if 0 <= i < n_vocab]] = False
    if not keep[token]:
        return float("-inf")
    m = x[keep].max()
    return float(x[token] - m - np.log(np.exp(x[keep] - m).sum()))


def side_tokens(safety_ids) -> list[int]:
    """What a check decodes after the context: the side tokens, if any, then the [CLS].

    `safety_ids` is `SafetyMeta.token_ids`: (*side, cls, safe, unsafe)."""
    return list(safety_ids[:-2])


def check_prompt(tokens: list[int], n_ctx: int, check: bool, safety_ids, score=()) -> None:
    """What every backend's `start` refuses: an empty prompt, one that leaves no room, a check without ids,
    scored positions outside 1..len(tokens)-1 (the first token has no context) or not increasing."""
    if not tokens:
        raise ValueError("empty prompt")
    if score and (score[0] < 1 or score[-1] >= len(tokens) or any(b <= a for a, b in zip(score, score[1:]))):
        raise ValueError(f"scored positions must increase within 1..{len(tokens) - 1}")
    if len(tokens) + 1 + (len(side_tokens(safety_ids)) if safety_ids else 1) > n_ctx:
        raise ContextOverflowError(f"the prompt is {len(tokens)} tokens; the context holds {n_ctx}")
    if check and safety_ids is None:
        raise RuntimeError("this model has no safety tokens")


class TokensFromFile:
    """tokenize / token_bytes / is_eog of a backend, delegated to its model file `self.mf`."""

    mf: object

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.mf.tokenize(text, special)

    def special_texts(self):
        return self.mf.special_texts()

    def token_bytes(self, token: int) -> bytes:
        return self.mf.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.mf.is_eog(token)


class Backend(Protocol):
    n_ctx: int

    def tokenize(self, text: str, special: bool) -> list[int]: ...

    def special_texts(self) -> tuple: ...  # the vocabulary's control tokens (runtime.prompt.Special)

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def start(self, tokens: list[int], sampling: Sampling, check: bool, score: list[int] = ()) -> float | None: ...

    def prompt_logprobs(self) -> list[float]:
        """log p(tokens[i] | tokens[:i]) for each i of the last `start`'s `score`, in order (natural log, over
        the vocabulary without the ids never sampled: the safety and category rows)."""
        ...

    def sample(self) -> int: ...

    def advance(self, token: int, check: bool, window=None) -> float | None: ...

    def check(self, window=None) -> float: ...

    def hesitation(self) -> tuple[float, float]:
        """(entropy in nats, top-1 minus top-2 probability) of the distribution last sampled from."""
        ...

    def categories(self) -> tuple[tuple[float, ...], float] | None:
        """`category_probs` of the last check's [CLS] row: None when the model has no category head (or the
        row was not finite). Valid right after `start`/`advance`/`check` computed a verdict."""
        ...
