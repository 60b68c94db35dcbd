"""`bench tradeoff`: the val-chosen pair at each real budget, read from saved traces (safechat/bench/tradeoff.py)."""
import json

import pytest

from safechat.bench import tradeoff

pytestmark = pytest.mark.timeout(60)


def _traces(attack_ps, real_ps, plain_ps=(0.1,) * 50, template_ps=(0.1,) * 50):
    conv = lambda ps: [[[0, p], [16, 0.0], [30, 0.0]] for p in ps]  # noqa: E731  prompt check, two answer checks
    split = {"attacks": conv(attack_ps), "plain": conv(plain_ps), "lookalike": conv(template_ps), "real": conv(real_ps)}
    return {"model.gguf": {"val": split, "test": split}}


def test_a_larger_real_budget_never_catches_fewer_and_keeps_its_budget(tmp_path, capsys):
    attacks = [0.5 + 0.5 * i / 100 for i in range(100)]
    real = [0.6 + 0.4 * i / 100 for i in range(100)]  # real look-alikes score as high as many attacks
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_traces(attacks, real)))
    pts = tradeoff.curve(tradeoff.rows_of(path, 16), budgets=(0.01, 0.05, 0.2))
    caught = [p["val_attacks"][0] for p in pts]
    assert caught == sorted(caught) and caught[0] < caught[-1]
    for p in pts:
        assert p["val_real"][0] <= int(p["real_budget"] * 100)
    assert tradeoff.main(["--traces", f"m={path}", "--png", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "| m | 1.0% |" in out and (tmp_path / "c.png").stat().st_size > 1000


def test_traces_without_the_real_family_are_a_clear_error(tmp_path):
    t = _traces([0.9], [0.1])
    del t["model.gguf"]["val"]["real"]
    (tmp_path / "t.json").write_text(json.dumps(t))
    with pytest.raises(SystemExit, match="no real look-alike traces"):
        tradeoff.main(["--traces", f"m={tmp_path / 't.json'}"])
