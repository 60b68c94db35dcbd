"""Base GGUF + safety artifact -> safe GGUF (DESIGN.md section 2), with gguf-py only.

Three control tokens are appended to the vocabulary: `<|safety|>` ([CLS]), `<|safe|>`,
`<|unsafe|>`. Their rows are appended to the input embedding and, for tied models, that
same matrix is the output projection, so the [CLS] position's logits at the two label ids
*are* the classifier logits. Untied models get the head rows in `output.weight`. Every other
tensor is copied byte for byte. The new rows are stored in the embedding's own type
(Q8_0 for the default base), re-quantized by gguf-py; the rest of that tensor is unchanged.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np

from .artifact import Artifact
from .files import set_default_mode
from .metadata import FORMAT_VERSION, PREFIX, SPECIAL_TOKENS, SafetyMeta

_SKIP = ("GGUF.",)  # virtual fields of the reader


class ConvertError(ValueError):
    pass


def _field_value(field: gguf.ReaderField):
    return field.contents()


def _append_rows(t: gguf.ReaderTensor, rows: np.ndarray) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's raw data with `rows` (k, ne0) appended, in the tensor's own type."""
    qtype = t.tensor_type
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
        base = np.asarray(t.data).reshape(-1, int(t.shape[0]))
        return np.concatenate([base, rows.astype(dtype)]), qtype
    try:
        extra = gguf.quants.quantize(rows.astype(np.float32), qtype)
    except NotImplementedError:
        # gguf-py cannot write this type: store the whole matrix as F16 instead
        full = gguf.quants.dequantize(t.data, qtype).reshape(-1, int(t.shape[0]))
        return np.concatenate([full, rows]).astype(np.float16), gguf.GGMLQuantizationType.F16
    base = np.asarray(t.data).reshape(-1, extra.shape[1])
    return np.concatenate([base, extra]), qtype


def read_gguf(path: str | Path, what: str = "base model") -> gguf.GGUFReader:
    """Open a GGUF with gguf-py; a missing or unreadable file is a ConvertError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{what} not found: {p}")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:
        raise ConvertError(f"{p} is not a readable GGUF file: {e}") from None


def check_compatible(reader: gguf.GGUFReader, art: Artifact, where: str) -> dict:
    """Check the artifact against the base before writing anything; return facts about the base."""
    arch = reader.fields["general.architecture"].contents()
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConvertError(f"{where}: no token_embd.weight tensor")
    emb = tensors["token_embd.weight"]
    hidden, n_vocab = int(emb.shape[0]), int(emb.shape[1])
    if art.hidden_size != hidden:
        raise ConvertError(f"the artifact is for hidden size {art.hidden_size}; {where} has {hidden}")
    if art.card.get("architecture", arch) != arch:
        raise ConvertError(f"the artifact was trained for {art.card.get('architecture')}, {where} is {arch}")
    if art.card.get("base_vocab_size", n_vocab) != n_vocab:
        raise ConvertError(f"the artifact expects a base vocabulary of {art.card['base_vocab_size']}; {where} has {n_vocab}")
    if any(k.startswith(PREFIX) for k in reader.fields):
        raise ConvertError(f"{where} already carries safety metadata: it is a safe model already; "
                           "convert from its base model instead")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    clash = [s for s in SPECIAL_TOKENS if s in tokens]
    if clash:
        raise ConvertError(f"{where} already has tokens {clash}")
    return {"arch": arch, "n_vocab": n_vocab, "hidden": hidden, "tied": "output.weight" not in tensors}


def convert_gguf(base: str | Path, art: Artifact, out: str | Path, *, progress: bool = True) -> SafetyMeta:
    """Write the safe model to `out` atomically (temp file + rename). Returns its metadata."""
    reader = read_gguf(base)
    facts = check_compatible(reader, art, str(base))
    n_vocab, tied = facts["n_vocab"], facts["tied"]
    cls_id, safe_id, unsafe_id = n_vocab, n_vocab + 1, n_vocab + 2
    meta = SafetyMeta(FORMAT_VERSION, cls_id, safe_id, unsafe_id, art.threshold,
                      base_model=str(art.card.get("base_model", Path(base).name)),
                      trained_with=str(art.card.get("trained_with", art.digest()[:16])),
                      metrics=art.card.get("metrics", {}))
    zeros = np.zeros_like(art.cls_embedding)
    if tied:
        emb_rows = np.stack([art.cls_embedding, art.head[0], art.head[1]])
        out_rows = None
    else:
        emb_rows = np.stack([art.cls_embedding, zeros, zeros])
        out_rows = np.stack([zeros, art.head[0], art.head[1]])

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, facts["arch"])
        for key, field in reader.fields.items():
            if key.startswith(_SKIP) or key == "general.architecture":
                continue
            val = _field_value(field)
            if key == "tokenizer.ggml.tokens":
                val = list(val) + list(SPECIAL_TOKENS)
            elif key == "tokenizer.ggml.token_type":
                val = list(val) + [int(gguf.TokenType.CONTROL)] * 3
            elif key == "tokenizer.ggml.scores":
                val = list(val) + [0.0] * 3
            elif key == f"{facts['arch']}.vocab_size":
                val = n_vocab + 3
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, val, field.types[0], sub_type=sub)
        for key, val in meta.to_kv().items():
            if isinstance(val, int):
                w.add_uint32(key, val)
            elif isinstance(val, float):
                w.add_float32(key, val)
            else:
                w.add_string(key, val)
        for t in reader.tensors:
            if t.name == "token_embd.weight":
                data, qtype = _append_rows(t, emb_rows)
            elif t.name == "output.weight" and out_rows is not None:
                data, qtype = _append_rows(t, out_rows)
            else:
                data, qtype = t.data, t.tensor_type
            w.add_tensor(t.name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
        set_default_mode(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return meta
