"""Windowed strategic attention (runtime/window.py): the specification, the policy setting, its travel from the
card to the file and back, the CLI flag, and the strategy's use of it on a fake backend."""
import argparse
import json

import pytest

from runtime.backends.base import Sampling
from runtime.contract import PREFIX, MetadataError, SafetyMeta, parse_window, stamp_mismatches
from runtime.policy import SafetyPolicy
from runtime.strategy import Generation, generate
from runtime.window import PAPER, WindowTrack, check_ranges, cls_position, positions
from tests.test_strategy import FakeBackend

pytestmark = pytest.mark.timeout(120)


# -- the specification ------------------------------------------------------------------------
def test_after_a_cleared_query_the_last_r2_answer_tokens():
    assert check_ranges(10, 40, PAPER) == ((35, 50),)           # answer tokens 25..39 at positions 35..49
    assert check_ranges(10, 3, PAPER) == ((10, 13),)            # fewer exist: all of them
    assert cls_position(check_ranges(10, 40, PAPER)) == 50      # the current position


def test_after_a_flagged_query_the_query_and_the_first_r1():
    assert check_ranges(10, 40, PAPER, prompt_flagged=True) == ((0, 15),)
    assert check_ranges(10, 2, PAPER, prompt_flagged=True) == ((0, 12),)
    assert check_ranges(10, 40, (0, 15, 10), prompt_flagged=True) == ((0, 10),)  # r1 = 0: the query alone
    # the flagged query wins over a flip (its window is the one the paper trains after a flagged query)
    assert check_ranges(10, 40, PAPER, prompt_flagged=True, flip_at=30) == ((0, 15),)


def test_after_a_flip_r2_before_and_r3_after_it():
    assert check_ranges(10, 40, PAPER, flip_at=30) == ((25, 50),)   # answer 15..39: S-r2 .. S+r3-1
    assert check_ranges(10, 32, PAPER, flip_at=30) == ((25, 42),)   # fewer after it exist yet
    assert check_ranges(10, 60, PAPER, flip_at=30) == ((25, 50),)   # the window stops growing
    assert check_ranges(10, 8, PAPER, flip_at=4) == ((10, 18),)     # fewer before it exist
    assert cls_position(check_ranges(10, 60, PAPER, flip_at=30)) == 50
    assert positions(((2, 4), (7, 8))) == [2, 3, 7]


def test_the_specification_refuses_what_it_cannot_place():
    with pytest.raises(ValueError):
        check_ranges(10, 0, PAPER)                                   # the prompt check is not windowed
    with pytest.raises(ValueError):
        check_ranges(10, 5, PAPER, flip_at=6)


def test_the_track_keeps_the_history_the_windows_need():
    t = WindowTrack((2, 3, 1), query=4, n_prompt=6)                  # a 2-token prefill: answer starts at 4
    t.record(0, flagged_prompt=False)
    assert t.ranges(1) == ((4, 7),)                                  # prefill + 1 generated: 3 answer tokens
    t.record(5, unsafe=True, streak=0)                               # flip at answer length 2 + 5 = 7
    assert t.flip_at == 7 and t.ranges(9) == ((8, 12),)              # answer 4..7 (r3 = 1)
    t.record(9, unsafe=True, streak=1)
    assert t.flip_at == 7                                            # the streak goes on: the flip stays
    t.record(10, unsafe=False)
    assert t.flip_at is None and t.ranges(12) == ((15, 18),)
    t.record(0, flagged_prompt=True)
    assert t.ranges(12) == ((0, 6),)


# -- the setting ----------------------------------------------------------------------------------
def test_the_policy_setting_is_validated_and_resolved():
    assert SafetyPolicy(window="5,15,10").window == (5, 15, 10) == SafetyPolicy(window=[5, 15, 10]).window
    assert SafetyPolicy().window is None and SafetyPolicy().with_window(None).window == "all"
    assert SafetyPolicy().with_window((1, 2, 3)).windowed == (1, 2, 3)
    assert SafetyPolicy(window="all").with_window((1, 2, 3)).windowed is None   # "all" overrides the file
    assert SafetyPolicy(window=(4, 4, 4)).with_window((1, 2, 3)).windowed == (4, 4, 4)
    for bad in ("1,0,1", (1, 2), "x", (-1, 2, 3), (1.5, 2, 3), "1,2,3,4", (True, 2, 3)):
        with pytest.raises(ValueError, match="window"):
            SafetyPolicy(window=bad)


def test_the_cli_flag():
    from runtime.cli_flags import add_policy_flags, policy_of
    p = argparse.ArgumentParser()
    add_policy_flags(p)
    assert policy_of(p.parse_args(["--window", "5,15,10"])).window == (5, 15, 10)
    assert policy_of(p.parse_args(["--window", "all"])).window == "all"
    assert policy_of(p.parse_args([])).window is None
    with pytest.raises(SystemExit):
        p.parse_args(["--window", "5,0,10"])


def test_the_metadata_key_reads_back_and_refuses_malformed_values():
    kv = {PREFIX + k: v for k, v in [("format_version", "1"), ("cls_token_id", "1"), ("safe_token_id", "2"),
                                     ("unsafe_token_id", "3"), ("threshold", "0.9")]}
    assert SafetyMeta.from_kv(kv, 10).window is None
    meta = SafetyMeta.from_kv({**kv, PREFIX + "window": "5,15,10"}, 10)
    assert meta.window == (5, 15, 10) and meta.to_kv()[PREFIX + "window"] == "5,15,10"
    for bad in ("5,15", "5,0,10", "a,b,c", ""):
        with pytest.raises(MetadataError, match="malformed"):
            SafetyMeta.from_kv({**kv, PREFIX + "window": bad}, 10)
    assert parse_window([5, 15, 10]) == (5, 15, 10)


def test_a_stamp_refuses_an_edited_window():
    kv = {PREFIX + "threshold": "0.9", PREFIX + "window": "5,15,10"}
    assert stamp_mismatches(kv, {"threshold": 0.9, "window": [5, 15, 10]}) == []
    assert "safety.window is 5,15,10 in the file, absent in its stamp" in stamp_mismatches(
        kv, {"threshold": 0.9, "window": None})[0]
    assert "absent (sees everything) in the file, 5,15,10" in stamp_mismatches(
        {PREFIX + "threshold": "0.9"}, {"threshold": 0.9, "window": [5, 15, 10]})[0]
    assert stamp_mismatches(kv, {"threshold": 0.9}) == []  # an older stamp did not record it


def test_the_card_window_is_folded_into_the_file_and_read_back(tiny_base, tmp_path):
    import runtime
    from runtime.artifact import ArtifactError, load_artifact
    from runtime.fold import convert_gguf
    from runtime.gguf_io import read_gguf
    from tests.tiny_model import random_artifact
    art = random_artifact(threshold=0.999999)
    art.card.update(window=[5, 15, 10])
    convert_gguf(tiny_base, art, tmp_path / "w.gguf", progress=False)
    assert read_gguf(tmp_path / "w.gguf").fields[PREFIX + "window"].contents() == "5,15,10"
    with runtime.load(tmp_path / "w.gguf", allow_unverified=True) as m:
        assert m.meta.window == (5, 15, 10)
        r = m.chat("hello there", max_tokens=6, temperature=0)
        assert r.safety.window == (5, 15, 10)            # the file's window is the default policy's
        r = m.chat("hello there", max_tokens=6, temperature=0, safety=SafetyPolicy(window="all"))
        assert r.safety.window is None
    art.save(tmp_path / "art")
    card = json.loads((tmp_path / "art" / "card.json").read_text())
    (tmp_path / "art" / "card.json").write_text(json.dumps({**card, "window": [5, 0, 10]}))
    with pytest.raises(ArtifactError, match="window"):
        load_artifact(tmp_path / "art")


# -- the strategy on a fake backend -------------------------------------------------------------------
class WindowedFake(FakeBackend):
    """Records the window each check was given (None: sees everything)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.windows = []

    def start(self, tokens, sampling, check, **kw):
        self.windows.append(None)
        return super().start(tokens, sampling, check, **kw)

    def advance(self, token, check, window=None):
        if check:
            self.windows.append(window)
        elif window is not None:
            raise AssertionError("a window without a check")
        return super().advance(token, check)

    def check(self, window=None):
        self.windows.append(window)
        return super().check()


def _gen(be, policy, answer_start=None, prompt=(100, 101, 102, 103)):
    g = Generation(generate(be, list(prompt), policy=policy, threshold=0.5, sampling=Sampling(), max_tokens=100,
                            answer_start=answer_start))
    return g.run()


def test_the_checks_inside_the_answer_get_the_cleared_window():
    be = WindowedFake([5, 6, 7, 8, 9])
    r = _gen(be, SafetyPolicy(every=2, window=(1, 2, 1)))
    assert not r.refused and r.safety.window == (1, 2, 1)
    # prompt (sees everything), after 2 and 4 tokens, the end (5): the last 2 answer tokens each time
    assert be.windows == [None, ((4, 6),), ((6, 8),), ((7, 9),)]


def test_a_prefill_is_answer_text():
    be = WindowedFake([5, 6, 7])
    _gen(be, SafetyPolicy(every=1, window=(1, 3, 1)), answer_start=2)  # tokens 102, 103 are the prefill
    assert be.windows == [None, ((2, 5),), ((3, 6),), ((4, 7),)]


def test_a_flagged_prompt_the_answer_goes_on_after_uses_the_query_window():
    # patience 2: the flagged prompt does not act; the answer checks clear it (they judge the first r1 tokens)
    be = WindowedFake([5, 6, 7, 8], verdict=lambda covered: 0.9 if covered == 0 else 0.1)
    r = _gen(be, SafetyPolicy(every=1, patience=2, window=(2, 3, 1)))
    assert not r.refused
    assert be.windows == [None, ((0, 5),), ((0, 6),), ((0, 6),), ((0, 6),)]


def test_a_flip_without_acting_uses_the_flip_window_until_cleared():
    verdicts = {3: 0.9, 4: 0.2}
    be = WindowedFake([5, 6, 7, 8, 9, 10, 11], verdict=lambda c: verdicts.get(c, 0.1))
    r = _gen(be, SafetyPolicy(every=1, patience=2, window=(1, 2, 1)))
    assert not r.refused
    # flip at 3 (window answer 1..2), then answer 1..3 (S-r2 .. S+r3-1); cleared at 4: the last 2 again
    assert be.windows[1:] == [((4, 5),), ((4, 6),), ((5, 7),), ((5, 8),), ((7, 9),), ((8, 10),), ((9, 11),)]


def test_the_flip_acts_after_patience_with_the_flip_window():
    be = WindowedFake([5, 6, 7, 8, 9, 10], verdict=lambda c: 0.9 if c >= 3 else 0.1)
    r = _gen(be, SafetyPolicy(every=1, patience=2, window=(1, 2, 1)))
    assert r.refused and r.safety.intervened_at == 4 and be.windows[-1] == ((5, 8),)


def test_without_a_window_the_backend_calls_are_unchanged():
    be = WindowedFake([5, 6, 7])
    _gen(be, SafetyPolicy(every=1))
    assert be.windows == [None] * 4


def test_a_windowed_check_that_fails_refuses():
    class Broken(WindowedFake):
        def advance(self, token, check, window=None):
            if window is not None:
                raise RuntimeError("no window here")
            return super().advance(token, check)
    r = _gen(Broken([5, 6, 7]), SafetyPolicy(every=1, window=PAPER))
    assert r.refused and r.text == SafetyPolicy().refusal and "no window here" in r.safety.reason


def test_a_windowed_policy_runs_the_python_loop():
    class NoFused(WindowedFake):
        def fused_loop(self, *a):
            raise AssertionError("the native loop does not compute windows")
    be = NoFused([5, 6])
    g = Generation(generate(be, [100, 101], policy=SafetyPolicy(every=1, window=PAPER), threshold=0.5,
                            sampling=Sampling(), max_tokens=10, native=True))
    assert not g.run().refused and be.windows[1:] == [((2, 3),), ((2, 4),)]


def test_train_joint_and_calibrate_take_the_window_flag():
    pytest.importorskip("torch")
    from safechat.train.calibrate import add_parser
    from safechat.train.joint_run import add_parsers
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers()
    add_parsers(sub)
    add_parser(sub)
    assert ap.parse_args(["calibrate", "ART", "--window", "all"]).window == "all"
    assert ap.parse_args(["calibrate", "ART", "--window", "1,2,3"]).window == (1, 2, 3)
    args = ap.parse_args(["joint", "--out", "x", "--window", "5,15,10"])
    assert args.window == (5, 15, 10)
    assert ap.parse_args(["joint", "--out", "x"]).window is None
    with pytest.raises(SystemExit):
        ap.parse_args(["joint", "--out", "x", "--window", "all"])  # training needs the windows themselves
