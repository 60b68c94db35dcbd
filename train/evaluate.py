"""`python -m train eval ARTIFACT`: the signal per split and slice, beside a TF-IDF baseline.

Reads the per-example p_unsafe that `python -m train cls` measured on the converted GGUF with
llama.cpp (`scores.json` beside the card), rebuilds the same data set (deterministic), fits a
TF-IDF + logistic-regression baseline on the same training split, and prints one table per
split: AUROC, TPR at 1% and 2% FPR, and false/true positive rates at the calibrated threshold,
for both. A signal that does not beat the baseline on held-out families is keyword matching.
Also writes a score histogram and a reliability plot (PNG).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import data
from .cls_recipe import auroc, calibrate


def _text(e: dict) -> str:
    return e["prompt"] + (" " + e["prefill"] if e.get("prefill") else "")


def tfidf_baseline(examples: list[dict]) -> dict[str, float]:
    """p(harmful) from TF-IDF word/bigram features + logistic regression fit on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train = [e for e in examples if e["split"] == "train"]
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True, max_features=100_000)
    x = vec.fit_transform([_text(e) for e in train])
    clf = LogisticRegression(C=4.0, class_weight="balanced", max_iter=2000).fit(x, [e["label"] for e in train])
    rest = [e for e in examples if e["split"] != "train"]
    p = clf.predict_proba(vec.transform([_text(e) for e in rest]))[:, 1]
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


def evaluate(artifact: Path, out: Path, splits=("val", "test")) -> dict:
    card = json.loads((artifact / "card.json").read_text())
    scores = json.loads((artifact / "scores.json").read_text())
    examples = data.build_dataset(seed=card["recipe"]["seed"])
    if data.data_card(examples)["examples_sha256"] != card["data"]["examples_sha256"]:
        raise SystemExit("the data set rebuilt here differs from the one the artifact was trained on")
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
    (out / "eval.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1, default=str))
    return result
