"""Read a GGUF with gguf-py and write a modified copy of it, atomically (torch-free).

The converter (`fold.py`), the weight merge (`merge.py`), the Hugging Face importer and the verification
stamp (`safechat/convert/stamp.py`) all copy a GGUF with a few changes: some metadata keys replaced or added, some
tensors changed, every other tensor copied byte for byte. `write_gguf` is that one copy loop, and it
writes the `general.file_type` of the tensors the file holds.
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


FILE_TYPE = "general.file_type"
_FLOAT_FILE_TYPES = {gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16}
_K_MIX = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama.cpp's guess for a K-quant majority


def guessed_file_type(qtypes: Iterable[gguf.GGMLQuantizationType]) -> gguf.LlamaFileType | None:
    """The file type of the most common tensor type, as llama.cpp's loader guesses it for a file that
    declares none (F32 -> ALL_F32, F16 -> MOSTLY_F16, Q4_K -> MOSTLY_Q4_K_M, ...); None for a type with
    no file type of its own."""
    counts: dict = {}
    top, n_top = None, 0
    for q in qtypes:
        counts[q] = counts.get(q, 0) + 1
        if counts[q] > n_top:
            top, n_top = q, counts[q]
    if top is None:
        return None
    if top == gguf.GGMLQuantizationType.F32:
        return gguf.LlamaFileType.ALL_F32
    name = gguf.GGMLQuantizationType(top).name
    return getattr(gguf.LlamaFileType, "MOSTLY_" + _K_MIX.get(name, name), None)


def true_file_type(declared: int | None, qtypes: Iterable[gguf.GGMLQuantizationType]) -> int | None:
    """The `general.file_type` a file holding tensors of `qtypes` must carry, given what it declared.

    A copied header must not outlive the tensors it described (a Q4_1 base folded to F16 weights said
    "Q4_1"): a float file, or a file declared float, gets the type of its tensors, as llama.cpp would guess
    it. Between two quantized types the declared one stays: it names llama.cpp's mix (Q4_K_M holds Q6_K
    and, on rows not a multiple of 256, Q5_0 tensors beside its Q4_K ones), which no count can recover."""
    guess = guessed_file_type(qtypes)
    if guess is None:
        return declared
    try:
        known = gguf.LlamaFileType(int(declared)) if declared is not None else None
    except ValueError:
        known = None
    if known is None or known == guess or known in _FLOAT_FILE_TYPES or guess in _FLOAT_FILE_TYPES:
        return int(guess)
    return int(known)


def _with_file_type(kv: list[KV], tensors: list[Tensor]) -> list[KV]:
    """`kv` with general.file_type set to `true_file_type` (in its place, or after the general.* keys)."""
    at = next((i for i, e in enumerate(kv) if e[0] == FILE_TYPE), None)
    ft = true_file_type(kv[at][1] if at is not None else None, [t[2] for t in tensors])
    if ft is None:
        return kv
    entry = (FILE_TYPE, int(ft), gguf.GGUFValueType.UINT32, None)
    if at is not None:
        return kv[:at] + [entry] + kv[at + 1:]
    after = max((i + 1 for i, e in enumerate(kv) if e[0].startswith("general.")), default=0)
    return kv[:after] + [entry] + kv[after:]


def write_gguf(out: str | Path, arch: str, kv: Iterable[KV], tensors: Iterable[Tensor], *,
               progress: bool = False) -> Path:
    """Write a GGUF to `out` atomically (temp file beside it + rename), with the `general.file_type` of the
    tensors it holds (`true_file_type`), whatever the copied header said."""
    out = Path(out)
    tensors = list(tensors)
    kv = _with_file_type(list(kv), tensors)
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
