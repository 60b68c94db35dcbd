"""The default model's build (runtime/default_model.py): folded at F16, then quantized by llama.cpp when the
shipped type is a quantized one; the file says what it holds and answers through the runtime."""
import gguf
import pytest

from runtime import default_model
from runtime.model import load
from tests.tiny_model import random_artifact


@pytest.mark.timeout(300)
@pytest.mark.parametrize("weights, file_type", [("Q8_0", gguf.LlamaFileType.MOSTLY_Q8_0),
                                                ("Q4_0", gguf.LlamaFileType.MOSTLY_Q4_0)])
def test_build_folds_and_quantizes(tiny_base, tmp_path, weights, file_type):
    asset = tmp_path / "asset"
    random_artifact(seed=3, threshold=0.9).save(asset)
    out = default_model.build(tiny_base, asset, tmp_path / f"safe-{weights}.gguf", weights, progress=False)
    r = gguf.GGUFReader(str(out))
    assert int(r.fields["general.file_type"].contents()) == int(file_type)
    types = {t.tensor_type.name for t in r.tensors if len(t.shape) == 2}
    assert weights in types
    assert r.fields["safety.threshold"].contents() == pytest.approx(0.9)
    del r
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset", out.name]  # no temp file left
    with load(out, threads=1) as m:
        reply = m.chat("hello there", max_tokens=4, temperature=0)
    assert reply.safety.trace  # the check ran on the quantized file


def test_a_failed_quantization_leaves_nothing(tiny_base, tmp_path):
    from runtime.gguf_io import ConvertError
    asset = tmp_path / "asset"
    random_artifact(seed=3).save(asset)
    with pytest.raises(ConvertError, match="unsupported quantization"):
        default_model.build(tiny_base, asset, tmp_path / "safe.gguf", "Q3_X", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]
