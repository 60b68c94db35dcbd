"""Conversation-level ROC of a safe model under one check policy: what a user of the runtime sees.

    python -m bench conversations [--model PATH ...] [--every 4] [--tokens 48] [--refusal 0.02 0.05 0.10]

Per-position figures (`train report`) score one [CLS] at a time; the runtime refuses a whole
conversation as soon as *any* check crosses the threshold, so a benign answer checked 12 times
has 12 chances to be refused. This runs every prefill attack and every benign prompt (prefilled
or look-dangerous) of the val and test splits with the policy but without acting (threshold just
below 1), and keeps each conversation's highest p_unsafe over its checks: refusing at threshold t is the
same as that maximum reaching t (greedy generation does not depend on t; one unsafe verdict
acts), so one run gives the whole curve. For each benign-refusal budget the threshold is
calibrated on the *val* conversations and applied to the *test* ones ("model's own" = the
threshold, or the (prompt, answer) pair, in the model file). A second table per model lists the
benign families it refuses at its own threshold(s), and whether at the prompt or inside the
answer. A third asks what a separate threshold for the checks inside the answer would buy: for
each budget, the pair (prompt threshold, answer threshold) that catches the most val attacks
within it (`train.calibrate.pick_pair`, the same choice `train calibrate` writes into a card),
applied to test ("never" = no answer threshold gains a val attack).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from runtime.model import load
from runtime.strategy import SafetyPolicy

from train.calibrate import held_out_prompts, observe, pick_pair, refused, split_max


def _first(trace, thr, answer_thr=None):
    """Tokens covered by the first check that refuses (prompt at thr, answer at answer_thr or thr)."""
    for covered, p in trace:
        if p >= (thr if covered == 0 or answer_thr is None else answer_thr):
            return covered
    return None


def _fmt(t: float) -> str:
    return "never" if t >= 1.0 else f"{t:.4f}"


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
    policy = SafetyPolicy(every=args.every)
    print(f"\nevery {args.every} tokens, up to {args.tokens} greedy tokens; thresholds calibrated on val conversations; "
          f"val {len(groups['val'][0])} attacks / {len(groups['val'][1])} benign, "
          f"test {len(groups['test'][0])} / {len(groups['test'][1])}\n")
    print("| model | benign-refusal budget (val) | threshold | val attacks caught | val benign refused "
          "| test attacks caught | test benign refused | test tokens to catch (median / max) | test AUROC |")
    print("|---|---|---|---|---|---|---|---|---|")
    saved = {}
    for path in args.model or [None]:
        model = load(path, allow_unverified=True)
        traces = {s: (observe(model, a, policy, args.tokens), observe(model, b, policy, args.tokens))
                  for s, (a, b) in groups.items()}
        split = {s: (split_max(a), split_max(b)) for s, (a, b) in traces.items()}  # (prompt, answer) maxima
        vb = split["val"][1].max(1)
        auc = _auroc(*(m.max(1) for m in split["test"]))
        own = (float(model.meta.threshold), model.meta.answer_threshold)  # the file's (calibrated) pair
        own_name = "model's own" if own[1] is None else f"model's own, answer {_fmt(own[1])}"
        rows = [(own_name, *own)] + [(f"{b:.0%}", _threshold(vb, b), None) for b in args.refusal]
        for name, thr, answer in rows:
            count = lambda m: refused(m, thr, thr if answer is None else answer)  # noqa: E731
            later = [c for t in traces["test"][0] if (c := _first(t, thr, answer)) is not None and c > 0]
            lat = f"{statistics.median(later):.0f} / {max(later)}" if later else "-"
            print(f"| {model.path.name[:40]} | {name} | {thr:.4f} | " + " | ".join(
                f"{count(m)}/{len(m)}" for m in (*split["val"], *split["test"])) + f" | {lat} | {auc:.3f} |",
                flush=True)
        print("\n" + _families(model.path.name, groups, traces, *own) + "\n", flush=True)
        print(_two_thresholds(model.path.name, split, args.refusal) + "\n", flush=True)
        saved[str(model.path)] = traces
        model.close()
    if args.save:
        args.save.write_text(json.dumps(saved))
    return 0


def _two_thresholds(name: str, split, budgets) -> str:
    """The best pair per val budget, applied to test; `split`: {split: (attack rows, benign rows)}."""
    (va, vb), (ta, tb) = split["val"], split["test"]
    rows = [f"{name}: a separate threshold inside the answer (pair chosen on val per budget; 2.0 = never)", "",
            "| budget (val) | prompt threshold | answer threshold | val attacks caught | val benign refused "
            "| test attacks caught | test benign refused |", "|---|---|---|---|---|---|---|"]
    for b in budgets:
        tp, tt = pick_pair(va, vb, b)
        rows.append(f"| {b:.0%} | {tp:.4f} | {_fmt(tt)} | " + " | ".join(
            f"{refused(m, tp, tt)}/{len(m)}" for m in (va, vb, ta, tb)) + " |")
    return "\n".join(rows)


def _family(e: dict) -> str:
    return e["source"].split("/")[-1] if e["augmentation"] == "hardneg_template" else "prefilled " + e["source"]


def _families(name: str, groups, traces, thr: float, answer_thr: float | None = None) -> str:
    """Benign conversations refused at the model's own threshold(s), per family and where the check fired."""
    own = f"{thr:.4f}" + ("" if answer_thr is None else f" (answer {_fmt(answer_thr)})")
    rows = [f"{name}: benign refused at its own threshold {own}, by family (at the prompt + inside the answer)",
            "", "| split | family | refused | at the prompt | inside the answer |", "|---|---|---|---|---|"]
    for split, (_, benign) in groups.items():
        fam: dict[str, list[int]] = {}
        for e, t in zip(benign, traces[split][1]):
            c = fam.setdefault(_family(e), [0, 0, 0])
            c[0] += 1
            first = _first(t, thr, answer_thr)
            if first is not None:
                c[1 if first == 0 else 2] += 1
        for f, (n, at, inside) in sorted(fam.items()):
            if at + inside:
                rows.append(f"| {split} | {f} | {at + inside}/{n} | {at} | {inside} |")
    return "\n".join(rows)
