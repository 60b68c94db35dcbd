"""Only the native module lives here; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime._native", sources=["cpp_ext/native.c", "cpp_ext/loop.c"],
                             depends=["cpp_ext/verdict.h"], extra_compile_args=["-O2", "-Wall"])])
