"""Only the native module lives here; everything else is in pyproject.toml.

The module is optional: where it cannot be compiled (no C compiler, an unusual platform) the
install still succeeds and the runtime uses its pure-Python token loop and verdict code, which
compute the same results (tests/test_native*.py); `runtime.load(native=True)` then says why not.
"""
import sys

from setuptools import Extension, setup

flags = ["/O2"] if sys.platform == "win32" and "GCC" not in sys.version else ["-O2", "-Wall"]
setup(ext_modules=[Extension("runtime._native", sources=["cpp_ext/native.c", "cpp_ext/loop.c", "cpp_ext/loop_py.c"],
                             depends=["cpp_ext/verdict.h", "cpp_ext/loop.h"], extra_compile_args=flags, optional=True)])
