"""Base GGUF + safety artifact -> safe GGUF (DESIGN.md section 2), with gguf-py only.

Three control tokens are appended to the vocabulary: `<|safety|>` ([CLS]), `<|safe|>`,
`<|unsafe|>`. Their rows are appended to the input embedding and, for tied models, that
same matrix is the output projection, so the [CLS] position's logits at the two label ids
*are* the classifier logits. Untied models get the head rows in `output.weight`. Every other
tensor is copied byte for byte. The new rows are stored in the embedding's own type
(Q8_0 for the default base), re-quantized by gguf-py; the rest of that tensor is unchanged.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from .artifact import Artifact
from .gguf_io import SKIP, ConvertError, architecture, field_kv, read_gguf, scalar_kv, write_gguf
from .merge import load_deltas, merge_plan
from .metadata import FORMAT_VERSION, PREFIX, SPECIAL_TOKENS, SafetyMeta

__all__ = ["SUPPORTED_ARCHITECTURES", "ConvertError", "check_compatible", "convert_gguf", "read_gguf"]

# Architectures whose safety artifacts we can train and verify (train/llama_torch.py is the reference).
SUPPORTED_ARCHITECTURES = ("llama",)


def _append_rows(t: gguf.ReaderTensor, rows: np.ndarray, keep: int) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's first `keep` rows (raw data) with `rows` (k, ne0) appended, in the tensor's own type."""
    qtype = t.tensor_type
    base = np.asarray(t.data).reshape(int(t.shape[1]), -1)[:keep]   # rows are independent in every type
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return np.concatenate([base, rows.astype(base.dtype)]), qtype
    try:
        extra = gguf.quants.quantize(rows.astype(np.float32), qtype)
    except NotImplementedError:
        # gguf-py cannot write this type: store the whole matrix as F16 instead
        full = gguf.quants.dequantize(base, qtype).reshape(-1, int(t.shape[0]))
        return np.concatenate([full, rows]).astype(np.float16), gguf.GGMLQuantizationType.F16
    return np.concatenate([base, extra]), qtype


def _safety_to_strip(reader: gguf.GGUFReader, tokens: list, where: str, force: bool) -> int:
    """How many trailing tokens to remove before appending ours: 0 for a base, 3 for a safe model
    re-converted with force (its safety tokens must be the last three, as this converter writes them)."""
    has_meta = any(k.startswith(PREFIX) for k in reader.fields)
    present = [s for s in SPECIAL_TOKENS if s in tokens]
    if not has_meta and not present:
        return 0
    what = "safety metadata" if has_meta else f"the tokens {present}"
    if not force:
        raise ConvertError(f"{where} already carries {what}: it is a safe model already; convert from its base "
                           "model, or pass --force (force=True) to replace its safety signal")
    n = len(tokens)
    ids_ok = all(int(reader.fields[PREFIX + k].contents()) == n - 3 + i
                 for i, k in enumerate(("cls_token_id", "safe_token_id", "unsafe_token_id"))
                 if PREFIX + k in reader.fields)
    if list(tokens[-3:]) != list(SPECIAL_TOKENS) or any(s in tokens[:-3] for s in SPECIAL_TOKENS) or not ids_ok:
        raise ConvertError(f"{where} carries {what} but not as the last three tokens {list(SPECIAL_TOKENS)}: "
                           "cannot replace them, even with --force; convert from its base model")
    return 3


def check_compatible(reader: gguf.GGUFReader, art: Artifact, where: str, *, force: bool = False) -> dict:
    """Check the artifact against the base before writing anything; return facts about the base."""
    arch = architecture(reader, where)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{where}: architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ConvertError(f"{where}: no token_embd.weight tensor")
    emb = tensors["token_embd.weight"]
    hidden = int(emb.shape[0])
    if art.hidden_size != hidden:
        raise ConvertError(f"the artifact is for hidden size {art.hidden_size}; {where} has {hidden}")
    if art.card.get("architecture", arch) != arch:
        raise ConvertError(f"the artifact was trained for {art.card.get('architecture')}, {where} is {arch}")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    strip = _safety_to_strip(reader, tokens, where, force)
    n_vocab = int(emb.shape[1]) - strip
    if "output.weight" in tensors and int(tensors["output.weight"].shape[1]) != n_vocab + strip:
        raise ConvertError(f"{where}: output.weight has {int(tensors['output.weight'].shape[1])} rows, "
                           f"token_embd.weight {n_vocab + strip}")
    if art.card.get("base_vocab_size", n_vocab) != n_vocab:
        raise ConvertError(f"the artifact expects a base vocabulary of {art.card['base_vocab_size']}; {where} has {n_vocab}")
    return {"arch": arch, "n_vocab": n_vocab, "hidden": hidden, "tied": "output.weight" not in tensors,
            "strip": strip}


def convert_gguf(base: str | Path, art: Artifact, out: str | Path, *, progress: bool = True,
                 force: bool = False, deltas=None, base_name: str | None = None) -> SafetyMeta:
    """Write the safe model to `out` atomically (temp file + rename). Returns its metadata.

    `base` is a GGUF, or a local Hugging Face Llama checkpoint folder (`hf_import.py`).
    A base that is already a safe model is refused unless `force`: then its safety tokens, rows and
    `safety.*` metadata (a verification stamp included) are replaced by this artifact's.
    """
    if deltas is None and art.source is not None and art.card.get("deltas"):
        deltas = load_deltas(art.source)  # joint recipe: the artifact's own weight deltas
    if Path(base).is_dir():
        from .hf_import import convert_hf
        return convert_hf(base, art, out, progress=progress, force=force, deltas=deltas)
    reader = read_gguf(base)
    facts = check_compatible(reader, art, str(base), force=force)
    merged = merge_plan(reader, art.card, deltas, str(base))  # joint recipe: weight deltas (convert/merge.py)
    n_vocab, tied, arch = facts["n_vocab"], facts["tied"], facts["arch"]
    cls_id, safe_id, unsafe_id = n_vocab, n_vocab + 1, n_vocab + 2
    meta = SafetyMeta(FORMAT_VERSION, cls_id, safe_id, unsafe_id, art.threshold,
                      base_model=str(art.card.get("base_model", base_name or Path(base).name)),
                      trained_with=str(art.card.get("trained_with", art.digest()[:16])),
                      metrics=art.card.get("metrics", {}), answer_threshold=art.answer_threshold)
    zeros = np.zeros_like(art.cls_embedding)
    if tied:
        emb_rows = np.stack([art.cls_embedding, art.head[0], art.head[1]])
        out_rows = None
    else:  # the label tokens are never fed: zero input rows; the [CLS] is never predicted: zero output row
        emb_rows = np.stack([art.cls_embedding, zeros, zeros])
        out_rows = np.stack([zeros, art.head[0], art.head[1]])

    appended = {"tokenizer.ggml.tokens": list(SPECIAL_TOKENS),
                "tokenizer.ggml.token_type": [int(gguf.TokenType.CONTROL)] * 3,
                "tokenizer.ggml.scores": [0.0] * 3}

    def value(key: str, field):  # None: copy as is
        if key in appended:
            return list(field.contents())[:n_vocab] + appended[key]
        return n_vocab + 3 if key == f"{arch}.vocab_size" else None

    # the old safety.* keys go (only with force): this artifact's are written instead
    kv = [field_kv(k, f, value(k, f)) for k, f in reader.fields.items()
          if not k.startswith((*SKIP, PREFIX)) and k != "general.architecture"]
    kv += [scalar_kv(k, v) for k, v in meta.to_kv().items()]

    tensors = []
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            data, qtype = _append_rows(t, emb_rows, n_vocab)
        elif t.name == "output.weight" and out_rows is not None:
            data, qtype = _append_rows(t, out_rows, n_vocab)
        elif t.name in merged:
            data, qtype = merged[t.name]
        else:
            data, qtype = t.data, t.tensor_type
        tensors.append((t.name, data, qtype))
    write_gguf(out, arch, kv, tensors, progress=progress)
    return meta

