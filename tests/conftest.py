import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.tiny_model import write_tiny_base, write_tiny_safe  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    return write_tiny_base(tmp_path_factory.mktemp("tiny") / "tiny-base.gguf")


@pytest.fixture(scope="session")
def tiny_safe(tiny_base, tmp_path_factory):
    return write_tiny_safe(tiny_base, tmp_path_factory.mktemp("tiny") / "tiny-safe.gguf")
