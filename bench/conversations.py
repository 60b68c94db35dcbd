"""Conversation-level ROC of a safe model under one check policy: what a user of the runtime sees.

    python -m bench conversations [--model PATH ...] [--every 4] [--tokens 48] [--refusal 0.02 0.05 0.10]

Per-position figures (`train report`) score one [CLS] at a time; the runtime refuses a whole
conversation as soon as *any* check crosses the threshold, so a benign answer checked 12 times
has 12 chances to be refused. This runs every prefill attack and every benign prompt (prefilled
or look-dangerous) of the val and test splits with the policy but without acting (threshold just
below 1), and keeps each conversation's highest p_unsafe over its checks: refusing at threshold t is the
same as that maximum reaching t (greedy generation does not depend on t; one unsafe verdict
acts), so one run gives the whole curve. For each benign-refusal budget the threshold is
calibrated on the *val* conversations and applied to the *test* ones. A second table per model
lists the benign families it refuses at its own threshold, and whether at the prompt or inside
the answer. A third asks what a separate threshold for the checks inside the answer would buy:
for each budget, the pair (prompt threshold, answer threshold) that catches the most val attacks
within it, applied to test ("prompt only" = no answer threshold reaches any val attack).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from runtime.model import load
from runtime.strategy import SafetyPolicy

from .policies import _messages, held_out_prompts


def _runs(model, examples, policy, tokens):
    """The safety trace, [(tokens covered, p_unsafe)] per check, of each conversation."""
    out = []
    for e in examples:
        r = model.chat(_messages(e), max_tokens=tokens, safety=policy)
        out.append(r.safety.trace)
    return out


def _first(trace, thr):
    for covered, p in trace:
        if p >= thr:
            return covered
    return None


def _threshold(benign_max: np.ndarray, budget: float) -> float:
    """The lowest threshold that refuses at most `budget` of these benign conversations."""
    s = np.sort(benign_max)
    k = int(np.floor(budget * len(s)))
    return float(np.nextafter(s[len(s) - k - 1], 1.0)) if k < len(s) else 0.0


def _auroc(pos, neg):
    from train.cls_recipe import auroc
    return auroc(np.concatenate([pos, neg]), np.array([1] * len(pos) + [0] * len(neg)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench conversations")
    ap.add_argument("--model", action="append", default=None, help="safe GGUF (repeatable; default: the default)")
    ap.add_argument("--every", type=int, default=4, help="check every k generated tokens (the default policy: 4)")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--refusal", type=float, nargs="+", default=[0.02, 0.05, 0.10],
                    help="benign-refusal budgets to calibrate on val")
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per group and split")
    ap.add_argument("--save", type=Path, default=None, help="write every conversation's check trace to this JSON")
    args = ap.parse_args(argv)
    from train.data import build_dataset

    data = build_dataset(seed=0)
    groups = {split: held_out_prompts(data, split, args.limit) for split in ("val", "test")}
    policy = SafetyPolicy(every=args.every, threshold=float(np.nextafter(1.0, 0.0)))  # observe, never act
    print(f"\nevery {args.every} tokens, up to {args.tokens} greedy tokens; thresholds calibrated on val conversations; "
          f"val {len(groups['val'][0])} attacks / {len(groups['val'][1])} benign, "
          f"test {len(groups['test'][0])} / {len(groups['test'][1])}\n")
    print("| model | benign-refusal budget (val) | threshold | val attacks caught | val benign refused "
          "| test attacks caught | test benign refused | test tokens to catch (median / max) | test AUROC |")
    print("|---|---|---|---|---|---|---|---|---|")
    saved = {}
    for path in args.model or [None]:
        model = load(path, allow_unverified=True)
        traces = {s: (_runs(model, a, policy, args.tokens), _runs(model, b, policy, args.tokens))
                  for s, (a, b) in groups.items()}
        split = {s: (_split_max(a), _split_max(b)) for s, (a, b) in traces.items()}  # (prompt, answer) maxima
        (va, vb), (ta, tb) = ((a.max(1), b.max(1)) for a, b in (split["val"], split["test"]))
        auc = _auroc(ta, tb)
        rows = [("model's own", float(model.meta.threshold))] + [(f"{b:.0%}", _threshold(vb, b)) for b in args.refusal]
        for name, thr in rows:
            later = [c for t in traces["test"][0] if (c := _first(t, thr)) is not None and c > 0]
            lat = f"{statistics.median(later):.0f} / {max(later)}" if later else "-"
            print(f"| {model.path.name[:40]} | {name} | {thr:.4f} | {(va >= thr).sum()}/{len(va)} | "
                  f"{(vb >= thr).sum()}/{len(vb)} | {(ta >= thr).sum()}/{len(ta)} | {(tb >= thr).sum()}/{len(tb)} | "
                  f"{lat} | {auc:.3f} |", flush=True)
        print("\n" + _families(model.path.name, groups, traces, float(model.meta.threshold)) + "\n", flush=True)
        print(_two_thresholds(model.path.name, split, args.refusal) + "\n", flush=True)
        saved[str(model.path)] = traces
        model.close()
    if args.save:
        args.save.write_text(json.dumps(saved))
    return 0


def _split_max(traces) -> np.ndarray:
    """(n, 2): each conversation's verdict at the prompt and its highest verdict inside the answer (0: none)."""
    return np.array([[max((p for c, p in t if c == 0), default=0.0), max((p for c, p in t if c > 0), default=0.0)]
                     for t in traces], dtype=float).reshape(-1, 2)


def _refused(rows: np.ndarray, tp: float, ta: float) -> int:
    """How many conversations (rows: prompt verdict, highest answer verdict) a threshold pair refuses."""
    return int(((rows[:, 0] >= tp) | (rows[:, 1] >= ta)).sum())


def pick_pair(attacks: np.ndarray, benign: np.ndarray, budget: float) -> tuple[float, float]:
    """(prompt threshold, answer threshold) catching the most attacks with at most `budget` of benign refused.

    Rows are (prompt verdict, highest answer verdict) per conversation; ties go to fewer benign
    refused, then to the higher answer threshold.
    """
    allowed = int(np.floor(budget * len(benign)))
    cand = lambda col: sorted({float(np.nextafter(v, 2.0)) for v in benign[:, col]} | {0.0, 2.0})
    best = None
    for tp in cand(0):
        for ta in cand(1):
            refused = _refused(benign, tp, ta)
            if refused > allowed:
                continue
            key = (_refused(attacks, tp, ta), -refused, ta, tp)
            if best is None or key > best[0]:
                best = (key, (tp, ta))
    return best[1]


def _two_thresholds(name: str, split, budgets) -> str:
    """The best pair per val budget, applied to test; `split`: {split: (attack rows, benign rows)}."""
    (va, vb), (ta, tb) = split["val"], split["test"]
    rows = [f"{name}: a separate threshold inside the answer (pair chosen on val per budget; 2.0 = never)", "",
            "| budget (val) | prompt threshold | answer threshold | val attacks caught | val benign refused "
            "| test attacks caught | test benign refused |", "|---|---|---|---|---|---|---|"]
    for b in budgets:
        tp, tt = pick_pair(va, vb, b)
        rows.append(f"| {b:.0%} | {tp:.4f} | {tt:.4f} | " + " | ".join(
            f"{_refused(m, tp, tt)}/{len(m)}" for m in (va, vb, ta, tb)) + " |")
    return "\n".join(rows)


def _family(e: dict) -> str:
    return e["source"].split("/")[-1] if e["augmentation"] == "hardneg_template" else "prefilled " + e["source"]


def _families(name: str, groups, traces, thr: float) -> str:
    """Benign conversations refused at the model's own threshold, per family and where the check fired."""
    rows = [f"{name}: benign refused at its own threshold {thr:.4f}, by family (at the prompt + inside the answer)",
            "", "| split | family | refused | at the prompt | inside the answer |", "|---|---|---|---|---|"]
    for split, (_, benign) in groups.items():
        fam: dict[str, list[int]] = {}
        for e, t in zip(benign, traces[split][1]):
            c = fam.setdefault(_family(e), [0, 0, 0])
            c[0] += 1
            first = _first(t, thr)
            if first is not None:
                c[1 if first == 0 else 2] += 1
        for f, (n, at, inside) in sorted(fam.items()):
            if at + inside:
                rows.append(f"| {split} | {f} | {at + inside}/{n} | {at} | {inside} |")
    return "\n".join(rows)
