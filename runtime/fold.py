"""Base GGUF + safety artifact -> safe GGUF (docs/design.md section 2), with gguf-py only.

Three control tokens are appended to the vocabulary: `<|safety|>` ([CLS]), `<|safe|>`,
`<|unsafe|>` (an artifact with K chained side rows puts K-1 `<|safety_side_i|>` tokens before
them and lists their ids in `safety.side_token_ids`, safety format 2). Their rows are appended to the input embedding and, for tied models, that
same matrix is the output projection, so the [CLS] position's logits at the two label ids
*are* the classifier logits. Untied models get the head rows in `output.weight`. Every other
tensor is copied byte for byte. The new rows are stored in the embedding's own type
(Q8_0 for the default base), re-quantized by gguf-py; the rest of that tensor is unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from .artifact import Artifact
from .gguf_io import SKIP, ConvertError, architecture, field_kv, read_gguf, scalar_kv, write_gguf
from .merge import load_deltas, merge_plan
from .contract import (CATEGORIES, CONTROVERSIAL_TOKEN, MAX_CHECK_TOKENS, PREFIX, SIDE_TOKEN_IDS, SPECIAL_TOKENS,
                       SafetyMeta, category_token_name, side_token_name)

__all__ = ["SUPPORTED_ARCHITECTURES", "ConvertError", "check_compatible", "convert_gguf", "read_gguf"]

# Architectures a safety artifact folds into: the fold only appends rows to token_embd/output and adds
# metadata, the same for each; tests/test_hf_families.py checks the folded [CLS] of each against
# transformers. (Training and `convert verify` need a torch reference: llama and gemma3 for now.)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")


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
    """How many trailing tokens to remove before appending ours: 0 for a base, 3 (+ its side tokens) for a
    safe model re-converted with force (its safety tokens must be the last ones, as this converter writes them)."""
    has_meta = any(k.startswith(PREFIX) for k in reader.fields)
    present = [s for s in SPECIAL_TOKENS if s in tokens]
    if not has_meta and not present:
        return 0
    what = "safety metadata" if has_meta else f"the tokens {present}"
    if not force:
        raise ConvertError(f"{where} already carries {what}: it is a safe model already; convert from its base "
                           "model, or pass --force (force=True) to replace its safety signal")
    side = reader.fields.get(PREFIX + SIDE_TOKEN_IDS)
    side_ids = json.loads(side.contents()) if side is not None else []
    cats = reader.fields.get(PREFIX + CATEGORIES)
    cat_names = json.loads(cats.contents()) if cats is not None else []
    cat_tokens = [category_token_name(c) for c in cat_names] + ([CONTROVERSIAL_TOKEN] if cat_names else [])
    ours = cat_tokens + [side_token_name(i + 1) for i in range(len(side_ids))] + list(SPECIAL_TOKENS)
    n, m = len(tokens), len(ours)
    ids_ok = all(int(reader.fields[PREFIX + key].contents()) == n - 3 + i
                 for i, key in enumerate(("cls_token_id", "safe_token_id", "unsafe_token_id"))
                 if PREFIX + key in reader.fields) and side_ids == list(range(n - 3 - len(side_ids), n - 3))
    if list(tokens[-m:]) != ours or any(s in tokens[:-m] for s in SPECIAL_TOKENS) or not ids_ok:
        raise ConvertError(f"{where} carries {what} but not as the last tokens {ours}: "
                           "cannot replace them, even with --force; convert from its base model")
    return m


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
    if len(art.side_rows) > MAX_CHECK_TOKENS:
        raise ConvertError(f"the artifact has {len(art.side_rows)} side rows; at most {MAX_CHECK_TOKENS} are supported")
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


_FLOAT_TYPES = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _as_f16(data, qtype) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor's values as F16 (F32 tensors, the norms, stay F32); the same numbers llama.cpp's own
    F16 quantization would write from this source: dequantized to float32, rounded to float16."""
    if qtype in _FLOAT_TYPES:
        return data, qtype
    return gguf.quants.dequantize(np.asarray(data), qtype).astype(np.float16), gguf.GGMLQuantizationType.F16


def convert_gguf(base: str | Path, art: Artifact, out: str | Path, *, progress: bool = True,
                 force: bool = False, deltas=None, base_name: str | None = None,
                 weights: str | None = None) -> SafetyMeta:
    """Write the safe model to `out` atomically (temp file + rename). Returns its metadata.

    `base` is a GGUF (a Hugging Face checkpoint folder goes through `safechat.convert.hf_import.convert_any`,
    the offline converter). A base that is already a safe model is refused unless `force`: then its
    safety tokens, rows and `safety.*` metadata (a verification stamp included) are replaced by this
    artifact's. `weights="F16"` stores every quantized tensor as F16 (the [CLS] and head rows too, unrounded):
    llama.cpp then computes in float, as the reference does, instead of quantizing activations to 8 bits
    (the default model's precision was chosen so: docs/results/default.md, *Precision*). The header's
    `general.file_type` is that of the tensors written (`gguf_io.write_gguf`), not the base's: MOSTLY_F16
    for a quantized base folded to F16.
    """
    if weights not in (None, "F16"):
        raise ConvertError(f"weights must be None (the base's own types) or 'F16', got {weights!r}")
    if deltas is None and art.source is not None and art.card.get("deltas"):
        deltas = load_deltas(art.source)  # joint recipe: the artifact's own weight deltas
    if Path(base).is_dir():
        raise ConvertError(f"{base} is a folder (a Hugging Face checkpoint?): fold it with "
                           "`safechat convert --base DIR` (safechat.convert.hf_import.convert_any)")
    reader = read_gguf(base)
    facts = check_compatible(reader, art, str(base), force=force)
    merged = merge_plan(reader, art.card, deltas, str(base))  # joint recipe: weight deltas (runtime/merge.py)
    n_vocab, tied, arch = facts["n_vocab"], facts["tied"], facts["arch"]
    # [base vocabulary][category rows + controversial row, if any][K-1 side tokens][cls, safe, unsafe]
    cat_names = art.categories
    read_rows = (np.concatenate([art.category_head, art.controversial_head]) if cat_names
                 else np.zeros((0, art.hidden_size), np.float32))  # output-only rows, read at a check
    c = len(read_rows)
    rows = art.side_rows                     # (K, D): K-1 side tokens, then the [CLS]
    k = len(rows)
    side_ids = tuple(range(n_vocab + c, n_vocab + c + k - 1))
    cls_id, safe_id, unsafe_id = n_vocab + c + k - 1, n_vocab + c + k, n_vocab + c + k + 1
    cat_meta = {}
    if cat_names:
        record = art.card["categories"]
        cat_meta = {"categories": tuple(cat_names), "category_token_ids": tuple(range(n_vocab, n_vocab + c - 1)),
                    "category_thresholds": tuple(float(record["thresholds"][n]) for n in cat_names),
                    "controversial_token_id": n_vocab + c - 1,
                    "controversial_threshold": float(record["controversial_threshold"])}
    meta = SafetyMeta(2 if side_ids else 1, cls_id, safe_id, unsafe_id, art.threshold,
                      base_model=str(art.card.get("base_model", base_name or Path(base).name)),
                      trained_with=str(art.card.get("trained_with", art.digest()[:16])),
                      metrics=art.card.get("metrics", {}), answer_threshold=art.answer_threshold,
                      side_token_ids=side_ids, every=art.every, surprisal_threshold=art.surprisal_threshold,
                      surprisal_window=art.surprisal_window, window=art.window, **cat_meta)
    if tied:
        emb_rows = np.concatenate([read_rows, rows, art.head])
        out_rows = None
    else:  # the label tokens are never fed: zero input rows; side tokens are never predicted: zero output rows
        emb_rows = np.concatenate([np.zeros_like(read_rows), rows, np.zeros_like(art.head)])
        out_rows = np.concatenate([read_rows, np.zeros_like(rows), art.head])
    names = ([category_token_name(n) for n in cat_names] + ([CONTROVERSIAL_TOKEN] if cat_names else [])
             + [side_token_name(i + 1) for i in range(k - 1)] + list(SPECIAL_TOKENS))

    appended = {"tokenizer.ggml.tokens": names,
                "tokenizer.ggml.token_type": [int(gguf.TokenType.CONTROL)] * len(names),
                "tokenizer.ggml.scores": [0.0] * len(names)}

    def value(key: str, field):  # None: copy as is
        if key in appended:
            return list(field.contents())[:n_vocab] + appended[key]
        return n_vocab + len(names) if key == f"{arch}.vocab_size" else None

    # the old safety.* keys go (only with force): this artifact's are written instead
    kv = [field_kv(k, f, value(k, f)) for k, f in reader.fields.items()
          if not k.startswith((*SKIP, PREFIX)) and k != "general.architecture"]
    kv += [scalar_kv(k, v) for k, v in meta.to_kv().items()]

    tensors = []
    for t in reader.tensors:
        extra = emb_rows if t.name == "token_embd.weight" else out_rows if t.name == "output.weight" else None
        if extra is not None and weights == "F16":  # dequantize the base rows, append ours unrounded
            base_rows = np.asarray(t.data).reshape(int(t.shape[1]), -1)[:n_vocab]
            full = base_rows if t.tensor_type in _FLOAT_TYPES else gguf.quants.dequantize(base_rows, t.tensor_type)
            data, qtype = np.concatenate([full.astype(np.float32), extra]).astype(np.float16), \
                gguf.GGMLQuantizationType.F16
        elif extra is not None:
            data, qtype = _append_rows(t, extra, n_vocab)
        elif t.name in merged:
            data, qtype = merged[t.name]
        else:
            data, qtype = t.data, t.tensor_type
        if weights == "F16":
            data, qtype = _as_f16(data, qtype)
        tensors.append((t.name, data, qtype))
    write_gguf(out, arch, kv, tensors, progress=progress)
    return meta

