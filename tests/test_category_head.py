"""safechat/train/category_head.py pieces that need no data: the joint artifact's deltas in the torch model."""
import pytest


def test_with_deltas_adds_the_joint_lora_to_the_torch_model(tiny_base, tmp_path):
    """A joint artifact's [CLS] features come from its merged weights, not the base's."""
    import numpy as np
    import torch
    from safechat.convert.reference import load_frozen
    from runtime.merge import save_deltas
    from safechat.train.category_head import with_deltas

    base = load_frozen(tiny_base)
    name = "blk.1.attn_q.weight"
    out, inp = base.w[name].shape
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, inp)).astype(np.float32), rng.normal(size=(out, 2)).astype(np.float32)
    save_deltas(tmp_path, factors={name: (a, b)})
    before = base.w[name].clone()
    assert with_deltas(base, tmp_path, {}) is base and torch.equal(base.w[name], before)  # no deltas declared
    merged = with_deltas(load_frozen(tiny_base), tmp_path, {"deltas": "deltas.safetensors"})
    np.testing.assert_allclose(merged.w[name].numpy(), before.numpy() + b @ a, rtol=1e-5, atol=1e-5)
    save_deltas(tmp_path, factors={"blk.1.no_such.weight": (a, b)})
    with pytest.raises(SystemExit, match="does not fit"):
        with_deltas(load_frozen(tiny_base), tmp_path, {"deltas": "deltas.safetensors"})


def test_llama_cpp_features_match_the_torch_pass(tiny_base, tmp_path):
    """The [CLS] hidden state read from the file by llama.cpp is the torch model's, template reuse included."""
    import numpy as np
    from safechat.convert.reference import load_frozen
    from runtime.artifact import load_artifact
    from runtime.fold import convert_gguf
    from tests.tiny_model import random_artifact
    from safechat.train.category_head import cls_features, cls_features_llama

    art = random_artifact(3)
    art.save(tmp_path / "art")
    art = load_artifact(tmp_path / "art")
    safe = tmp_path / "safe.gguf"
    convert_gguf(tiny_base, art, safe, progress=False, weights="F16")
    rng = np.random.default_rng(0)
    shared = rng.integers(10, 200, size=30).tolist()  # a template several prompts share
    tokens = [shared + rng.integers(10, 200, size=n).tolist() for n in (1, 5, 40)] + [[7, 8, 9], shared[:12]]
    ref = cls_features(load_frozen(tiny_base), tokens, art.side_rows)
    got = cls_features_llama(safe, tokens, threads=1)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * float(np.abs(ref).max()))
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999
