"""Windowed strategic attention in the joint recipe's 4D mask (issue 35): the runtime's windows, trained.

A [CLS] inside an answer attends to what runtime/window.py's `check_ranges` names (and itself), and takes
the position right after its window's last token, exactly as the runtime's windowed check (llama.cpp,
ONNX) computes it; a prompt check sees everything, as before. Labels are unchanged.

Which [CLS] is a prompt check, and the verdict history the windows need, come from the sequence:
* the first [CLS] of a sequence is its prompt check (the end of the prompt, and of its prefill); the
  answer starts there, or where its prefill begins (`meta["answer_at"]`, recorded by joint_data.prepare: a
  prefill is answer text, as at run time; data prepared before that counts a prefill as query);
* a two-turn sequence's last [CLS] is the second request's prompt check (sees everything);
* "flagged query": the prompt check's label is 1 (what the runtime's verdict should have been);
* a flip: an in-answer [CLS] labelled 1 after one labelled 0 (or the cleared prompt) starts a streak at the
  answer length it covers; later [CLS] of the streak use the flip window, as the runtime does with patience > 1.
"""
from __future__ import annotations

import torch

from runtime.window import Window, check_ranges, cls_position


def prompt_checks(seq) -> set[int]:
    """The [CLS] positions of a sequence that are prompt checks (see everything)."""
    if not seq.cls_at:
        return set()
    out = {seq.cls_at[0]}
    if seq.meta.get("kind") == "two_turn":
        out.add(seq.cls_at[-1])
    return out


def cls_windows(seq, window: Window) -> list[tuple[tuple[int, int], ...] | None]:
    """Per [CLS] of `seq` (cls_at order): the ranges it attends to, or None for a prompt check."""
    prompts, labels = prompt_checks(seq), seq.labels()
    out: list = []
    query, flagged, flip_at, streak = 0, False, None, 0
    for p, lab in zip(seq.cls_at, labels):
        if p in prompts:
            out.append(None)
            query = int(seq.meta.get("answer_at", p)) if p == seq.cls_at[0] else p
            flagged, flip_at, streak = bool(lab), None, 0
            continue
        answer = p - query
        out.append(check_ranges(query, answer, window, flagged, flip_at))
        if not lab:
            flip_at, streak = None, 0
        else:
            if streak == 0:
                flip_at = answer
            streak += 1
    return out


def apply_windows(seqs, window: Window, pos: torch.Tensor, mask: torch.Tensor) -> None:
    """Restrict the mask rows (B, 1, S, S) of the windowed [CLS] of a `layout` batch to their windows and
    move them to their positions, in place. Row of the k-th [CLS] (cls_at order) of a sequence: cls_at[k] + k."""
    for b, s in enumerate(seqs):
        for k, (p, ranges) in enumerate(zip(s.cls_at, cls_windows(s, window))):
            if ranges is None:
                continue
            r = p + k
            keys = pos[b, :r]  # the rows before it: real tokens (position = index in tokens) and earlier [CLS]
            seen = torch.zeros_like(keys, dtype=torch.bool)
            for a, e in ranges:
                seen |= (keys >= a) & (keys < e)
            row = mask[b, 0, r]
            row[:r] &= seen  # earlier [CLS] columns are already hidden; a real token keeps its own position
            pos[b, r] = cls_position(ranges)
