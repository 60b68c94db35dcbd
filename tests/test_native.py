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
