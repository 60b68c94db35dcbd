"""A local Hugging Face checkpoint directory -> base GGUF, torch-free (numpy, gguf-py).

    convert_any("path/to/checkpoint-dir", artifact, "safe.gguf")    # or: safechat convert --base DIR

The directory holds `config.json` (one of the families of `hf_families.FAMILIES`: Llama, Mistral,
Qwen2/2.5, Qwen3, Gemma 3 text, Phi-3/4), `model.safetensors` (or shards listed in
`model.safetensors.index.json`), `tokenizer.json` (a byte-level BPE, `hf_tokenizer`) and optionally
`tokenizer_config.json` (chat template, bos/eos, add_bos_token). Weight matrices keep their dtype
(F32, F16 or BF16); norms and biases become F32, as llama.cpp expects. Per-family differences
(permuted Q/K, Gemma's norms, rope scaling) live in `hf_families`.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np

from runtime.gguf_io import ConvertError, scalar_kv, write_gguf
from runtime.files import temp_beside
from runtime.fold import convert_gguf

from .hf_families import FAMILIES, gguf_names, llama3_rope_factors, metadata, transform
from .hf_families import read_config as family_config
from .hf_tokenizer import tokenizer_kv

_DTYPES = {"F32": (np.float32, gguf.GGMLQuantizationType.F32), "F16": (np.float16, gguf.GGMLQuantizationType.F16),
           "BF16": (np.uint16, gguf.GGMLQuantizationType.BF16)}
HF_ARCHITECTURES = tuple(FAMILIES)


def read_config(d: Path) -> dict:
    """config.json, checked: a family this importer supports (hf_families.read_config)."""
    try:
        c = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"{d} is a folder but not a Hugging Face checkpoint: no config.json") from None
    except ValueError as e:
        raise ConvertError(f"{d}/config.json is not valid JSON: {e}") from None
    return family_config(d, c)


# -- safetensors, read by hand (numpy has no bfloat16: BF16 stays raw uint16 for gguf-py) ------

def _safetensors(path: Path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ConvertError(f"{path.name}: tensor {name} has dtype {info['dtype']}; supported: F32, F16, BF16")
        dtype, qtype = _DTYPES[info["dtype"]]
        a, b = info["data_offsets"]
        out[name] = (data[a:b].view(dtype).reshape(info["shape"]), qtype)
    return out


def _tensors(d: Path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    out = {}
    for f in files:
        if not (d / f).is_file():
            raise ConvertError(f"{d}: {f} not found (safetensors weights are required)")
        out.update(_safetensors(d / f))
    return out


def _as_f32(a: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _gguf_tensors(d: Path, c: dict) -> list:
    src = _tensors(d)
    names = gguf_names(c, src, d)
    out = []
    for hf, name in names.items():
        a, qtype = src[hf]
        if a.ndim == 1:  # norms and biases: F32, as llama.cpp expects
            a, qtype = _as_f32(a, qtype), gguf.GGMLQuantizationType.F32
        a = transform(c, name, a)
        out.append((name, np.ascontiguousarray(a), qtype))
    if c["rope"]["kind"] == "llama3":
        out.append(("rope_freqs.weight", llama3_rope_factors(c), gguf.GGMLQuantizationType.F32))
    return out


def check_config(d: Path, hidden: int, base_vocab: int | None) -> dict:
    """The artifact-facing facts, before anything is written (hidden size and base vocabulary)."""
    c = read_config(d)
    if hidden != c["hidden"]:
        raise ConvertError(f"the artifact is for hidden size {hidden}; {d} has {c['hidden']}")
    if base_vocab is not None and base_vocab != c["n_vocab"]:
        raise ConvertError(f"the artifact expects a base vocabulary of {base_vocab}; {d} has {c['n_vocab']}")
    return c


def hf_to_gguf(d: str | Path, out: str | Path, *, progress: bool = False) -> Path:
    """Write the checkpoint in `d` as a base GGUF (its family's architecture) to `out`, atomically."""
    d = Path(d)
    c = read_config(d)
    tensors = _gguf_tensors(d, c)
    emb = next(t for t in tensors if t[0] == "token_embd.weight")
    if emb[1].shape != (c["n_vocab"], c["hidden"]):
        raise ConvertError(f"{d}: embed_tokens is {tuple(emb[1].shape)}, config says ({c['n_vocab']}, {c['hidden']})")
    a, S = c["arch"], gguf.GGUFValueType
    kv = [("general.name", str(c["name"]), S.STRING, None)]  # write_gguf adds general.file_type: its tensors'
    kv += [scalar_kv(k, v) for k, v in metadata(c)]
    kv += tokenizer_kv(d, c["n_vocab"])
    return write_gguf(out, a, kv, tensors, progress=progress)


def convert_hf(d: str | Path, art, out: str | Path, **kw):
    """`convert_gguf` for a checkpoint folder: checked against the artifact first, then imported to a
    temp GGUF beside `out`, folded, and the temp file removed."""
    d = Path(d)
    check_config(d, art.hidden_size, art.card.get("base_vocab_size"))
    tmp = temp_beside(out, ".base.tmp")
    try:
        hf_to_gguf(d, tmp, progress=kw.get("progress", False))
        return convert_gguf(tmp, art, out, base_name=d.name, **kw)
    finally:
        tmp.unlink(missing_ok=True)


def convert_any(base: str | Path, art, out: str | Path, **kw):
    """`runtime.fold.convert_gguf` for a GGUF base, `convert_hf` for a Hugging Face checkpoint folder."""
    return convert_hf(base, art, out, **kw) if Path(base).is_dir() else convert_gguf(base, art, out, **kw)
