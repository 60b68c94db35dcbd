"""Windowed strategic attention inside the answer (issue 35; Li & Kim, ICML 2025): what a check attends to.

The one specification every path reads (the Python token loop over llama.cpp and ONNX, and the torch
training mask, safechat/train/joint_window.py). Pure: positions in, positions out; no backend, no torch.

A check inside the answer judges what is being written, not the whole conversation. With a window
(r1, r2, r3) (the paper's public scripts use 5, 15, 10) and q tokens of query before the answer (the prompt
up to where the answer text begins: an assistant prefill is answer text), n answer tokens so far:

* after a cleared query (the usual case), the last r2 answer tokens (fewer if fewer exist);
* after a flagged query (the policy let the answer go on: patience > 1, or an `allow` rule), the query and the
  first r1 answer tokens;
* after the verdict flipped to unsafe at the check that covered S answer tokens, without acting yet
  (patience > 1), answer tokens S-r2 .. S+r3-1 (the r2 tokens the flipping check saw and the r3 after them;
  fewer if fewer exist). Back to the last r2 once a check clears the conversation again.

The [CLS] (and the side tokens before it) take the positions right after the window's last token: after a
cleared query that is the current position; after a flagged query or a flip, the window stops growing and
the check sits where it would have sat when the window's last token was new. llama.cpp requires a
sequence's positions to be consecutive (a cell copied into the check's sequence at p, the next decoded at
p + 1), so this is the layout every path uses. The prompt check (no answer token yet) is not windowed.
"""
from __future__ import annotations

from dataclasses import dataclass

Window = tuple[int, int, int]
PAPER = (5, 15, 10)  # the paper's public scripts


def check_ranges(query: int, answer: int, window: Window, prompt_flagged: bool = False,
                 flip_at: int | None = None) -> tuple[tuple[int, int], ...]:
    """The half-open position ranges [p0, p1) a check inside the answer attends to (besides its own side
    tokens and [CLS], which follow the last range at once).

    `query`: positions before the answer text; `answer`: answer tokens so far (>= 1: the prompt check is not
    windowed); `prompt_flagged`: the prompt check's verdict reached its threshold; `flip_at`: the answer
    tokens the check covered whose unsafe verdict began the current streak inside the answer (None: none)."""
    r1, r2, r3 = window
    if query < 0 or answer < 1:
        raise ValueError(f"a windowed check needs answer tokens (query {query}, answer {answer})")
    if prompt_flagged:
        return ((0, query + min(r1, answer)),)
    if flip_at is not None:
        if not 1 <= flip_at <= answer:
            raise ValueError(f"a flip at answer token {flip_at} is outside 1..{answer}")
        return ((query + max(0, flip_at - r2), query + min(answer, flip_at + r3)),)
    return ((query + max(0, answer - r2), query + answer),)


def cls_position(ranges) -> int:
    """Where the check's first token (side tokens, then the [CLS]) goes: right after the window's last token."""
    return ranges[-1][1]


def positions(ranges) -> list[int]:
    return [p for a, b in ranges for p in range(a, b)]


@dataclass
class WindowTrack:
    """The verdict history a windowed check needs, kept by the token loop of one generation.

    `query`: where the answer text begins in the prompt tokens; `n_prompt`: the prompt's length (a prefill
    makes the answer start before the generated tokens)."""

    window: Window
    query: int
    n_prompt: int
    prompt_flagged: bool = False
    flip_at: int | None = None  # in answer tokens

    def ranges(self, covered: int) -> tuple[tuple[int, int], ...]:
        """The ranges of a check after `covered` generated tokens (>= 1)."""
        return check_ranges(self.query, self.n_prompt - self.query + covered, self.window, self.prompt_flagged,
                            self.flip_at)

    def record(self, covered: int, flagged_prompt: bool | None = None, unsafe: bool = False,
               streak: int = 0) -> None:
        """After a check: the prompt's (covered 0: `flagged_prompt`, its raw verdict) or one inside the answer
        (`unsafe` after the rules; `streak` the unsafe verdicts before this one)."""
        if covered == 0:
            self.prompt_flagged = bool(flagged_prompt)
        elif not unsafe:
            self.flip_at = None
        elif streak == 0:
            self.flip_at = self.n_prompt - self.query + covered
