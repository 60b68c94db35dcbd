"""Read a GGUF with gguf-py and write a modified copy of it, atomically (torch-free).

The converter (`gguf_safe.py`) and the verification stamp (`stamp.py`) both copy a GGUF with a
few changes: some metadata keys replaced or added, some tensors changed, every other tensor copied
byte for byte. `write_gguf` is that one copy loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import gguf
import numpy as np

from .files import atomic_output

SKIP = ("GGUF.",)  # virtual fields of the reader

# (key, value, value type, array element type or None)
KV = tuple[str, Any, gguf.GGUFValueType, "gguf.GGUFValueType | None"]
# (name, raw data, tensor type)
Tensor = tuple[str, np.ndarray, gguf.GGMLQuantizationType]


class ConvertError(ValueError):
    pass


def read_gguf(path: str | Path, what: str = "base model") -> gguf.GGUFReader:
    """Open a GGUF with gguf-py; a missing or unreadable file is a ConvertError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{what} not found: {p}")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:
        raise ConvertError(f"{p} is not a readable GGUF file: {e}") from None


def architecture(reader: gguf.GGUFReader, where: str) -> str:
    f = reader.fields.get("general.architecture")
    if f is None:
        raise ConvertError(f"{where} has no general.architecture: not a model GGUF")
    return str(f.contents())


def field_kv(key: str, field: gguf.ReaderField, value: Any = None) -> KV:
    """The field as a KV tuple (with `value` instead of its own, when given)."""
    sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
    return key, field.contents() if value is None else value, field.types[0], sub


def scalar_kv(key: str, value: int | float | str) -> KV:
    if isinstance(value, bool):
        return key, value, gguf.GGUFValueType.BOOL, None
    if isinstance(value, int):
        return key, value, gguf.GGUFValueType.UINT32, None
    if isinstance(value, float):
        return key, value, gguf.GGUFValueType.FLOAT32, None
    return key, str(value), gguf.GGUFValueType.STRING, None


def copied_fields(reader: gguf.GGUFReader, drop=lambda key: False) -> list[KV]:
    """Every real metadata field of `reader` except general.architecture and those `drop` selects."""
    return [field_kv(k, f) for k, f in reader.fields.items()
            if not k.startswith(SKIP) and k != "general.architecture" and not drop(k)]


def copied_tensors(reader: gguf.GGUFReader) -> list[Tensor]:
    return [(t.name, t.data, t.tensor_type) for t in reader.tensors]


def write_gguf(out: str | Path, arch: str, kv: Iterable[KV], tensors: Iterable[Tensor], *,
               progress: bool = False) -> Path:
    """Write a GGUF to `out` atomically (temp file beside it + rename)."""
    out = Path(out)
    with atomic_output(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        for key, val, vtype, sub in kv:
            if key == "general.alignment":  # the writer must pad to it, not only record it
                w.data_alignment = int(val)
            w.add_key_value(key, val, vtype, sub_type=sub)
        for name, data, qtype in tensors:
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    return out
