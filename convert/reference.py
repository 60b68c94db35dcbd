"""The torch reference models, by architecture: what `verify`, the ONNX export and the training
recipes compute against (convert/llama_torch.py, convert/gemma3_torch.py)."""
from __future__ import annotations

from pathlib import Path

import gguf

from .gemma3_torch import FrozenGemma3
from .llama_torch import FrozenLlama, _field

ARCHITECTURES = {"llama": FrozenLlama, "gemma3": FrozenGemma3}


def load_frozen(path: str | Path) -> FrozenLlama:
    """The frozen torch model for a GGUF file: `FrozenLlama`, or `FrozenGemma3` for a gemma3 file."""
    arch = _field(gguf.GGUFReader(str(path)), "general.architecture")
    return ARCHITECTURES.get(arch, FrozenLlama)(path)
