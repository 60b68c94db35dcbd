"""What the category head names, and what each per-app rule buys and costs, on the real model file.

    safechat bench categories [--model PATH] [--splits val test] [--limit N] [--save scores.json]

Every val and test example (plain, jailbreak-wrapped, prefilled, suffixed, look-dangerous) goes
through the runtime's own prompt check on the model file (llama.cpp): p_unsafe and the category
scores of the [CLS] at the end of the prompt, the check the default file acts on. Labels are
`safechat.train.categories` (the sources' own labels, then keyword rules). Tables:

1. per category: rows, precision and recall of the top category, recall at the file's threshold
   and the share of other rows reaching it;
2. `allow={X}`, per X: of the harmful requests the file refuses, how many of category X it now
   answers (the purpose) and how many of other categories (the cost); of the benign requests of
   topic X it refuses, how many it now answers (a benign request's topic: its source's label, or the harm
   topic its look-dangerous template sits next to, `safechat.train.hardneg.TOPICS`: pentest careers for cyber);
3. `block={X}`: benign requests of topic X refused before and after, and benign requests of other
   topics refused before and after (the collateral);
4. `controversial="loose"`: controversial and other harmful requests answered.

The decisions are `runtime.policy.apply_rules`, the function the token loop calls.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.backends.base import Sampling
from runtime.model import load
from runtime.policy import SafetyPolicy, apply_rules

from safechat.train.calibrate import messages
from safechat.train.categories import benign_topic, label_examples
from safechat.train.category_head import category_metrics
from runtime.artifact import load_artifact
from runtime.default_model import ASSET


def observe(model, examples: list[dict]) -> list[tuple[float, tuple | None]]:
    """(p_unsafe, category scores) of the prompt check of each example, in input order."""
    toks = [model.tokenize_messages(messages(e)) for e in examples]
    out: list = [None] * len(examples)
    for i in tqdm(sorted(range(len(examples)), key=lambda i: toks[i]), desc="prompt checks", mininterval=10):
        p = model.backend.start(toks[i], Sampling(), check=True)
        out[i] = (float(p), model.backend.categories())
    return out


def _table(header: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _frac(k: int, n: int) -> str:
    return f"{k}/{n}" if n else "-"


def _topic(r: dict) -> str | None:
    """A benign row's harm topic (`safechat.train.categories.benign_topic`); a row without one is taken by its category,
    which is what benign_topic gives every row whose source names one."""
    return r["topic"] if "topic" in r else r["cat"]


def tables(rows: list[dict], cats, thr: float) -> str:
    names = [n for n in cats.names if n != cats.none]
    out = []
    head = [r for r in rows if r["cat"] is not None and r["scores"] is not None]
    q = np.array([r["scores"][0] for r in head])
    y = np.array([list(cats.names).index(r["cat"]) for r in head])
    m = category_metrics(q, y, np.array(cats.thresholds), cats.names)
    out.append(f"Top-category accuracy {m['accuracy']} on {len(head)} labelled rows.\n")
    out.append(_table(["category", "rows", "precision", "recall", "recall at threshold", "others at threshold"],
                      [[n, r["n"], r["precision"], r["recall"], r["recall_at_threshold"], r["others_at_threshold"]]
                       for n, r in m["per_category"].items()]))
    flagged = lambda r: r["p"] >= thr
    harmful = [r for r in rows if r["label"] == 1 and r["scores"] is not None]
    benign = [r for r in rows if r["label"] == 0 and r["scores"] is not None]
    allow_rows, block_rows = [], []
    for x in names:
        pol_a, pol_b = SafetyPolicy(allow={x}), SafetyPolicy(block={x})
        still = lambda r, pol: apply_rules(flagged(r), r["scores"], cats, pol)[0]
        h_x = [r for r in harmful if flagged(r) and r["cat"] == x]
        h_o = [r for r in harmful if flagged(r) and r["cat"] != x]
        b_x = [r for r in benign if flagged(r) and _topic(r) == x]
        allow_rows.append([x, _frac(sum(not still(r, pol_a) for r in h_x), len(h_x)),
                           _frac(sum(not still(r, pol_a) for r in h_o), len(h_o)),
                           _frac(sum(not still(r, pol_a) for r in b_x), len(b_x))])
        bx = [r for r in benign if _topic(r) == x]
        bo = [r for r in benign if _topic(r) != x]
        block_rows.append([x, f"{sum(flagged(r) for r in bx)} -> {sum(still(r, pol_b) for r in bx)} of {len(bx)}",
                           f"{sum(flagged(r) for r in bo)} -> {sum(still(r, pol_b) for r in bo)} of {len(bo)}"])
    out.append("\n`allow={X}`: answered now, of the requests the file refuses at the prompt\n")
    out.append(_table(["X", "harmful of category X", "harmful of other categories", "benign of topic X"],
                      allow_rows))
    out.append("\n`block={X}`: benign requests refused, before -> after\n")
    out.append(_table(["X", "benign of topic X", "benign of other topics"], block_rows))
    loose = SafetyPolicy(controversial="loose")
    ans = lambda rs: sum(not apply_rules(True, r["scores"], cats, loose)[0] for r in rs)
    hc = [r for r in harmful if flagged(r) and r["tier"] == 1]
    ho = [r for r in harmful if flagged(r) and r["tier"] != 1]
    out.append(f"\n`controversial=\"loose\"`: answered now {_frac(ans(hc), len(hc))} of the refused controversial "
               f"requests, {_frac(ans(ho), len(ho))} of the other refused harmful ones.")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="safechat bench categories")
    ap.add_argument("--model", help="safe GGUF with a category head (default: the embedded default)")
    ap.add_argument("--artifact", type=Path, default=None,
                    help="the artifact whose card names the data set (default: the packaged default's)")
    ap.add_argument("--splits", nargs="+", default=["val", "test"])
    ap.add_argument("--limit", type=int, default=0, help="at most this many examples per split (smoke runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", type=Path, default=None, help="write every example's scores here (JSON)")
    args = ap.parse_args(argv)

    from safechat.train.data import dataset_for

    art = load_artifact(args.artifact or ASSET)
    examples = dataset_for(art.card)
    labels = label_examples(examples)
    model = load(args.model, threads=args.threads, n_ctx=8192)  # the longest jailbreak-wrapped prompts
    if model.categories is None:
        print(f"{model.path.name} has no category head")
        return 2
    thr = model.meta.threshold
    print(f"{model.path.name}: prompt threshold {thr:.4f}; categories {', '.join(model.categories.names)}\n")
    saved = {}
    for split in args.splits:
        held = [e for e in examples if e["split"] == split]
        held = held[:args.limit] if args.limit else held
        obs = observe(model, held)
        rows = [{"label": e["label"], "cat": labels[e["id"]][0], "tier": labels[e["id"]][1], "p": p, "scores": sc,
                 "topic": benign_topic(e, labels[e["id"]][0]) if e["label"] == 0 else None}
                for e, (p, sc) in zip(held, obs)]
        saved[split] = [{"id": e["id"], **r} for e, r in zip(held, rows)]
        print(f"## {split} ({len(held)} examples; {sum(r['p'] >= thr for r in rows)} refused at the prompt)\n")
        print(tables(rows, model.categories, thr), flush=True)
        print()
    if args.save:
        args.save.write_text(json.dumps(saved))
    model.close()
    return 0
