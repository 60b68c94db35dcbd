"""Merge weight deltas (the `joint` recipe's LoRA) into a GGUF, with numpy and gguf-py only.

A deltas file (`deltas.safetensors`, beside an artifact's `card.json`) holds, per touched GGUF
tensor NAME (shape (out, in) as gguf-py reads it), either low-rank factors `NAME.lora_a` (r, in)
and `NAME.lora_b` (out, r), LoRA's alpha/r scale already folded into B, so the delta is
`lora_b @ lora_a`; or a full `NAME.delta` (out, in). Merging dequantizes each touched tensor
(gguf.quants.dequantize), adds its delta and stores it back:

* mode "float" (default): F32 tensors stay F32, every other touched tensor becomes F16;
* "f16" / "f32": every touched tensor in that type;
* "keep": re-quantized to its own type where gguf-py can (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, BF16),
  else F16. A delta smaller than the quantization step is partly lost: prefer "float", then
  llama.cpp's quantizer (safechat/convert/quantize.py), which chooses per-tensor types.

Every untouched tensor is copied byte for byte. `merge_gguf` writes a merged copy of a GGUF;
`convert_gguf(..., deltas=...)` merges while folding in the safety rows (one pass, one file).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file, save_file

from .contract import STAMP_KEYS
from .gguf_io import ConvertError, Tensor, architecture, copied_fields, read_gguf, write_gguf

DELTAS = "deltas.safetensors"
VOCAB_TENSORS = ("token_embd.weight", "output.weight")
FORMAT = "safechat-deltas-1"
MODES = ("float", "f16", "f32", "keep")
_Q = gguf.GGMLQuantizationType


@dataclass
class Deltas:
    factors: dict[str, tuple[np.ndarray, np.ndarray]]   # name -> (A (r, in), B (out, r)); delta = B @ A
    full: dict[str, np.ndarray]                         # name -> delta (out, in)
    sha256: str = ""                                    # of the file they were read from

    @property
    def names(self) -> list[str]:
        return sorted(set(self.factors) | set(self.full))

    def shape(self, name: str) -> tuple[int, int]:
        if name in self.full:
            return tuple(self.full[name].shape)
        a, b = self.factors[name]
        return int(b.shape[0]), int(a.shape[1])

    def delta(self, name: str) -> np.ndarray:
        d = np.zeros(self.shape(name), np.float32)
        if name in self.factors:
            a, b = self.factors[name]
            d += b.astype(np.float32) @ a.astype(np.float32)
        if name in self.full:
            d += self.full[name].astype(np.float32)
        return d


def save_deltas(directory: str | Path, factors: dict | None = None, full: dict | None = None) -> Path:
    """Write `deltas.safetensors` into directory; returns its path."""
    t = {}
    for name, (a, b) in (factors or {}).items():
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{name}: LoRA factors must be A (r, in) and B (out, r)")
        t[name + ".lora_a"] = np.ascontiguousarray(a, np.float32)
        t[name + ".lora_b"] = np.ascontiguousarray(b, np.float32)
    for name, d in (full or {}).items():
        t[name + ".delta"] = np.ascontiguousarray(d, np.float32)
    path = Path(directory) / DELTAS
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path), metadata={"format": FORMAT})
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_deltas(directory: str | Path) -> Deltas | None:
    """The deltas in an artifact directory (or a deltas file), or None when it has none."""
    p = Path(directory)
    p = p / DELTAS if p.is_dir() else p
    if not p.is_file():
        return None
    try:
        t = load_file(str(p))
    except Exception as e:
        raise ConvertError(f"{p}: cannot read the weight deltas: {e}") from None
    factors, full = {}, {}
    for key, arr in t.items():
        name, _, kind = key.rpartition(".")
        if kind == "delta":
            full[name] = arr
        elif kind == "lora_a":
            b = t.get(name + ".lora_b")
            if b is None or b.shape[1] != arr.shape[0]:
                raise ConvertError(f"{p}: {name}.lora_a has no matching {name}.lora_b")
            factors[name] = (arr, b)
        elif kind != "lora_b":
            raise ConvertError(f"{p}: unexpected tensor {key!r} (expected NAME.lora_a/.lora_b/.delta)")
    orphans = [k for k in t if k.endswith(".lora_b") and k[:-len(".lora_b")] not in factors]
    if orphans:
        raise ConvertError(f"{p}: {orphans[0]} has no matching .lora_a")
    return Deltas(factors, full, file_sha256(p))


def check_deltas(reader: gguf.GGUFReader, deltas: Deltas, where: str) -> dict[str, gguf.ReaderTensor]:
    """Every delta names a 2D tensor of the base with its shape, and is finite; returns those tensors."""
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for name in deltas.names:
        t = tensors.get(name)
        if t is None:
            raise ConvertError(f"the weight deltas touch {name}, which {where} does not have")
        shape = (int(t.shape[1]), int(t.shape[0])) if len(t.shape) == 2 else None
        if shape != deltas.shape(name):
            raise ConvertError(f"{name}: delta shape {deltas.shape(name)} does not match {where}'s {shape}")
        arrays = deltas.factors.get(name, ()) + ((deltas.full[name],) if name in deltas.full else ())
        if not all(np.isfinite(a).all() for a in arrays):
            raise ConvertError(f"{name}: the weight delta contains NaN or inf")
        out[name] = t
    return out


def merged_tensor(t: gguf.ReaderTensor, delta: np.ndarray, mode: str = "float") -> tuple[np.ndarray, _Q]:
    """Raw data and type of `t` with `delta` (out, in) added, stored as `mode` says."""
    if mode not in MODES:
        raise ValueError(f"merge mode must be one of {MODES}, got {mode!r}")
    src = t.tensor_type
    w = gguf.quants.dequantize(t.data, src).astype(np.float32).reshape(delta.shape) + delta
    if mode == "f32" or (mode == "float" and src == _Q.F32):
        return w.astype(np.float32), _Q.F32
    if mode == "keep" and src == _Q.F32:
        return w.astype(np.float32), _Q.F32
    if mode == "keep" and src != _Q.F16:
        try:
            return gguf.quants.quantize(w, src), src
        except (NotImplementedError, gguf.quants.QuantError):
            pass  # gguf-py cannot write this type: F16 below
    h = w.astype(np.float16)
    if not np.isfinite(h).all():
        raise ConvertError(f"{t.name}: merged weights overflow F16; use mode 'f32'")
    return h, _Q.F16


def merge_plan(reader: gguf.GGUFReader, card: dict, deltas: Deltas | None, where: str,
               mode: str = "float") -> dict[str, tuple[np.ndarray, _Q]]:
    """Merged tensors (name -> (data, type)) for a conversion; {} when there are no deltas.

    Fails closed: an artifact whose card declares deltas cannot be converted without them
    (its [CLS] head was trained on the adapted model and would be wrong on the base).
    """
    declared = card.get("deltas")
    if deltas is None:
        if declared:
            raise ConvertError(f"the artifact carries weight deltas ({declared.get('file', DELTAS)}, "
                               f"{declared.get('tensors', '?')} tensors) that must be merged with it: pass "
                               "deltas=runtime.merge.load_deltas(ARTIFACT_DIR)")
        return {}
    if declared and declared.get("sha256") and declared["sha256"] != deltas.sha256:
        raise ConvertError("the weight deltas do not belong to this artifact (sha256 differs from its card)")
    rows = [n for n in deltas.names if n in VOCAB_TENSORS]
    if rows:  # the converter rebuilds these from the base to append the safety rows
        raise ConvertError(f"weight deltas on {', '.join(rows)} are not supported: the vocabulary matrices "
                           "are rebuilt by the converter (train LoRA on attention/MLP projections only)")
    touched = check_deltas(reader, deltas, where)
    return {name: merged_tensor(t, deltas.delta(name), mode) for name, t in touched.items()}


def merge_gguf(base: str | Path, deltas: Deltas, out: str | Path, *, mode: str = "float",
               progress: bool = False) -> Path:
    """Write `base` with the deltas merged into `out` (atomic); every other byte-level tensor unchanged."""
    reader = read_gguf(base)
    arch = architecture(reader, str(base))
    merged = merge_plan(reader, {}, deltas, str(base), mode)
    tensors: list[Tensor] = [(t.name, *merged[t.name]) if t.name in merged else (t.name, t.data, t.tensor_type)
                             for t in reader.tensors]
    # the weights change: a verification stamp measured on the old ones no longer holds
    return write_gguf(out, arch, copied_fields(reader, drop=lambda k: k in STAMP_KEYS), tensors, progress=progress)
