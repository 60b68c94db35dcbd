"""`python -m safechat.convert`: gguf (+ --quant), quantize through llama.cpp, verify; clear errors."""
import json
import os
import subprocess
import sys

import gguf
import pytest

from safechat.convert.__main__ import main
from runtime.contract import PREFIX, SPECIAL_TOKENS, STAMP_KEYS, VERIFIED
from safechat.convert.stamp import read_stamp
from safechat.convert.verify import PROMPTS_V1
from tests.tiny_model import random_artifact

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PROMPTS = [[{"role": "user", "content": "hello there"}],
           [{"role": "user", "content": "the rain in spain"}, {"role": "assistant", "content": "Sure, here is"}]]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "safechat.convert", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=120)


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def art_dir(tmp_path_factory):
    return random_artifact().save(tmp_path_factory.mktemp("art") / "a")  # the artifact of tiny_safe


def _p_unsafe(path):
    import runtime
    m = runtime.load(str(path))
    return [m.chat(msgs, max_tokens=1).safety.trace[0][1] for msgs in PROMPTS]


def _safety_fields(path):
    r = gguf.GGUFReader(str(path))
    return ({k: f.contents() for k, f in r.fields.items() if k.startswith(PREFIX) and k not in STAMP_KEYS},
            r.fields["tokenizer.ggml.tokens"].contents()[-3:], r.fields["tokenizer.ggml.token_type"].contents()[-3:])


def test_cli_converts_and_the_runtime_loads_it(tiny_base, tiny_safe, art_dir, tmp_path):
    out = tmp_path / "sub" / "safe.gguf"
    r = _cli("gguf", "--base", tiny_base, "--artifact", art_dir, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.is_file()
    assert out.read_bytes() == tiny_safe.read_bytes()  # same as the Python API, byte for byte
    assert [f.name for f in out.parent.iterdir()] == ["safe.gguf"]  # no temp files left
    import runtime
    rep = runtime.load(str(out)).chat("hello", max_tokens=2)
    assert rep.safety.checks >= 1


def _with_architecture(src, dst, arch):
    """A copy of the GGUF `src` whose general.architecture says `arch`."""
    from runtime.gguf_io import copied_fields, copied_tensors, read_gguf, write_gguf
    r = read_gguf(src)
    return write_gguf(dst, arch, copied_fields(r), copied_tensors(r))


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "mismatch", "already_safe", "unwritable",
                                  "architecture"])
def test_errors_are_one_clear_line(case, tiny_base, tiny_safe, art_dir, tmp_path, capsys):
    base, art, out = tiny_base, art_dir, tmp_path / "out.gguf"
    if case == "missing":
        base, want = tmp_path / "nope.gguf", "base model not found"
    elif case == "corrupt":
        base = tmp_path / "bad.gguf"
        base.write_text("not a model at all")
        want = "is not a readable GGUF"
    elif case == "truncated":
        base = tmp_path / "cut.gguf"
        data = tiny_base.read_bytes()
        base.write_bytes(data[:len(data) // 2])
        want = "is not a readable GGUF"
    elif case == "mismatch":
        from runtime.artifact import Artifact
        import numpy as np
        art = Artifact(np.ones(32, np.float32), np.ones((2, 32), np.float32), {"threshold": 0.5}).save(tmp_path / "a32")
        want = "hidden size 32"
    elif case == "already_safe":
        base, want = tiny_safe, "already carries safety metadata"
    elif case == "architecture":
        base = _with_architecture(tiny_base, tmp_path / "mamba.gguf", "mamba")
        want = "architecture 'mamba' is not supported; supported: llama, qwen2, qwen3, gemma3, phi3"
    else:
        (tmp_path / "afile").write_text("x")
        out, want = tmp_path / "afile" / "out.gguf", "is not writable"
    before = sorted(p.name for p in tmp_path.iterdir())
    if case in ("missing", "unwritable"):  # the real process: no traceback, exit 2
        r = _cli("gguf", "--base", base, "--artifact", art, "--out", out, "--quant", "Q8_0")
        rc, err = r.returncode, r.stderr
        assert "Traceback" not in err
    else:
        rc, _, err = _run(capsys, "gguf", "--base", base, "--artifact", art, "--out", out, "--quant", "Q8_0")
    assert rc == 2
    assert err.startswith("error: ") and want in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_cli_force_reconverts_a_safe_model(tiny_safe, art_dir, tmp_path, capsys):
    out = tmp_path / "again.gguf"
    rc, stdout, err = _run(capsys, "gguf", "--base", tiny_safe, "--artifact", art_dir, "--out", out, "--quiet",
                           "--force")
    assert rc == 0, err
    assert out.read_bytes() == tiny_safe.read_bytes()  # idempotent: the same artifact gives the same file


@pytest.mark.parametrize("qtype", ["Q8_0", "F16"])
def test_quantize_keeps_the_safety_signal(qtype, tiny_safe, tmp_path, capsys):
    out = tmp_path / f"q-{qtype}.gguf"
    rc, stdout, err = _run(capsys, "quantize", tiny_safe, out, "--quant", qtype, "--tokens", "2", "--threads", "1",
                           "--prompts", PROMPTS_V1)  # v1: 24 prompts, enough here and 4x faster than v2
    assert rc == 0, err
    assert f"token_embd.weight: {qtype}" in stdout  # which type the head rows ended up in
    assert "verified against" in stdout and "| pass |" in stdout
    assert read_stamp(out)[VERIFIED] == "pass" and not read_stamp(tiny_safe)
    assert _safety_fields(out) == _safety_fields(tiny_safe)
    fields, toks, types = _safety_fields(out)
    assert toks == list(SPECIAL_TOKENS) and types == [gguf.TokenType.CONTROL] * 3
    emb = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "token_embd.weight")
    assert emb.tensor_type.name == qtype
    import runtime
    assert runtime.load(str(out)).path == out
    ref = _p_unsafe(tiny_safe)
    got = _p_unsafe(out)
    assert got == pytest.approx(ref, abs=0.03)
    assert [f.name for f in tmp_path.iterdir()] == [out.name]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_gguf_with_quant_and_requantize_note(tiny_base, art_dir, tmp_path, capsys):
    q8 = tmp_path / "q8.gguf"
    rc, stdout, err = _run(capsys, "gguf", "--base", tiny_base, "--artifact", art_dir, "--out", q8, "--quant", "q8_0",
                           "--quiet", "--tokens", "2", "--threads", "1", "--prompts", PROMPTS_V1)
    assert rc == 0, err
    assert "note:" not in stdout  # from a float base: no compounding
    assert _safety_fields(q8)[0][PREFIX + "cls_token_id"] > 0
    stamp = json.loads(read_stamp(q8)["safety.verification"])  # verified against the unquantized fold
    assert stamp["reference"] == "tiny-base.gguf + artifact, unquantized" and stamp["n_prompts"] == 24
    rc, stdout, err = _run(capsys, "quantize", q8, tmp_path / "q4.gguf", "--quant", "Q4_0", "--no-verify")
    assert rc == 0, err
    assert "already quantized (Q8_0)" in stdout and "compounds" in stdout
    assert "not verified" in stdout and not read_stamp(tmp_path / "q4.gguf")  # q8's stamp does not carry over


def test_torch_reference_cached_greedy_matches_full_passes(tiny_safe):
    torch = pytest.importorskip("torch")
    from safechat.convert.verify import TorchReference
    ref = TorchReference(tiny_safe)
    toks = [5, 40, 41, 42, 77, 9, 100]
    p, out = ref.run(toks, 6, is_eog=lambda t: False)
    seq = list(toks)
    with torch.no_grad():
        for _ in range(6):  # no cache: the whole sequence again for every token
            logits = ref.m(torch.tensor([seq])).logits[0, -1]
            seq.append(ref._argmax(logits))
        cls = ref.m(torch.tensor([toks + ref.side])).logits[0, -1]
    assert out == seq[len(toks):]
    assert p == pytest.approx(float(torch.softmax(cls[list(ref.ids[-2:])].double(), -1)[1]), abs=1e-6)


def test_verify_passes_on_itself_and_fails_on_a_perturbed_head(tiny_base, tiny_safe, tmp_path, capsys):
    pytest.importorskip("torch")
    rc, stdout, err = _run(capsys, "verify", tiny_safe, "--reference", tiny_safe, "--tokens", "4", "--threads", "1",
                           "--json", tmp_path / "v.json")
    assert rc == 0, stdout + err
    assert "| next-token agreement |" in stdout and "| pass |" in stdout
    d = json.loads((tmp_path / "v.json").read_text())
    r = d["results"][0]
    assert d["passed"] and d["prompt_set"]["version"] == 2 and r["n_prompts"] == 100
    assert r["verdict_agreement"] == 1.0 and r["mean_abs_dp"] < 0.005 and r["token_agreement"] > 0.9
    assert {p["kind"] for p in r["prompts"]} == {"benign", "benign_hard", "harmful", "harmful_prefill"}
    assert not read_stamp(tiny_safe)  # verify records only when asked (--record)

    from runtime.fold import convert_gguf
    other = tmp_path / "other-head.gguf"
    convert_gguf(tiny_base, random_artifact(seed=2), other, progress=False)
    r = _cli("verify", other, "--reference", tiny_safe, "--tokens", "2", "--threads", "1", "--prompts", PROMPTS_V1)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "| FAIL |" in r.stdout and "Traceback" not in r.stderr


def test_verify_errors(tiny_base, tiny_safe, tmp_path, capsys):
    rc, _, err = _run(capsys, "verify", tmp_path / "nope.gguf")
    assert rc == 2 and err.startswith("error: model file not found")
    rc, _, err = _run(capsys, "verify", tiny_base, "--reference", tiny_safe, "--tokens", "1", "--threads", "1")
    assert rc == 2 and "not a safe model" in err
