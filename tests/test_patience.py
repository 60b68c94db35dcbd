"""safechat/train/patience.py: threshold pairs with patience (consecutive unsafe verdicts), exact against a brute-force
search over the runtime's rule and against the runtime itself."""
import random

import numpy as np
import pytest

from safechat.train.calibrate import pick_pair, split_max
from safechat.train.patience import best_policy, critical, pick, refused, simulate


def _traces(rng, n, hi=1.0):
    out = []
    for _ in range(n):
        k = rng.randint(0, 6)
        out.append([(0, rng.uniform(0, hi))] + [(4 * (i + 1), rng.uniform(0, hi)) for i in range(k)])
    return out


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_the_critical_threshold_matches_the_runtime_rule(patience):
    rng = random.Random(patience)
    traces = _traces(rng, 300)
    crit = critical(traces, patience)
    for tp in (0.0, 0.3, 0.5, 0.9, 1.01):
        t = crit.at(tp)
        for ta in (0.0, 0.2, 0.5, 0.7, 0.95, 2.0):
            assert [bool(x >= ta) for x in t] == [simulate(tr, tp, ta, patience) for tr in traces]


def test_patience_one_picks_what_pick_pair_picks():
    rng = random.Random(0)
    att, plain, look = _traces(rng, 200, 1.0), _traces(rng, 150, 0.8), _traces(rng, 150, 0.9)
    rows = [split_max(t) for t in (att, plain, look)]
    want = pick_pair(rows[0], [(rows[1], 0.02), (rows[2], 0.05)])
    got = pick(critical(att, 1), [(critical(plain, 1), 0.02), (critical(look, 1), 0.05)])
    assert got == pytest.approx(want)


@pytest.mark.parametrize("patience", [2, 3])
def test_pick_is_the_best_pair_of_a_brute_force_search(patience):
    rng = random.Random(10 + patience)
    att, ben = _traces(rng, 60, 1.0), _traces(rng, 60, 0.7)
    ca, cb = critical(att, patience), critical(ben, patience)
    tp, ta = pick(ca, [(cb, 0.05)])
    assert refused(cb, tp, ta) <= 3
    grid = sorted({float(np.nextafter(p, 3.0)) for tr in att + ben for _, p in tr} | {0.0, 2.0})
    best = max(sum(simulate(t, x, y, patience) for t in att) for x in grid for y in grid
               if sum(simulate(t, x, y, patience) for t in ben) <= 3)
    assert refused(ca, tp, ta) == best


def test_best_policy_reports_each_patience():
    rng = random.Random(3)
    traces = {"attacks": _traces(rng, 100), "plain": _traces(rng, 100, 0.6), "real": _traces(rng, 100, 0.9)}
    rows = best_policy(traces, {"plain": 0.02, "real": 0.03})
    assert [r["patience"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["plain"][0] <= 2 and r["real"][0] <= 3 and r["attacks"][1] == 100


@pytest.mark.timeout(120)
def test_simulate_is_what_the_runtime_does(tiny_safe):
    """The rule on an observed trace decides as the runtime does with that patience and pair (greedy)."""
    from runtime.model import load
    from runtime.strategy import SafetyPolicy
    from safechat.train.calibrate import observe
    prompts = ["the sun and the rain", "a road by the hill", "the lamp in the book", "open the door", "tree"]
    examples = [{"prompt": p} for p in prompts]
    with load(tiny_safe, threads=1, allow_unverified=True) as m:
        traces = observe(m, examples, SafetyPolicy(every=2), 10)
        ps = sorted(p for t in traces for _, p in t)
        decisions = 0
        for patience in (1, 2, 3):
            for tp in (ps[len(ps) // 4], ps[len(ps) // 2], float(np.nextafter(1.0, 0.0))):
                for ta in (ps[len(ps) // 3], ps[(2 * len(ps)) // 3]):
                    pol = SafetyPolicy(every=2, threshold=tp, answer_threshold=ta, patience=patience)
                    for e, t in zip(examples, traces):
                        r = m.chat([{"role": "user", "content": e["prompt"]}], max_tokens=10, temperature=0,
                                   safety=pol)
                        assert r.refused == simulate(t, tp, ta, patience), (patience, tp, ta, t)
                        decisions += r.refused
    assert decisions > 0
