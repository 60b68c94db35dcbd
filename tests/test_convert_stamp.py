"""The verification stamp: quantize/verify record the outcome; the runtime refuses a file that failed."""
import json

import gguf
import numpy as np
import pytest

import runtime
from safechat.convert.__main__ import main
from runtime.fold import convert_gguf
from runtime.contract import VERIFICATION, VERIFIED
from safechat.convert.stamp import read_stamp, write_stamped
from safechat.convert.verify import PROMPTS_V1
from runtime.errors import ModelFileError
from tests.tiny_model import random_artifact

pytest.importorskip("torch")  # the verification's reference model


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _tensor_bytes(path):
    return {t.name: (t.tensor_type, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.fixture(scope="module")
def q4_failed(tiny_safe, tmp_path_factory):
    """Q4_0 of the tiny model moves p_unsafe by ~0.03 on average: it misses the bar (mean |dp| <= 0.02)."""
    out = tmp_path_factory.mktemp("q4") / "tiny-Q4_0.gguf"
    rc = main(["quantize", str(tiny_safe), str(out), "--quant", "Q4_0", "--tokens", "2", "--threads", "1",
               "--prompts", str(PROMPTS_V1)])
    assert rc == 1  # written, but the command says it failed
    return out


def test_failing_quantization_is_stamped_fail_not_verified(q4_failed, tiny_safe):
    stamp = read_stamp(q4_failed)
    assert stamp[VERIFIED] == "fail"
    rec = json.loads(stamp[VERIFICATION])
    assert rec["prompt_set"] == "safechat-verify v1" and rec["n_prompts"] == 24 and rec["tokens"] == 2
    assert rec["reference"] == tiny_safe.name and rec["weights"] == "Q4_0"  # a name: no local paths in a shared file
    assert rec["mean_abs_dp"] > rec["bar"]["mean_abs_dp"] == 0.02
    assert rec["bar"]["verdict_agreement"] == 0.99


def test_runtime_refuses_a_failed_file_unless_allowed(q4_failed):
    with pytest.raises(ModelFileError) as e:
        runtime.load(q4_failed)
    msg = str(e.value)
    assert str(q4_failed) in msg and "failed safety verification" in msg
    dp = json.loads(read_stamp(q4_failed)[VERIFICATION])["mean_abs_dp"]
    assert f"mean |delta p_unsafe| {dp:.4f} (bar <= 0.02: FAILED)" in msg
    assert "verdict agreement 1.000, " in msg and "allow_unverified=True" in msg
    with pytest.raises(ModelFileError, match="failed safety verification"):
        runtime.load(q4_failed, safety="off")  # the stamp is about the file, whatever the policy
    m = runtime.load(q4_failed, allow_unverified=True)
    assert m.chat("hello", max_tokens=2).safety.checks >= 1
    m.close()


def test_requantizing_replaces_or_drops_the_stamp(q4_failed, tmp_path, capsys):
    # verified again (against the Q4_0 file's own weights, which F16 keeps): the "fail" becomes "pass"
    f16 = tmp_path / "f16.gguf"
    rc, out, err = _run(capsys, "quantize", q4_failed, f16, "--quant", "F16", "--tokens", "2", "--threads", "1",
                        "--prompts", PROMPTS_V1)
    assert rc == 0, out + err
    assert read_stamp(f16)[VERIFIED] == "pass" and json.loads(read_stamp(f16)[VERIFICATION])["weights"] == "F16"
    runtime.load(f16).close()
    # not verified: llama.cpp copies every key, but the source's stamp must not carry over
    q8 = tmp_path / "q8.gguf"
    rc, out, err = _run(capsys, "quantize", q4_failed, q8, "--quant", "Q8_0", "--no-verify")
    assert rc == 0, out + err
    assert read_stamp(q8) == {} and "not verified" in out
    runtime.load(q8).close()  # unstamped: loads


def test_verify_record_stamps_in_place_and_keeps_every_tensor(tiny_base, tiny_safe, tmp_path, capsys):
    other = tmp_path / "other-head.gguf"
    convert_gguf(tiny_base, random_artifact(seed=2), other, progress=False)
    before = _tensor_bytes(other)
    rc, out, _ = _run(capsys, "verify", other, "--reference", tiny_safe, "--tokens", "1", "--threads", "1",
                      "--prompts", PROMPTS_V1, "--record")
    assert rc == 1 and f"recorded in {other}: safety.verified=fail" in out
    assert read_stamp(other)[VERIFIED] == "fail"
    with pytest.raises(ModelFileError, match="failed safety verification against tiny-safe.gguf"):
        runtime.load(other)
    rc, out, _ = _run(capsys, "verify", other, "--tokens", "1", "--threads", "1", "--prompts", PROMPTS_V1, "--record")
    assert rc == 0 and read_stamp(other)[VERIFIED] == "pass"  # against its own weights: replaced
    assert _tensor_bytes(other) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-head.gguf"]  # no temp files left
    runtime.load(other).close()


def test_unrecognised_status_is_refused_and_no_stamp_loads(tiny_safe, tmp_path):
    odd = write_stamped(tiny_safe, tmp_path / "odd.gguf", {VERIFIED: "maybe"})
    with pytest.raises(ModelFileError, match="unrecognised verification status 'maybe'"):
        runtime.load(odd)
    assert read_stamp(tiny_safe) == {}  # what `convert gguf` writes: unverified, loads
    runtime.load(tiny_safe).close()
    back = write_stamped(odd, tmp_path / "plain.gguf", None)
    assert read_stamp(back) == {} and _tensor_bytes(back) == _tensor_bytes(tiny_safe)


def test_cli_refuses_a_failed_file_unless_allowed(q4_failed, capsys):
    from runtime.cli import main
    assert main(["chat", "hello", "--model", str(q4_failed), "--max-tokens", "2", "--threads", "1"]) != 0
    assert "failed safety verification" in capsys.readouterr().err
    assert main(["chat", "hello", "--model", str(q4_failed), "--max-tokens", "2", "--threads", "1", "--json",
                 "--allow-unverified"]) == 0
    assert json.loads(capsys.readouterr().out)["safety"]["checks"] >= 1


def test_a_verified_file_edited_afterwards_is_refused(tiny_safe, tmp_path, capsys):
    """Issue 34: `verify --record` stamps the thresholds and the cadence it measured at; a threshold written
    into the file afterwards (here with gguf-py, as gguf-set-metadata would) is refused, naming the edit."""
    from tests.test_stamp_check import edited

    f = write_stamped(tiny_safe, tmp_path / "verified.gguf", None)
    rc, out, _ = _run(capsys, "verify", f, "--tokens", "1", "--threads", "1", "--prompts", PROMPTS_V1, "--record")
    assert rc == 0 and read_stamp(f)[VERIFIED] == "pass"
    rec = json.loads(read_stamp(f)[VERIFICATION])
    # tiny-safe: threshold 0.5 for every check (no answer threshold of its own), the default cadence
    assert rec["threshold"] == rec["answer_threshold"] == 0.5 and rec["every"] == 4
    runtime.load(f).close()
    with pytest.raises(ModelFileError) as e:
        runtime.load(edited(f, tmp_path / "loose.gguf", threshold=0.99))
    assert "safety.threshold is 0.99 in the file, 0.5 in its stamp" in str(e.value)
    with pytest.raises(ModelFileError, match="safety.every is 64 in the file, 4 in its stamp"):
        runtime.load(edited(f, tmp_path / "sparse.gguf", every=64))
    m = runtime.load(tmp_path / "sparse.gguf", allow_unverified=True)
    assert m.chat("hello", max_tokens=2).safety.every == 64
    m.close()
    # verified again, the stamp describes the file as it is now
    rc, *_ = _run(capsys, "verify", tmp_path / "sparse.gguf", "--tokens", "1", "--threads", "1",
                  "--prompts", PROMPTS_V1, "--record")
    assert rc == 0 and json.loads(read_stamp(tmp_path / "sparse.gguf")[VERIFICATION])["every"] == 64
    runtime.load(tmp_path / "sparse.gguf").close()
