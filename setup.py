"""Only the native module lives here; everything else is in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("runtime._native", sources=["cpp_ext/native.c"], extra_compile_args=["-O2"])])
