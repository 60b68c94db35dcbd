"""`safechat train eval ARTIFACT`: the signal per split and slice, beside a TF-IDF baseline.

Reads the per-example p_unsafe that `safechat train cls` measured on the converted GGUF with
llama.cpp (`scores.json` beside the card), rebuilds the same data set (deterministic), fits a
TF-IDF + logistic-regression baseline on the same training split, and prints one table per
split: AUROC, TPR at 1% and 2% FPR, and false/true positive rates at the calibrated threshold,
for both. A signal that does not beat the baseline on held-out families is keyword matching.
Also writes a score histogram, a reliability plot and a per-family ROC curve with the issue's targets (PNG).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import data
from .data_card import examples_sha256
from .cls_recipe import auroc, calibrate
from .real_lookalikes import AUGMENTATION as REAL


def _text(e: dict) -> str:
    return e["prompt"] + (" " + e["prefill"] if e.get("prefill") else "")


def fit_tfidf(examples: list[dict]):
    """TF-IDF word/bigram features + logistic regression fit on the train split; returns texts -> p(harmful)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = [e for e in examples if e["split"] == "train"]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=100_000)
    x = vec.fit_transform([_text(e) for e in train])
    clf = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000).fit(x, [e["label"] for e in train])
    return lambda texts: clf.predict_proba(vec.transform(list(texts)))[:, 1]


def tfidf_baseline(examples: list[dict]) -> dict[str, float]:
    """p(harmful) of the baseline for every val/test example (fit on the train split)."""
    rest = [e for e in examples if e["split"] != "train"]
    p = fit_tfidf(examples)(_text(e) for e in rest)
    return {e["id"]: float(v) for e, v in zip(rest, p)}


def _tpr_at(scores, labels, ref_benign, fpr) -> float | None:
    if not (labels == 1).any():
        return None
    thr = calibrate(np.concatenate([ref_benign, [0.0]]), np.array([0] * (len(ref_benign) + 1)), fpr)
    return float((scores[labels == 1] >= thr).mean())


def slice_rows(examples, s_cls, s_base, thr_cls, thr_base):
    """Rows of (slice, n_harmful, n_benign, metrics for cls, metrics for baseline)."""
    labels = np.array([e["label"] for e in examples])
    ben_cls, ben_base = s_cls[labels == 0], s_base[labels == 0]
    slices = [("all", np.ones(len(examples), bool))]
    for key in ("augmentation", "family"):
        for v in sorted({e[key] for e in examples}):
            if key == "family" and v in ("plain", "prefill"):
                continue
            slices.append((f"{key}={v}", np.array([e[key] == v for e in examples])))
    rows = []
    for name, m in slices:
        y = labels[m]
        cells = []
        for s, ben, thr in ((s_cls, ben_cls, thr_cls), (s_base, ben_base, thr_base)):
            a = auroc(s[m], y) if (y == 1).any() and (y == 0).any() else None
            cells.append({"auroc": a, "tpr@1%": _tpr_at(s[m], y, ben, 0.01), "tpr@2%": _tpr_at(s[m], y, ben, 0.02),
                          "tpr": float((s[m][y == 1] >= thr).mean()) if (y == 1).any() else None,
                          "fpr": float((s[m][y == 0] >= thr).mean()) if (y == 0).any() else None})
        rows.append((name, int((y == 1).sum()), int((y == 0).sum()), cells[0], cells[1]))
    return rows


def _fmt(v):
    return "-" if v is None or v != v else f"{v:.3f}"


def markdown(rows) -> str:
    out = ["| slice | harmful | benign | AUROC cls / tfidf | TPR@1%FPR cls / tfidf | TPR@2%FPR cls / tfidf "
           "| TPR at thr cls / tfidf | FPR at thr cls / tfidf |", "|---|---|---|---|---|---|---|---|"]
    for name, npos, nneg, c, b in rows:
        cols = " | ".join(f"{_fmt(c[k])} / {_fmt(b[k])}" for k in ("auroc", "tpr@1%", "tpr@2%", "tpr", "fpr"))
        out.append(f"| {name} | {npos} | {nneg} | {cols} |")
    return "\n".join(out)


def plots(labels, scores, thr, out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0, 1, 41)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label="benign", color="tab:blue")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label="harmful", color="tab:red")
    ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("p_unsafe at the end of the prompt (test split)")
    ax.legend()
    fig.tight_layout()
    hist = out / "score_histogram.png"
    fig.savefig(hist, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 4))
    edges = np.linspace(0, 1, 11)
    idx = np.clip(np.digitize(scores, edges) - 1, 0, 9)
    xs = [scores[idx == i].mean() for i in range(10) if (idx == i).any()]
    ys = [labels[idx == i].mean() for i in range(10) if (idx == i).any()]
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.plot(xs, ys, marker="o")
    ax.set_xlabel("mean p_unsafe in bin")
    ax.set_ylabel("fraction harmful")
    ax.set_title("reliability (test split)")
    fig.tight_layout()
    rel = out / "reliability.png"
    fig.savefig(rel, dpi=120)
    plt.close(fig)
    return [hist, rel]


ROC_SLICES = (("none", "plain requests", 0.97, "tab:red"), ("jailbreak_template", "jailbreak-wrapped", 0.95, "tab:purple"),
              ("prefill", "prefilled", 0.95, "tab:orange"))


def roc_plot(examples, s_cls, s_base, thr, out: Path, target_fpr: float = 0.02) -> Path:
    """How far from the issue's targets: per attack family, the harmful share flagged against the share of
    all benign prompts flagged (the false refusals), for the signal and the TF-IDF baseline; a star marks
    each target (97% of plain, 95% of jailbreak-wrapped and prefilled requests at 2% false refusals), a dot
    the card's threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.array([e["label"] for e in examples])
    aug = np.array([e["augmentation"] for e in examples])
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for key, name, target, color in ROC_SLICES:
        harm = (labels == 1) & (aug == key)
        if not harm.any():
            continue
        for s, style, who in ((s_cls, "-", "signal"), (s_base, ":", "TF-IDF")):
            ts = np.unique(np.concatenate([s[harm], s[labels == 0]]))[::-1]
            fpr = np.array([(s[labels == 0] >= t).mean() for t in ts])
            tpr = np.array([(s[harm] >= t).mean() for t in ts])
            ax.step(np.maximum(fpr, 1e-3), tpr, where="post", ls=style, color=color,
                    label=f"{name} ({who}, n={int(harm.sum())})")
        ax.plot([(s_cls[labels == 0] >= thr).mean()], [(s_cls[harm] >= thr).mean()], "o", color=color)
        ax.plot([target_fpr], [target], "*", ms=14, color=color, mec="k")
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("benign prompts refused (test split, log scale)")
    ax.set_ylabel("harmful prompts refused")
    ax.set_title(f"end-of-prompt verdicts; stars: targets, dots: threshold {thr:.4f}")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "roc.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return np.log(p) - np.log1p(-p)


def stacked(examples, s_cls: dict, s_base: dict, max_fpr: float, weights=np.linspace(0, 1, 11)) -> tuple[str, float]:
    """The signal and the baseline mixed in logit space, (1-w) cls + w tfidf, at a threshold calibrated on val
    (max_fpr of the benign val prompts) for each w; w chosen by val TPR (ties: the smaller w). A measurement, not the product: the
    runtime's verdict is the [CLS] alone. Returns (Markdown table, chosen w)."""
    cols = {}
    for split in ("val", "test"):
        # the scored ones: a joint artifact's scores cover a seeded sample (`train joint --eval-limit`)
        ex = [e for e in examples if e["split"] == split and e["id"] in s_cls[split]]
        cols[split] = (np.array([s_cls[split][e["id"]] for e in ex]), np.array([s_base[e["id"]] for e in ex]),
                       np.array([e["label"] for e in ex]), np.array([e["augmentation"] for e in ex]))
    rows, best = [], (-1.0, 0.0)
    for w in weights:
        mix = {k: 1 / (1 + np.exp(-((1 - w) * _logit(c) + w * _logit(b)))) for k, (c, b, _, _) in cols.items()}
        thr = calibrate(mix["val"], cols["val"][2], max_fpr)
        val_tpr = float((mix["val"][cols["val"][2] == 1] >= thr).mean())
        x, (_, _, y, aug) = mix["test"], cols["test"]
        rate = lambda m, lab: float((x[m & (y == lab)] >= thr).mean()) if (m & (y == lab)).any() else float("nan")  # noqa: E731
        every = np.ones_like(y, bool)
        rows.append((w, val_tpr, rate(every, 1), rate(aug == "none", 1), rate(aug == "jailbreak_template", 1),
                     rate(aug == "prefill", 1), rate(aug == "hardneg_template", 0), rate(aug == REAL, 0),
                     rate(every, 0)))
        if val_tpr > best[0]:  # ties go to the smaller TF-IDF share
            best = (val_tpr, w)
    out = ["| w (TF-IDF share) | val TPR | test TPR | plain | jailbreak | prefill | look-dangerous FPR | "
           "real look-alike FPR | test FPR |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (chosen on val)" if r[0] == best[1] else ""
        out.append(f"| {r[0]:.1f}{mark} | " + " | ".join(f"{v:.3f}" for v in r[1:]) + " |")
    return "\n".join(out), best[1]


def load_scored(artifact: Path) -> tuple[dict, dict, list[dict]]:
    """(card, scores.json, the data set it was trained on), checked against the card's data hash."""
    card = json.loads((artifact / "card.json").read_text())
    scores = json.loads((artifact / "scores.json").read_text())
    examples = data.dataset_for(card)
    if examples_sha256(examples) != card["data"]["examples_sha256"]:
        raise SystemExit("the data set rebuilt here differs from the one the artifact was trained on")
    return card, scores, examples


def evaluate(artifact: Path, out: Path, splits=("val", "test")) -> dict:
    card, scores, examples = load_scored(artifact)
    base = tfidf_baseline(examples)
    val = [e for e in examples if e["split"] == "val"]
    thr_base = calibrate(np.array([base[e["id"]] for e in val]), np.array([e["label"] for e in val]),
                         card["recipe"]["max_fpr"])
    result = {"threshold": card["threshold"], "tfidf_threshold": thr_base, "splits": {}}
    for split in splits:
        ex = [e for e in examples if e["split"] == split]
        s_cls = np.array([scores[split][e["id"]][0] for e in ex])  # end-of-prompt verdict
        s_base = np.array([base[e["id"]] for e in ex])
        rows = slice_rows(ex, s_cls, s_base, card["threshold"], thr_base)
        result["splits"][split] = rows
        print(f"\n{split} split, end-of-prompt verdicts (cls signal / TF-IDF baseline):\n")
        print(markdown(rows))
        if split == "test":
            for p in plots(np.array([e["label"] for e in ex]), s_cls, card["threshold"], out):
                print(f"wrote {p}")
            print(f"wrote {roc_plot(ex, s_cls, s_base, card['threshold'], out)}")
    table, w = stacked(examples, {sp: {i: ps[0] for i, ps in scores[sp].items()} for sp in ("val", "test")}, base,
                       card["recipe"]["max_fpr"])
    print(f"\nthe signal and the baseline mixed in logit space, threshold at {card['recipe']['max_fpr']:.0%} of benign "
          "val prompts for each mix (end of prompt; a measurement, the runtime uses the [CLS] alone):\n")
    print(table)
    result["stacked_weight_chosen_on_val"] = w
    (out / "eval.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    return result
