"""The torch models of a GGUF base, by architecture: what the training recipes compute against.

llama and gemma3 have hand-written models (safechat/convert/llama_torch.py, safechat/convert/gemma3_torch.py: the
joint recipe's LoRA hook, and a `cls_forward` that is faster to train, `bench frozen_speed`); every
other family the importer knows runs through transformers (safechat/convert/hf_frozen.py), the same model
`verify` checks llama.cpp against.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from runtime.gguf_io import ConvertError

from .gemma3_torch import FrozenGemma3
from .hf_frozen import FrozenHF
from .hf_reference import CONFIGS
from .llama_torch import FrozenLlama, _field

ARCHITECTURES = {"llama": FrozenLlama, "gemma3": FrozenGemma3}


def load_frozen(path: str | Path, impl: str = "auto"):
    """The frozen torch model for a GGUF file: `FrozenLlama` or `FrozenGemma3` for those architectures,
    `FrozenHF` (transformers) for the others; impl="transformers" takes `FrozenHF` for every one."""
    if impl not in ("auto", "transformers"):
        raise ValueError(f"impl must be 'auto' or 'transformers', not {impl!r}")
    arch = _field(gguf.GGUFReader(str(path)), "general.architecture")
    if impl == "auto" and arch in ARCHITECTURES:
        return ARCHITECTURES[arch](path)
    if arch not in CONFIGS:
        raise ConvertError(f"{path}: architecture {arch!r} has no torch model here; supported: {', '.join(CONFIGS)}")
    return FrozenHF(path)
