"""`convert verify` on an exported .onnx (onnxruntime) beside GGUFs, and its stamp in the ONNX metadata."""
import json
import shutil

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("torch")

import runtime  # noqa: E402
from safechat.convert.__main__ import main  # noqa: E402
from runtime.fold import convert_gguf  # noqa: E402
from runtime.contract import VERIFIED  # noqa: E402
from safechat.convert.stamp import read_stamp  # noqa: E402
from safechat.convert.verify import PROMPTS_V1  # noqa: E402
from runtime.errors import ModelFileError  # noqa: E402
from tests.tiny_model import random_artifact  # noqa: E402


@pytest.fixture(scope="module")
def exported(tiny_safe, tmp_path_factory):
    """`safechat export-onnx`: export, verify against the GGUF's torch reference, stamp the outcome."""
    d = tmp_path_factory.mktemp("onnxv")
    shutil.copy(tiny_safe, d / "model.gguf")  # the vocabulary and the default reference, beside the .onnx
    rc = main(["onnx", str(d / "model.gguf"), str(d / "model.onnx"), "--quiet", "--tokens", "2", "--threads", "1",
               "--prompts", str(PROMPTS_V1)])
    assert rc == 0
    assert sorted(p.name for p in d.iterdir()) == ["model.gguf", "model.onnx"]  # no temp files left
    return d


def test_convert_onnx_stamps_its_verification(exported):
    stamp = read_stamp(exported / "model.onnx")
    assert stamp[VERIFIED] == "pass"
    rec = json.loads(stamp["safety.verification"])
    assert rec["weights"] == "onnx fp32" and rec["reference"] == "model.gguf" and rec["n_prompts"] == 24


def test_onnx_export_errors_before_any_work(tiny_base, tiny_safe, tmp_path, capsys):
    from runtime.gguf_io import copied_fields, copied_tensors, read_gguf, write_gguf
    r = read_gguf(tiny_safe)
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", "gpt2", copied_fields(r), copied_tensors(r))
    rc, _, err = _run(capsys, "onnx", gpt2, tmp_path / "gpt2.onnx")
    assert rc == 2 and "architecture 'gpt2' is not supported by the ONNX export; supported: llama" in err
    (tmp_path / "elsewhere").mkdir()
    rc, _, err = _run(capsys, "onnx", tiny_safe, tmp_path / "elsewhere" / "m.onnx")
    assert rc == 2 and "needs tiny-safe.gguf beside it" in err and "--no-verify" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["elsewhere", "gpt2.gguf"]


def _run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_onnx_row_beside_gguf_rows(exported, tiny_safe, tmp_path, capsys):
    rc, out, err = _run(capsys, "verify", exported / "model.onnx", tiny_safe, "--reference", tiny_safe,
                        "--tokens", "10", "--threads", "1", "--prompts", PROMPTS_V1, "--json", tmp_path / "v.json")
    assert rc == 0, out + err
    assert "| model.onnx | onnx fp32 | F32 |" in out and "| tiny-safe.gguf |" in out
    onnx_row, gguf_row = json.loads((tmp_path / "v.json").read_text())["results"]
    assert onnx_row["n_prompts"] == gguf_row["n_prompts"] == 24
    # one threshold for every check: the checks inside the answers are compared too, on both backends
    assert onnx_row["n_checks"] > 24 and gguf_row["n_checks"] > 24
    # onnxruntime in float32 (no F16 K/V cache) sits closer to the float32 reference than llama.cpp
    assert onnx_row["mean_abs_dp"] < 1e-4 and onnx_row["max_abs_dp"] < 1e-3 and onnx_row["token_agreement"] == 1.0
    assert onnx_row["verdict_agreement"] == 1.0 and onnx_row["passed"]


def test_onnx_default_reference_is_the_gguf_beside_it(exported, tmp_path, capsys):
    rc, out, err = _run(capsys, "verify", exported / "model.onnx", "--tokens", "1", "--threads", "1",
                        "--prompts", PROMPTS_V1)
    assert rc == 0 and "| pass |" in out, out + err
    alone = tmp_path / "alone.onnx"
    shutil.copy(exported / "model.onnx", alone)
    rc, _, err = _run(capsys, "verify", alone, "--tokens", "1", "--threads", "1")
    assert rc == 2 and "pass --reference" in err and "alone.gguf is not beside it" in err


def test_onnx_stamp_fail_is_refused_by_the_onnx_backend(exported, tiny_base, tmp_path, capsys):
    d = tmp_path / "x"
    d.mkdir()
    for name in ("model.onnx", "model.gguf"):
        shutil.copy(exported / name, d / name)
    other = tmp_path / "other-head.gguf"
    convert_gguf(tiny_base, random_artifact(seed=2), other, progress=False)
    rc, out, _ = _run(capsys, "verify", d / "model.onnx", "--reference", other, "--tokens", "1", "--threads", "1",
                      "--prompts", PROMPTS_V1, "--record")
    assert rc == 1 and read_stamp(d / "model.onnx")[VERIFIED] == "fail"
    with pytest.raises(ModelFileError, match="model.onnx failed safety verification against other-head.gguf"):
        runtime.load(d / "model.onnx", backend="onnx")
    m = runtime.load(d / "model.onnx", backend="onnx", allow_unverified=True)
    assert m.chat("hi", max_tokens=2).safety.checks >= 1
    m.close()
    rc, _, _ = _run(capsys, "verify", d / "model.onnx", "--tokens", "1", "--threads", "1", "--prompts", PROMPTS_V1,
                    "--record")
    assert rc == 0 and read_stamp(d / "model.onnx")[VERIFIED] == "pass"
    runtime.load(d / "model.onnx", backend="onnx").close()
