"""tokenizer.json (a Hugging Face fast tokenizer) -> llama.cpp's `tokenizer.ggml.*` keys, torch-free.

Byte-level BPE only (GPT-2 style: SmolLM, Llama 3.x, Qwen2/2.5/3, Phi-4-mini): the vocabulary,
merges and special tokens carry over as they are; what llama.cpp needs besides is the name of the
pre-tokenizer regex, which it keeps in its own table. The regexes this importer recognises are
listed in PRE_TOKENIZERS; tests/test_hf_families.py checks that llama.cpp then splits text exactly
as the Hugging Face tokenizer does. SentencePiece-style tokenizers (Gemma, Mistral v0.x, Phi-3) are
refused with a message: their GGUFs come from llama.cpp's convert_hf_to_gguf.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf

from runtime.gguf_io import ConvertError, scalar_kv

# the Split regex of a `Sequence[Split, ByteLevel(use_regex=False)]` pre-tokenizer -> llama.cpp's name for it
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3.x
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3
}


def pre_tokenizer(pre: dict | None, d: Path) -> str:
    """llama.cpp's pre-tokenizer name for the byte-level layouts this importer knows."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in steps]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's byte-level regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE_TOKENIZERS and steps[0].get("behavior") == "Isolated":
            return PRE_TOKENIZERS[regex]
    raise ConvertError(f"{d}/tokenizer.json: pre-tokenizer {kinds or None} is not one this importer knows (GPT-2 "
                       "byte-level, single digits + byte-level as in SmolLM2, or the Llama 3 and Qwen2 split "
                       "regexes); convert the checkpoint with llama.cpp's convert_hf_to_gguf.py and pass the GGUF")


def tokenizer_kv(d: Path, n_vocab: int) -> list:
    try:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{d}: no tokenizer.json (a fast tokenizer is required)") from None
    model = tj.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise ConvertError(f"{d}/tokenizer.json: only byte-level BPE tokenizers (GPT-2 style) are supported")
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for tok, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = tok
    for a in tj.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # the embedding is padded beyond the tokenizer: unused rows, as convert_hf_to_gguf.py
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = gguf.SpecialVocab(d, load_merges=False, n_vocab=n_vocab)
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    kv = [("tokenizer.ggml.model", "gpt2", S.STRING, None),
          ("tokenizer.ggml.pre", pre_tokenizer(tj.get("pre_tokenizer"), d), S.STRING, None),
          ("tokenizer.ggml.tokens", tokens, A, S.STRING),
          ("tokenizer.ggml.token_type", types, A, S.INT32),
          ("tokenizer.ggml.merges", merges, A, S.STRING)]
    kv += [scalar_kv(f"tokenizer.ggml.{typ}_token_id", int(i)) for typ, i in special.special_token_ids.items()]
    # said explicitly, also when the folder does not: llama.cpp would otherwise guess by architecture (a
    # BOS for llama and gemma3), where the Hugging Face tokenizer adds only what it is configured to add
    adds = {"bos": False, "eos": False, **special.add_special_token}
    kv += [(f"tokenizer.ggml.add_{typ}_token", bool(v), S.BOOL, None) for typ, v in adds.items()]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, S.STRING, None))
    return kv
