"""tokenizer.json (a Hugging Face fast tokenizer) -> llama.cpp's `tokenizer.ggml.*` keys, torch-free.

Two kinds, as llama.cpp has them:

* byte-level BPE (GPT-2 style: SmolLM, Llama 3.x, Qwen2/2.5/3, Phi-4-mini's o200k split) -> `gpt2`: the vocabulary,
  merges and special tokens carry over as they are; what llama.cpp needs besides is the name of the
  pre-tokenizer regex, which it keeps in its own table (PRE_TOKENIZERS lists those recognised);
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.x, Phi-3/3.5, Gemma) -> `llama`
  (llama.cpp's SPM tokenizer): pieces spelled with "▁" for a space, `<0xXX>` byte pieces, and, instead
  of merges, a score per piece: llama.cpp merges the adjacent pair whose result scores highest, so a
  piece scores minus the rank of the first merge that makes it (pieces no merge makes score below
  all of them). Whether a space is put before the text (`add_space_prefix`) is read from the
  normalizer (Prepend "▁") or the Metaspace pre-tokenizer. llama.cpp puts it before every text
  that follows a special token and before a text that already begins with a space; a Metaspace
  puts it only where the text does not begin with one, and with prepend_scheme "first" only at
  the very start. There the GGUF tokenizes as llama.cpp's own convert_hf_to_gguf.py makes it do.

tests/test_hf_families.py checks that llama.cpp then splits text exactly as the Hugging Face
tokenizer does, for each layout. Anything else is refused with a message naming
convert_hf_to_gguf.py, whose GGUF `convert` takes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

from runtime.gguf_io import ConvertError, scalar_kv

# the Split regex of a `Sequence[Split, ByteLevel(use_regex=False)]` pre-tokenizer -> llama.cpp's name for it
PRE_TOKENIZERS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3.x
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "gpt-4o",  # Phi-4-mini (tiktoken's o200k_base split)
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
                       "byte-level, single digits + byte-level as in SmolLM2, or the Llama 3, Qwen2 and GPT-4o "
                       "split regexes); convert the checkpoint with llama.cpp's convert_hf_to_gguf.py and pass the GGUF")


SPACE = "\u2581"  # "▁", SentencePiece's space


def space_prefix(tj: dict, d: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix)."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    kinds = [n.get("type") for n in steps]
    replace = lambda n: n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " \
        and n.get("content") == SPACE  # noqa: E731
    if kinds == ["Prepend", "Replace"] and steps[0].get("prepend") == SPACE and replace(steps[1]) and pre is None:
        return True   # Llama 2, Mistral v0.1, Phi-3
    if kinds == ["Replace"] and replace(steps[0]) and pre is None:
        return False  # Gemma
    if not kinds and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split", True):
        return pre.get("prepend_scheme", "always") != "never"
    raise ConvertError(f"{d}/tokenizer.json: a byte-fallback BPE whose space handling (normalizer {kinds or None}, "
                       f"pre-tokenizer {(pre or {}).get('type')}) is not one this importer knows (Prepend + Replace "
                       "as in Llama 2/Mistral/Phi-3, Replace as in Gemma, or a non-splitting Metaspace); convert the "
                       "checkpoint with llama.cpp's convert_hf_to_gguf.py and pass the GGUF")


def _vocab(tj: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token texts and llama.cpp token types, padded rows UNUSED."""
    tokens: list[str | None] = [None] * n_vocab
    types = [int(gguf.TokenType.NORMAL)] * n_vocab
    for tok, i in tj["model"]["vocab"].items():
        if i < n_vocab:
            tokens[i] = tok
    for a in tj.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:  # the embedding is padded beyond the tokenizer: unused rows, as convert_hf_to_gguf.py
            tokens[i], types[i] = f"[PAD{i}]", int(gguf.TokenType.UNUSED)
    return tokens, types


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _spm_kv(tj: dict, d: Path, n_vocab: int) -> list:
    """The `llama` (SentencePiece) tokenizer keys for a byte-fallback BPE tokenizer.json."""
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    tokens, types = _vocab(tj, n_vocab)
    merges = _merges(tj["model"])
    score = {}
    for rank, m in enumerate(merges):
        score.setdefault(m.replace(" ", ""), -float(rank))  # merge "a b" makes piece "ab" (pieces hold no spaces)
    unk = tj["model"].get("unk_token")
    scores = []
    for i, (t, typ) in enumerate(zip(tokens, types)):
        if t == unk:
            types[i] = int(gguf.TokenType.UNKNOWN)
        if typ != gguf.TokenType.NORMAL or t == unk:
            scores.append(-1000.0)  # control, user-defined and padding rows: never a merge result
            continue
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types[i] = int(gguf.TokenType.BYTE)
        scores.append(score.get(t, -float(len(merges) + i)))
    return [("tokenizer.ggml.model", "llama", S.STRING, None),
            ("tokenizer.ggml.pre", "default", S.STRING, None),
            ("tokenizer.ggml.tokens", tokens, A, S.STRING),
            ("tokenizer.ggml.scores", scores, A, S.FLOAT32),
            ("tokenizer.ggml.token_type", types, A, S.INT32),
            ("tokenizer.ggml.add_space_prefix", space_prefix(tj, d), S.BOOL, None)]


def tokenizer_kv(d: Path, n_vocab: int) -> list:
    try:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{d}: no tokenizer.json (a fast tokenizer is required)") from None
    model = tj.get("model", {})
    decoder = (tj.get("decoder") or {}).get("type")
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kv = _spm_kv(tj, d, n_vocab)
    elif model.get("type") == "BPE" and decoder == "ByteLevel":
        tokens, types = _vocab(tj, n_vocab)
        kv = [("tokenizer.ggml.model", "gpt2", S.STRING, None),
              ("tokenizer.ggml.pre", pre_tokenizer(tj.get("pre_tokenizer"), d), S.STRING, None),
              ("tokenizer.ggml.tokens", tokens, A, S.STRING),
              ("tokenizer.ggml.token_type", types, A, S.INT32),
              ("tokenizer.ggml.merges", _merges(model), A, S.STRING)]
    else:
        raise ConvertError(f"{d}/tokenizer.json: a {model.get('type')} model with a {decoder} decoder; supported: "
                           "byte-level BPE (GPT-2 style) and byte-fallback BPE (SentencePiece style)")
    special = gguf.SpecialVocab(d, load_merges=False, n_vocab=n_vocab)
    kv += [scalar_kv(f"tokenizer.ggml.{typ}_token_id", int(i)) for typ, i in special.special_token_ids.items()]
    # said explicitly, also when the folder does not: llama.cpp would otherwise guess by architecture (a
    # BOS for llama and gemma3), where the Hugging Face tokenizer adds only what it is configured to add
    adds = {"bos": False, "eos": False, **special.add_special_token}
    kv += [(f"tokenizer.ggml.add_{typ}_token", bool(v), S.BOOL, None) for typ, v in adds.items()]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, S.STRING, None))
    return kv
