"""train/category_head.py pieces that need no data: the joint artifact's deltas in the torch model."""
import pytest


def test_with_deltas_adds_the_joint_lora_to_the_torch_model(tiny_base, tmp_path):
    """A joint artifact's [CLS] features come from its merged weights, not the base's."""
    import numpy as np
    import torch
    from convert.reference import load_frozen
    from runtime.merge import save_deltas
    from train.category_head import with_deltas

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
