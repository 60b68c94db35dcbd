"""The compiled module built by pip install agrees with the pure-Python reference."""
import ctypes
import math

import pytest

from runtime.backends.llama import p_unsafe_from_logits


def test_native_module_is_built():
    from runtime import _native  # built from cpp_ext/ by `pip install`
    assert hasattr(_native, "p_unsafe")


@pytest.mark.parametrize("safe,unsafe", [(0.0, 0.0), (1.0, 3.0), (3.0, 1.0), (-80.0, 90.0), (900.0, -900.0),
                                         (12.5, 12.25)])
def test_native_p_unsafe_matches_python(safe, unsafe):
    from runtime import _native
    row = (ctypes.c_float * 5)(7.0, safe, unsafe, -1.0, 2.0)
    got = _native.p_unsafe(ctypes.addressof(row), 1, 2)
    assert math.isclose(got, p_unsafe_from_logits(row, 1, 2), rel_tol=1e-12, abs_tol=1e-300)
    assert 0.0 <= got <= 1.0


def test_native_nan_and_bad_arguments():
    from runtime import _native
    row = (ctypes.c_float * 3)(0.0, float("nan"), 1.0)
    assert math.isnan(_native.p_unsafe(ctypes.addressof(row), 1, 2))
    with pytest.raises(ValueError):
        _native.p_unsafe(0, 1, 2)
    with pytest.raises(ValueError):
        _native.p_unsafe(ctypes.addressof(row), -1, 2)


@pytest.mark.parametrize("seed", range(4))
def test_native_row_stats_matches_numpy(seed):
    import numpy as np

    from runtime import _native
    from runtime.backends.llama import row_stats_py
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(5000) * (1 + 5 * seed)).astype(np.float32)
    # a file with a category head masks its 13 category rows + controversial + 3 safety ids: 17 ids
    excluded = ((7, 4999), (), tuple(range(4980, 4997)), ())[seed]
    got = _native.row_stats(row.ctypes.data, len(row), excluded)
    ref = row_stats_py(row, len(row), excluded)
    assert got == pytest.approx(ref, rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="excluded: at most 64 token ids, each in"):
        _native.row_stats(row.ctypes.data, len(row), tuple(range(65)))


def test_backend_hesitation_uses_the_sampled_row(tiny_safe):
    import llama_cpp as ll
    import numpy as np

    from runtime.backends.base import Sampling
    from runtime.backends.llama import LlamaBackend, LlamaModelFile, row_stats_py
    mf = LlamaModelFile(tiny_safe)
    be = LlamaBackend(mf, n_ctx=256, threads=1, safety_ids=mf.safety_meta().token_ids)
    be.start(mf.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", True), Sampling(), check=True)
    ent, margin = be.hesitation()
    row = np.ctypeslib.as_array(ll.llama_get_logits_ith(be.ctx, be._row), shape=(mf.n_vocab,)).copy()
    assert (ent, margin) == pytest.approx(row_stats_py(row, mf.n_vocab, mf.safety_meta().token_ids))
    assert 0 < ent < np.log(mf.n_vocab) and 0 <= margin <= 1
    be.close()


@pytest.mark.parametrize("seed", range(3))
def test_native_logprob_matches_numpy(seed):
    import numpy as np

    from runtime import _native
    from runtime.backends.base import logprob_py
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(5000) * (1 + 5 * seed)).astype(np.float32)
    excluded = ((7, 4999), (), tuple(range(4980, 4997)))[seed]
    for token in (0, 123, 4998):
        got = _native.logprob(row.ctypes.data, len(row), excluded, token)
        assert got == pytest.approx(logprob_py(row, len(row), excluded, token), rel=1e-9, abs=1e-9) and got <= 0
    assert np.exp([_native.logprob(row.ctypes.data, len(row), excluded, t) for t in range(5000)]).sum() == \
        pytest.approx(1.0)
    if excluded:
        assert _native.logprob(row.ctypes.data, len(row), excluded, excluded[0]) == -math.inf
    bad = row.copy()
    bad[3] = np.nan
    assert math.isnan(_native.logprob(bad.ctypes.data, len(bad), (), 0))
    with pytest.raises(ValueError, match="token id outside"):
        _native.logprob(row.ctypes.data, len(row), (), 5000)
