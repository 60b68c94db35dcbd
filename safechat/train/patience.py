"""Agreement across checks: threshold pairs chosen together with `patience` (consecutive unsafe verdicts).

The runtime acts after `policy.patience` consecutive unsafe verdicts (the prompt's at the prompt threshold,
each answer check's at the answer threshold), and never shows text whose last verdict was unsafe: a
stream that ends while its streak is below patience is refused too (`runtime/strategy.py`). The paper acts
after tau consecutive flags; Qwen3Guard-Stream after two. With patience 1 (the default) a pair reduces to
two maxima per conversation (`calibrate.split_max`, `pick_pair`); with more it does not, so this module
computes, for a prompt threshold tp, each conversation's *critical answer threshold* T*: the conversation
is refused at (tp, ta) exactly when ta <= T* (lowering ta only adds unsafe answer verdicts). Then `pick`: the
pair that catches the most attacks with every benign group within its budget (`calibrate.pick_pair` is `pick`
at patience 1, over `from_maxima`).

A trace is [(tokens covered, p_unsafe)]: one check at 0 (the prompt, with any prefill), then the answer's.
Greedy generation does not depend on the checks, so saved traces give every (tp, ta, patience) exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEVER = 2.0
NONE = -1.0  # no answer verdict can refuse


def simulate(trace, tp: float, ta: float, patience: int) -> bool:
    """The runtime's decision on one trace, check by check (the reference `critical` is tested against)."""
    streak = 0
    for covered, p in trace:
        if p >= (tp if covered == 0 else ta):
            streak += 1
            if streak >= patience:
                return True
        else:
            streak = 0
    return streak > 0  # the last verdict was unsafe: what it covered is never shown


@dataclass
class Critical:
    """Per conversation: the prompt verdict, and the answer-threshold bounds that do not depend on tp."""
    prompt: np.ndarray      # p_unsafe at the prompt
    first: np.ndarray       # min of the first patience-1 answer verdicts (the window that starts at the prompt)
    inside: np.ndarray      # max over windows of `patience` answer verdicts of their min
    last: np.ndarray        # the last answer verdict (the end rule), NONE without answer checks
    patience: int

    def at(self, tp: float) -> np.ndarray:
        """T* for prompt threshold tp: refused at (tp, ta) iff ta <= T*."""
        flagged = self.prompt >= tp
        no_answer = self.last == NONE
        t = np.maximum(self.inside, self.last)
        t = np.where(flagged, np.maximum(t, self.first), t)
        return np.where(no_answer & flagged, NEVER + 1, t)  # only the prompt, and unsafe: refused at any ta


def critical(traces, patience: int) -> Critical:
    if patience < 1:
        raise ValueError("patience must be >= 1")
    n = len(traces)
    prompt, first, inside, last = (np.full(n, NONE) for _ in range(4))
    for i, t in enumerate(traces):
        ps = [p for c, p in t if c == 0]
        ans = np.array([p for c, p in t if c > 0], dtype=float)
        prompt[i] = max(ps, default=0.0)
        if len(ans):
            last[i] = ans[-1]
            k = patience - 1
            first[i] = NEVER + 1 if k == 0 else (ans[:k].min() if len(ans) >= k else NONE)
            if len(ans) >= patience:
                windows = np.lib.stride_tricks.sliding_window_view(ans, patience)
                inside[i] = windows.min(axis=1).max()
    return Critical(prompt, first, inside, last, patience)


def from_maxima(rows) -> Critical:
    """Patience 1 from (prompt verdict, highest answer verdict) rows (`calibrate.split_max`): a conversation is
    refused at (tp, ta) iff its prompt verdict reaches tp or its highest answer verdict reaches ta."""
    rows = np.asarray(rows, dtype=float).reshape(-1, 2)
    return Critical(rows[:, 0], np.full(len(rows), NEVER + 1), rows[:, 1], rows[:, 1], 1)


def refused(crit: Critical, tp: float, ta: float) -> int:
    return int((crit.at(tp) >= ta).sum())


def pick(attacks: Critical, limits: list[tuple[Critical, float]]) -> tuple[float, float] | None:
    """(tp, ta) catching the most attacks with each benign group refused at most floor(budget * n) times;
    ties: fewer benign refused, then the higher answer threshold, then the higher prompt threshold.
    None when no pair keeps every budget."""
    above = lambda v: float(np.nextafter(v, 3.0))  # noqa: E731
    prompts = sorted({above(v) for c, _ in limits for v in c.prompt if above(v) < 1.0} | {0.0})
    answers = np.array(sorted({above(v) for c, _ in limits for v in np.r_[c.first, c.inside, c.last]
                               if 0.0 <= v < 1.0} | {0.0, NEVER}))
    best = None
    for tp in prompts:
        counts = []
        for c, _ in limits:
            t = np.sort(c.at(tp))
            counts.append(len(t) - np.searchsorted(t, answers, side="left"))
        ok = np.logical_and.reduce([n <= int(np.floor(b * len(c.prompt))) for n, (c, b) in zip(counts, limits)])
        if not ok.any():
            continue
        t = np.sort(attacks.at(tp))
        caught = len(t) - np.searchsorted(t, answers, side="left")
        total = sum(counts)
        idx = np.flatnonzero(ok)
        i = idx[np.lexsort((answers[idx], -total[idx], caught[idx]))[-1]]
        key = (int(caught[i]), -int(total[i]), float(answers[i]), tp)
        if best is None or key > best[0]:
            best = (key, (tp, float(answers[i])))
    return None if best is None else best[1]


def best_policy(traces: dict, budgets: dict, patiences=(1, 2, 3)) -> list[dict]:
    """For each patience, the best pair on `traces` (group -> list of traces; "attacks" and the benign groups
    named in `budgets`, group -> budget) and what it does to each group."""
    out = []
    for k in patiences:
        crit = {g: critical(t, k) for g, t in traces.items()}
        pair = pick(crit["attacks"], [(crit[g], b) for g, b in budgets.items() if len(traces.get(g, ()))])
        if pair is None:
            continue
        out.append({"patience": k, "threshold": pair[0], "answer_threshold": pair[1],
                    **{g: (refused(c, *pair), len(traces[g])) for g, c in crit.items()}})
    return out
