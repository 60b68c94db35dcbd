"""What a chat returns: plain dataclasses, JSON-serialisable with `to_dict()`."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class Safety:
    """The safety trace of one reply.

    `trace` holds one `(tokens_covered, p_unsafe)` pair per check: the verdict on the
    prompt plus the first `tokens_covered` generated tokens. `intervened_at` is the number
    of generated tokens covered by the verdict that triggered the intervention (0 = the
    prompt itself), or None.
    """

    enabled: bool
    threshold: float | None = None
    answer_threshold: float | None = None  # for the checks after the prompt (inf: none there)
    every: int | None = None  # the cadence inside the answer: a check every k tokens (0: adaptive triggers only)
    checks: int = 0
    trace: list[tuple[int, float]] = field(default_factory=list)
    triggers: list[str] = field(default_factory=list)  # why each check ran: prompt/every/entropy/.../end
    intervened_at: int | None = None
    reason: str | None = None
    # with a category head: the category of the prompt check, or of the check that intervened (its top
    # harm category when it flagged the conversation, else its top row, "none" for no harm topic), every
    # category's probability there, the controversial tier's, and the checks a rule let through
    category: str | None = None
    category_scores: dict[str, float] | None = None
    controversial: float | None = None
    allowed: list[tuple[int, str]] = field(default_factory=list)  # (tokens covered, allowed category)
    category_trace: list[str | None] = field(default_factory=list)  # per check: its top harm category
    # the prompt surprisal rule (runtime/surprisal.py), when on: its evidence on this prompt's user text
    # (nats; None when not computed), its threshold and window
    surprisal: float | None = None
    surprisal_threshold: float | None = None
    surprisal_window: int | None = None
    window: tuple[int, int, int] | None = None  # the checks inside the answer attended to a window (runtime/window.py)

    @property
    def max_p_unsafe(self) -> float | None:
        vals = [p for _, p in self.trace if p == p]  # skip NaN
        return max(vals) if vals else None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    loop_seconds: float = 0.0            # the token loop: from after the prompt's prefill to the last token
    native_seconds: float | None = None  # of which inside the native decode loop (GIL released), if it ran

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Reply:
    text: str
    refused: bool
    safety: Safety
    usage: Usage
    finish_reason: str  # "stop" | "length" | "safety"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["safety"]["max_p_unsafe"] = self.safety.max_p_unsafe
        if self.safety.answer_threshold is not None and math.isinf(self.safety.answer_threshold):
            d["safety"]["answer_threshold"] = "inf"  # strict JSON has no Infinity: no checks inside the answer
        if self.safety.surprisal is not None and math.isinf(self.safety.surprisal):
            d["safety"]["surprisal"] = "inf"  # a user-text token the model ruled out
        d["usage"]["tokens_per_second"] = round(self.usage.tokens_per_second, 2)
        return d
