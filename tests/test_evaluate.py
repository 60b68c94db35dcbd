"""The evaluation table and the TF-IDF baseline on a small synthetic data set."""
import numpy as np
import pytest

pytest.importorskip("sklearn")

from safechat.train.evaluate import markdown, plots, slice_rows, tfidf_baseline  # noqa: E402


def _examples():
    ex = []
    for i in range(120):
        label = i % 2
        split = ("train", "train", "train", "val", "test")[i % 5]
        words = "build a weapon to hurt people" if label else "bake bread for my friends"
        ex.append({"id": f"e{i}", "prompt": f"{words} number {i}", "prefill": None, "label": label, "split": split,
                   "augmentation": "none" if i % 3 else "prefill", "family": "plain" if i % 3 else "prefill"})
    return ex


def test_tfidf_baseline_separates_a_lexical_task():
    ex = _examples()
    p = tfidf_baseline(ex)
    assert set(p) == {e["id"] for e in ex if e["split"] != "train"}
    test = [e for e in ex if e["split"] == "test"]
    pos = np.mean([p[e["id"]] for e in test if e["label"]])
    neg = np.mean([p[e["id"]] for e in test if not e["label"]])
    assert pos > 0.5 > neg


def test_slice_rows_and_table(tmp_path):
    ex = [e for e in _examples() if e["split"] == "test"]
    y = np.array([e["label"] for e in ex])
    s_cls = np.where(y == 1, 0.9, 0.1)
    s_base = np.full(len(ex), 0.5)
    rows = slice_rows(ex, s_cls, s_base, 0.5, 0.6)
    assert rows[0][0] == "all" and rows[0][1] == y.sum() and rows[0][2] == (y == 0).sum()
    cls, base = rows[0][3], rows[0][4]
    assert cls["auroc"] == 1.0 and cls["tpr"] == 1.0 and cls["fpr"] == 0.0
    assert base["auroc"] == 0.5 and base["tpr"] == 0.0
    table = markdown(rows)
    assert "augmentation=prefill" in table and "1.000 / 0.500" in table
    files = plots(y, s_cls, 0.5, tmp_path)
    assert all(f.stat().st_size > 1000 for f in files)


def test_stacked_picks_the_informative_score_on_val_and_roc_plot(tmp_path):
    from safechat.train.evaluate import roc_plot, stacked

    ex = [e for e in _examples() if e["split"] != "train"]
    rng = np.random.default_rng(0)
    good = {e["id"]: (0.9 if e["label"] else 0.1) + 0.05 * rng.random() for e in ex}
    noise = {e["id"]: float(rng.random()) for e in ex}
    by_split = lambda d: {s: {e["id"]: d[e["id"]] for e in ex if e["split"] == s} for s in ("val", "test")}  # noqa: E731
    table, w = stacked(ex, by_split(good), noise, 0.02)
    assert w == 0.0 and "0.0 (chosen on val) | 1.000 | 1.000" in table    # the signal separates, TF-IDF is noise
    table, w = stacked(ex, by_split(noise), good, 0.02)
    assert w >= 0.7 and f"{w:.1f} (chosen on val) | 1.000 | 1.000" in table and "| 0.0 | 0.000 |" in table
    # scores of a sample only (a joint artifact's --eval-limit): the unscored examples are left out, not a KeyError
    sample = {s: {k: v for i, (k, v) in enumerate(d.items()) if i % 3 != 2} for s, d in by_split(good).items()}
    table, w = stacked(ex, sample, noise, 0.02)
    assert w == 0.0 and "0.0 (chosen on val) | 1.000 | 1.000" in table
    test = [e for e in ex if e["split"] == "test"]
    path = roc_plot(test, np.array([good[e["id"]] for e in test]), np.array([noise[e["id"]] for e in test]), 0.5,
                    tmp_path)
    assert path.stat().st_size > 1000
