"""`train calibrate`: the (prompt, answer) threshold pair from val conversations, written into the card."""
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from safechat.train.calibrate import NEVER, calibrate_artifact, pick_pair, refused


def test_pick_pair_keeps_every_group_within_its_budget():
    # rows: (verdict at the prompt, highest verdict inside the answer)
    benign = np.array([[0.1, 0.2], [0.2, 0.95], [0.3, 0.4], [0.5, 0.3], [0.6, 0.1],
                       [0.2, 0.3], [0.1, 0.1], [0.4, 0.2], [0.3, 0.2], [0.2, 0.1]])
    attacks = np.array([[0.9, 0.1], [0.55, 0.2], [0.2, 0.9], [0.1, 0.97], [0.45, 0.5]])
    # 10% of 10 benign = 1 may be refused. Spending it on the benign answer at 0.95 lets the answer threshold
    # drop to just above 0.4 (3 attacks inside the answer) with the prompt threshold above 0.6 (1 more): 4;
    # spending it on the prompt at 0.6 instead catches 0.9 and 0.55 at the prompt and 0.97 inside: 3
    tp, ta = pick_pair(attacks, [(benign, 0.10)])
    assert refused(benign, tp, ta) == 1 and refused(attacks, tp, ta) == 4
    assert 0.6 < tp < 0.9 and 0.4 < ta <= 0.5
    # none may be refused: above every benign verdict, catching 0.9 and 0.97
    tp, ta = pick_pair(attacks, [(benign, 0.0)])
    assert refused(benign, tp, ta) == 0 and refused(attacks, tp, ta) == 2 and 0.6 < tp and 0.95 < ta <= 0.97
    # 30% (3) lets the prompt threshold drop below 0.55: every attack caught, 2 benign refused
    tp, ta = pick_pair(attacks, [(benign, 0.30)])
    assert tp <= 0.55 and refused(attacks, tp, ta) == 5 and refused(benign, tp, ta) == 2
    # a second group with its own budget: a plain benign prompt at 0.69 that may not be refused keeps
    # the prompt threshold above it, whatever the first group allows
    plain = np.array([[0.69, 0.1], [0.1, 0.1]])
    tp, ta = pick_pair(attacks, [(plain, 0.0), (benign, 0.30)])
    assert tp > 0.69 and refused(plain, tp, ta) == 0 and refused(attacks, tp, ta) == 4
    # an answer threshold that gains no attack is "never"
    tp, ta = pick_pair(np.array([[0.5, 0.2]]), [(np.array([[0.1, 0.9], [0.2, 0.1]]), 0.0)])
    assert 0.2 < tp <= 0.5 and ta == NEVER
    # benign prompt verdicts at 1.0 leave no threshold below 1 within the budget: a clear error
    with pytest.raises(ValueError, match="no prompt threshold below 1"):
        pick_pair(attacks, [(np.array([[1.0, 0.1], [0.2, 0.1]]), 0.0)])


def test_best_pair_prompt_only_never_checks_the_answer():
    from safechat.train.calibrate import best_pair
    rows = {"attacks": np.array([[0.9, 0.1], [0.2, 0.99], [0.5, 0.2]]),
            "plain": np.array([[0.1, 0.1], [0.2, 0.3]]), "lookalike": np.array([[0.4, 0.5], [0.3, 0.2]])}
    tp, ta = best_pair(rows, 0.0, 0.0)
    assert ta < NEVER and refused(rows["attacks"], tp, ta) == 3  # 0.99 inside the answer is caught
    tp, ta = best_pair(rows, 0.0, 0.0, prompt_only=True)
    assert ta == NEVER and 0.4 < tp <= 0.5 and refused(rows["attacks"], tp, ta) == 2


def test_pick_pair_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(20):
        attacks, plain, look = (rng.random((n, 2)) for n in rng.integers(1, 30, 3))
        limits = [(plain, 0.1), (look, 0.2)]
        tp, ta = pick_pair(attacks, limits)
        assert all(refused(r, tp, ta) <= int(np.floor(b * len(r))) for r, b in limits)
        cands = [float(np.nextafter(v, 2.0)) for v in np.concatenate([plain, look]).ravel()] + [0.0, NEVER]
        best = max(refused(attacks, p, a) for p in cands if p < 1.0 for a in cands
                   if all(refused(r, p, a) <= int(np.floor(b * len(r))) for r, b in limits))
        assert refused(attacks, tp, ta) == best


def test_held_out_conversations_cover_the_split_once(examples):
    from safechat.train.calibrate import held_out_conversations
    groups = held_out_conversations(examples, "val")
    ids = [e["id"] for g in groups.values() for e in g]
    assert len(ids) == len(set(ids)) == sum(e["split"] == "val" for e in examples)
    assert all(e["label"] == 1 for e in groups["attacks"])
    assert {e["augmentation"] for e in groups["plain"]} == {"none"}
    assert {e["augmentation"] for e in groups["lookalike"]} == {"hardneg_template", "prefill", "jailbreak_template"}
    assert all(len(g) == 5 for g in held_out_conversations(examples, "val", 5).values())


def test_metrics_at_a_threshold_pair():
    from safechat.train.cls_recipe import metrics_for
    ex = lambda label, aug: SimpleNamespace(label=label, meta={"augmentation": aug})  # noqa: E731
    held = {"val": [ex(1, "prefill"), ex(0, "none"), ex(0, "none")]}
    scored = {"val": [[0.6, 0.8], [0.5, 0.7], [0.1]]}
    _, m = metrics_for(held, scored, 0.02, "test", thresholds=(0.55, 0.75))
    v = m["val"]
    assert v["end_of_prompt"]["tpr"] == 1.0 and v["end_of_prompt"]["fpr"] == 0.0  # 0.6 >= 0.55 > 0.5
    assert v["inside_benign_response"]["fpr"] == 0.0  # 0.7 < 0.75
    assert v["all"]["tpr"] == 1.0 and m["answer_threshold"] == 0.75
    _, m = metrics_for(held, scored, 0.02, "test", thresholds=(0.55, 0.65))
    assert m["val"]["inside_benign_response"]["fpr"] == 1.0


@pytest.fixture(scope="module")
def examples(request):
    request.applymarker(pytest.mark.downloads)
    from safechat.train.data import build_dataset
    return build_dataset(seed=0)


def _artifact_with_scores(path, examples):
    """A random tiny artifact in `path` with random per-position scores for every val and test example."""
    from tests.tiny_model import random_artifact

    art = random_artifact(3)
    art.card.update(metrics={"measured_on": "test"}, recipe={"seed": 0, "max_fpr": 0.02})
    art.save(path)
    rng = random.Random(0)
    scores = {s: {e["id"]: [rng.random() for _ in range(1 + (e["id"][-1] in "01234567"))]
                  for e in examples if e["split"] == s} for s in ("val", "test")}
    (path / "scores.json").write_text(json.dumps(scores))
    return art


def _two_artifacts(tmp_path, examples, *names):
    """Identical random artifacts with scores in tmp_path/name for each name (two calibrations to compare)."""
    dirs = [tmp_path / n for n in names]
    for d in dirs:
        d.mkdir()
        _artifact_with_scores(d, examples)
    return dirs


CAL_KW = dict(tokens=6, threads=1, limit=20, plain_budget=0.05)


def test_calibrate_writes_the_pair_into_the_card_and_the_model_file(tiny_base, tmp_path, examples):
    """End to end on the tiny model: val conversations through the runtime, the card rewritten, the pair converted."""
    from runtime.artifact import load_artifact
    from runtime.fold import convert_gguf
    from runtime.model import load

    art = _artifact_with_scores(tmp_path, examples)
    out = calibrate_artifact(tmp_path, 0.1, plain_budget=0.05, base=tiny_base, tokens=6, threads=1, command="test",
                             limit=20)
    card = json.loads((tmp_path / "card.json").read_text())  # strict JSON: no Infinity
    cal = card["calibration"]
    for group, budget in (("plain", 0.05), ("lookalike", 0.1)):
        refused_n, n = map(int, cal[f"val_{group}_refused"].split("/"))
        assert refused_n <= math.floor(budget * n) and n == 20
    assert cal["limit"] == 20 and cal["val_attacks_caught"].endswith("/20") and out["threshold"] == card["threshold"]
    assert cal["budget"] == 0.1 and cal["plain_budget"] == 0.05
    assert cal["policy"]["every"] == 4 and cal["max_tokens"] == 6 and cal["command"] == "test"
    # the prompt-only alternative keeps the same budgets and catches at most what the chosen pair does
    alt = cal["prompt_only"]
    assert 0.0 <= alt["threshold"] < 1.0
    for group, budget in (("plain", 0.05), ("lookalike", 0.1)):
        refused_n, n = map(int, alt[f"val_{group}_refused"].split("/"))
        assert refused_n <= math.floor(budget * n) and n == 20
    assert int(alt["val_attacks_caught"].split("/")[0]) <= int(cal["val_attacks_caught"].split("/")[0])
    assert set(card["metrics"]) >= {"val", "test", "threshold", "answer_threshold"}
    reloaded = load_artifact(tmp_path)
    assert reloaded.answer_threshold == float(out["answer_threshold"])
    np.testing.assert_array_equal(reloaded.head, art.head)  # the tensors are untouched
    convert_gguf(tiny_base, reloaded, tmp_path / "safe.gguf", progress=False)
    model = load(tmp_path / "safe.gguf", threads=1, allow_unverified=True)
    try:
        assert model.meta.threshold == pytest.approx(card["threshold"])
        assert model.meta.answer_threshold == pytest.approx(float(out["answer_threshold"]))
    finally:
        model.close()


def test_calibrate_refuses_scores_of_other_data(tiny_base, tmp_path):
    from tests.tiny_model import random_artifact
    art = random_artifact(3)
    art.card.update(metrics={"measured_on": "test"}, recipe={"seed": 0})
    art.save(tmp_path)
    (tmp_path / "scores.json").write_text(json.dumps({"val": {"no-such-example": [0.5]}}))
    with pytest.raises(SystemExit, match="trained on other data"):
        calibrate_artifact(tmp_path, 0.05, base=tiny_base, tokens=2, threads=1)


def test_calibrate_prompt_only_writes_the_pair_that_never_checks_the_answer(tiny_base, tmp_path, examples):
    """--prompt-only swaps the two recorded pairs: the card gets the prompt-only one, the best one is kept beside it."""
    first, second = _two_artifacts(tmp_path, examples, "best", "prompt-only")
    kw = dict(base=tiny_base, **CAL_KW)
    calibrate_artifact(first, 0.1, **kw)
    out = calibrate_artifact(second, 0.1, prompt_only=True, **kw)
    best, po = (json.loads((d / "card.json").read_text()) for d in (first, second))
    assert po["answer_threshold"] == "inf" and out["answer_threshold"] == "inf"
    assert po["threshold"] == best["calibration"]["prompt_only"]["threshold"]
    alt = po["calibration"]["with_answer_checks"]
    assert po["calibration"]["chosen"] == "prompt_only" and "prompt_only" not in po["calibration"]
    assert alt["threshold"] == best["threshold"] and alt["answer_threshold"] == best["answer_threshold"]
    key = "val_attacks_caught"
    assert alt[key] == best["calibration"][key] and po["calibration"][key] == best["calibration"]["prompt_only"][key]


def test_calibrate_from_saved_traces_matches_generating_them(tiny_base, tmp_path, examples):
    """--traces (what `bench conversations --save` writes for the artifact's fold) gives the same pair, no rerun."""
    from runtime.artifact import load_artifact
    from runtime.fold import convert_gguf
    from runtime.model import load
    from runtime.strategy import SafetyPolicy
    from safechat.train.calibrate import held_out_conversations, observe

    ran, read = _two_artifacts(tmp_path, examples, "ran", "read")
    kw = dict(base=tiny_base, **CAL_KW)
    calibrate_artifact(ran, 0.1, **kw)
    gguf = tmp_path / "fold.gguf"
    convert_gguf(tiny_base, load_artifact(read), gguf, progress=False)
    groups = held_out_conversations(examples, "val", 20)
    with load(gguf, threads=1, allow_unverified=True) as model:
        val = {k: observe(model, g, SafetyPolicy(), 6) for k, g in groups.items()}
    saved = tmp_path / "traces.json"
    saved.write_text(json.dumps({str(gguf): {"val": val}}))
    calibrate_artifact(read, 0.1, traces=saved, **kw)
    a, b = (json.loads((d / "card.json").read_text()) for d in (ran, read))
    assert (a["threshold"], a["answer_threshold"]) == (b["threshold"], b["answer_threshold"])
    for key in ("val_attacks_caught", "val_plain_refused", "val_lookalike_refused"):
        assert a["calibration"][key] == b["calibration"][key]
    assert b["calibration"]["traces"] == str(saved) and "traces" not in a["calibration"]
    # traces of another limit (or other data) are refused by name, not silently used
    with pytest.raises(SystemExit, match="val plain traces, the data has 20"):
        val["plain"] = val["plain"][:5]
        saved.write_text(json.dumps({str(gguf): {"val": val}}))
        calibrate_artifact(read, 0.1, traces=saved, **kw)


def test_at_cadence_keeps_the_checks_a_coarser_cadence_makes():
    from safechat.train.calibrate import at_cadence
    traces = [[(0, 0.1), (2, 0.2), (4, 0.9), (6, 0.3), (8, 0.4), (9, 0.5)],  # the end at 9
              [(0, 0.1), (0, 0.2), (2, 0.3), (3, 0.8)],                      # a prefill: two checks at 0
              [(0, 0.7)]]                                                     # refused or ended at the prompt
    assert at_cadence(traces, 2) == [list(t) for t in traces]
    assert at_cadence(traces, 4) == [[(0, 0.1), (4, 0.9), (8, 0.4), (9, 0.5)], [(0, 0.1), (0, 0.2), (3, 0.8)],
                                     [(0, 0.7)]]
    assert at_cadence(traces, 8)[0] == [(0, 0.1), (8, 0.4), (9, 0.5)]
    with pytest.raises(ValueError, match="every 2 tokens, which does not divide 3"):
        at_cadence(traces, 3)


def test_calibrate_at_a_coarser_cadence_from_finer_traces(tiny_base, tmp_path, examples):
    """`--every 4 --traces` over traces saved checking every 2 gives what generating at every 4 gives, records
    the cadence in the card, and the file's default policy then checks at it."""
    from runtime.artifact import load_artifact
    from runtime.fold import convert_gguf
    from runtime.model import load
    from runtime.strategy import SafetyPolicy
    from safechat.train.calibrate import held_out_conversations, observe

    ran, read = _two_artifacts(tmp_path, examples, "ran", "read")
    kw = dict(base=tiny_base, **{**CAL_KW, "tokens": 9})
    calibrate_artifact(ran, 0.1, policy=SafetyPolicy(every=4), **kw)
    gguf = tmp_path / "fold.gguf"
    convert_gguf(tiny_base, load_artifact(read), gguf, progress=False)
    groups = held_out_conversations(examples, "val", 20)
    with load(gguf, threads=1, allow_unverified=True) as model:
        val = {k: observe(model, g, SafetyPolicy(every=2), 9) for k, g in groups.items()}
    saved = tmp_path / "traces.json"
    saved.write_text(json.dumps({str(gguf): {"val": val}}))
    calibrate_artifact(read, 0.1, policy=SafetyPolicy(every=4), traces=saved, **kw)
    a, b = (json.loads((d / "card.json").read_text()) for d in (ran, read))
    assert a["every"] == b["every"] == 4 and b["calibration"]["policy"]["every"] == 4
    assert (a["threshold"], a["answer_threshold"]) == (b["threshold"], b["answer_threshold"])
    for key in ("val_attacks_caught", "val_plain_refused", "val_lookalike_refused"):
        assert a["calibration"][key] == b["calibration"][key]
    convert_gguf(tiny_base, load_artifact(read), tmp_path / "four.gguf", progress=False)
    with load(tmp_path / "four.gguf", threads=1, allow_unverified=True) as model:
        assert model.meta.every == 4 and model.chat("hello", max_tokens=4).safety.every == 4
    # a cadence the saved traces cannot give is a clear error; recalibrating keeps the card's own cadence
    with pytest.raises(SystemExit, match="does not divide 3"):
        calibrate_artifact(read, 0.1, policy=SafetyPolicy(every=3), traces=saved, **kw)
    calibrate_artifact(read, 0.1, traces=saved, **kw)
    assert json.loads((read / "card.json").read_text())["every"] == 4
