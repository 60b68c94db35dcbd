"""Issue 34: a "pass" stamp vouches for the thresholds and the cadence it was measured at, not for values
written into the file after it (by hand, gguf-set-metadata, another tool). Torch-free: the stamps here are
written by hand; test_convert_stamp.py edits a file that `convert verify --record` stamped."""
import json
import logging
import math

import numpy as np
import pytest

import runtime
from safechat.convert.stamp import read_stamp, write_stamped
from runtime.contract import PREFIX, VERIFICATION, VERIFIED, stamp_mismatches, verification_problem
from runtime.errors import ModelFileError
from runtime.gguf_io import architecture, copied_fields, copied_tensors, read_gguf, scalar_kv, write_gguf
from runtime.merge import Deltas, merge_gguf

# what `convert verify` records for the tiny model (threshold 0.5, no answer threshold, no cadence of its own)
MEASURED = {"threshold": 0.5, "answer_threshold": 0.5, "every": 4, "checks": 240}


def edited(src, out, **values):
    """A copy of `src` with safety.KEY set to each value (a float is written as FLOAT32, an int as UINT32)."""
    r = read_gguf(src, "model")
    keys = {PREFIX + k: v for k, v in values.items()}
    kv = [scalar_kv(e[0], keys.pop(e[0])) if e[0] in keys else e for e in copied_fields(r)]
    kv += [scalar_kv(k, v) for k, v in keys.items()]  # keys the file did not have
    return write_gguf(out, architecture(r, str(src)), kv, copied_tensors(r))


def stamped(tiny_safe, path, rec=MEASURED):
    return write_stamped(tiny_safe, path, {VERIFIED: "pass", VERIFICATION: json.dumps(rec)})


def test_the_file_as_verified_loads(tiny_safe, tmp_path):
    f = stamped(tiny_safe, tmp_path / "ok.gguf")
    runtime.load(f).close()
    # the same values written again (llama.cpp reads floats back with 6 decimals): still as verified
    runtime.load(edited(f, tmp_path / "same.gguf", threshold=0.5, every=4)).close()


def test_an_edited_threshold_is_refused_naming_the_edit(tiny_safe, tmp_path, caplog):
    f = edited(stamped(tiny_safe, tmp_path / "ok.gguf"), tmp_path / "edited.gguf", threshold=0.9)
    assert read_stamp(f)[VERIFIED] == "pass"  # the stamp itself is untouched: only the threshold moved
    with pytest.raises(ModelFileError) as e:
        runtime.load(f)
    msg = str(e.value)
    assert str(f) in msg and "edited after its safety verification" in msg
    assert "safety.threshold is 0.9 in the file, 0.5 in its stamp" in msg
    # the file has no answer threshold of its own: the edit moved the checks inside the answer too
    assert "safety.answer_threshold is absent (so safety.threshold, 0.9) in the file, 0.5 in its stamp" in msg
    assert "safechat verify FILE --record" in msg and "allow_unverified=True" in msg
    with pytest.raises(ModelFileError, match="edited after"):
        runtime.load(f, safety="off")  # the stamp is about the file, whatever the policy
    with caplog.at_level(logging.WARNING, logger="safechat"):
        m = runtime.load(f, allow_unverified=True)
    assert m.meta.threshold == pytest.approx(0.9)
    assert m.chat("hello", max_tokens=2).safety.checks >= 1
    m.close()
    warned = [r for r in caplog.records if r.name == "safechat" and r.levelno == logging.WARNING]
    assert warned and "allow_unverified=True" in warned[0].getMessage()
    assert "safety.threshold is 0.9 in the file, 0.5 in its stamp" in warned[0].getMessage()


@pytest.mark.parametrize("values, named", [
    ({"answer_threshold": 0.75}, "safety.answer_threshold is 0.75 in the file, 0.5 in its stamp"),
    ({"answer_threshold": math.inf}, "safety.answer_threshold is inf in the file, 0.5 in its stamp"),
    ({"every": 16}, "safety.every is 16 in the file, 4 in its stamp"),
])
def test_an_edited_answer_threshold_or_cadence_is_refused(tiny_safe, tmp_path, values, named):
    f = edited(stamped(tiny_safe, tmp_path / "ok.gguf"), tmp_path / "edited.gguf", **values)
    with pytest.raises(ModelFileError, match="edited after its safety verification") as e:
        runtime.load(f)
    assert named in str(e.value)
    runtime.load(f, allow_unverified=True).close()


def test_a_cadence_missing_from_the_file_is_the_default_and_inf_means_no_answer_checks():
    assert stamp_mismatches({PREFIX + "threshold": "0.500000"}, MEASURED) == []  # every: absent = 4
    msg = stamp_mismatches({PREFIX + "threshold": "0.500000"}, {**MEASURED, "every": 16})
    assert msg == ["safety.every is absent (so the default, 4) in the file, 16 in its stamp"]
    # verified with no check inside the answer (every 0, no answer threshold recorded): none may act now
    none_inside = {"threshold": 0.5, "every": 0}
    assert stamp_mismatches({PREFIX + "threshold": "0.5", PREFIX + "answer_threshold": "inf",
                             PREFIX + "every": "16"}, none_inside) == []
    assert stamp_mismatches({PREFIX + "threshold": "0.5", PREFIX + "answer_threshold": "0.99"}, none_inside) == \
        ["safety.answer_threshold is 0.99 in the file, inf in its stamp"]
    # an unreadable value matches nothing
    assert stamp_mismatches({PREFIX + "threshold": "half"}, {"threshold": 0.5})


def test_an_older_stamp_is_compared_on_what_it_recorded(tiny_safe, tmp_path):
    """A stamp written before the cadence was recorded: its threshold still binds, the cadence cannot."""
    old = stamped(tiny_safe, tmp_path / "old.gguf", {"threshold": 0.5, "verdict_agreement": 1.0})
    runtime.load(edited(old, tmp_path / "every.gguf", every=16, answer_threshold=0.75)).close()
    with pytest.raises(ModelFileError, match="safety.threshold is 0.25 in the file, 0.5 in its stamp"):
        runtime.load(edited(old, tmp_path / "thr.gguf", threshold=0.25))
    # a "fail" stays a fail (its own message), and a file without a stamp is not compared at all
    fail = {VERIFIED: "fail", VERIFICATION: json.dumps({"threshold": 0.5})}
    assert "failed safety verification" in verification_problem({**fail, PREFIX + "threshold": "0.9"})
    assert verification_problem({PREFIX + "threshold": "0.9"}) is None


def test_merging_weight_deltas_drops_the_stamp(tiny_safe, tmp_path):
    """New weights: the verdicts a stamp measured no longer hold; the merged copy is unverified."""
    f = stamped(tiny_safe, tmp_path / "ok.gguf")
    delta = np.full((128, 64), 0.01, np.float32)
    out = merge_gguf(f, Deltas(factors={}, full={"blk.0.ffn_up.weight": delta}), tmp_path / "merged.gguf")
    assert read_stamp(f)[VERIFIED] == "pass" and read_stamp(out) == {}
