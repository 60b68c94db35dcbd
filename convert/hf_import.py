"""A local Hugging Face Llama checkpoint directory -> base GGUF, torch-free (numpy, gguf-py).

    convert_any("path/to/checkpoint-dir", artifact, "safe.gguf")    # or: python -m convert gguf --base DIR

The directory holds `config.json` (architectures: LlamaForCausalLM), `model.safetensors` (or shards
listed in `model.safetensors.index.json`), `tokenizer.json` (a byte-level BPE) and optionally
`tokenizer_config.json` (chat template, bos/eos, add_bos_token). Tensors keep their dtype (F32,
F16, or BF16; norms become F32, as llama.cpp expects). Hugging Face stores Q/K with the rotary
halves split (rotate_half); llama.cpp rotates interleaved pairs, so attn_q/attn_k rows are
permuted as llama.cpp's own `convert_hf_to_gguf.py` does. Only what this converter can vouch for
is accepted: rope scaling, attention/MLP biases and tokenizers other than GPT-2-style byte-level
BPE are refused with a message that says so.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np

from runtime.gguf_io import ConvertError, scalar_kv, write_gguf

HF_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
_DTYPES = {"F32": (np.float32, gguf.GGMLQuantizationType.F32), "F16": (np.float16, gguf.GGMLQuantizationType.F16),
           "BF16": (np.uint16, gguf.GGMLQuantizationType.BF16)}
_FILE_TYPE = {gguf.GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
              gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
              gguf.GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def read_config(d: Path) -> dict:
    """config.json, checked: a Llama this importer supports. Returns the fields it uses."""
    try:
        c = json.loads((d / "config.json").read_text())
    except FileNotFoundError:
        raise ConvertError(f"{d} is a folder but not a Hugging Face checkpoint: no config.json") from None
    except ValueError as e:
        raise ConvertError(f"{d}/config.json is not valid JSON: {e}") from None
    archs = c.get("architectures") or [c.get("model_type")]
    if archs[0] not in HF_ARCHITECTURES:
        raise ConvertError(f"{d}: architecture {archs[0]!r} is not supported; supported Hugging Face "
                           f"architectures: {', '.join(HF_ARCHITECTURES)}")
    for key in ("rope_scaling", "attention_bias", "mlp_bias"):
        if c.get(key):
            raise ConvertError(f"{d}: {key}={c[key]!r} is not supported by this importer; convert the checkpoint "
                               "with llama.cpp's convert_hf_to_gguf.py and pass the GGUF")
    n_head = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    return {"arch": HF_ARCHITECTURES[archs[0]], "hidden": hidden, "n_layer": int(c["num_hidden_layers"]),
            "n_head": n_head, "n_head_kv": int(c.get("num_key_value_heads") or n_head),
            "head_dim": int(c.get("head_dim") or hidden // n_head), "n_ff": int(c["intermediate_size"]),
            "eps": float(c.get("rms_norm_eps", 1e-6)), "rope_theta": float(c.get("rope_theta", 10000.0)),
            "n_ctx": int(c.get("max_position_embeddings", 2048)), "n_vocab": int(c["vocab_size"]),
            "tied": bool(c.get("tie_word_embeddings", False)), "name": c.get("_name_or_path") or d.name}


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


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate_half Q/K rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _as_f32(a: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.BF16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def _gguf_tensors(d: Path, c: dict) -> list:
    src = _tensors(d)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not c["tied"]:
        names["lm_head.weight"] = "output.weight"
    for i in range(c["n_layer"]):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in _LAYER.items()})
    missing = [n for n in names if n not in src]
    if missing:
        raise ConvertError(f"{d}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    out = []
    for hf, name in names.items():
        a, qtype = src[hf]
        if name.endswith("norm.weight"):
            a, qtype = _as_f32(a, qtype), gguf.GGMLQuantizationType.F32
        elif name.endswith("attn_q.weight"):
            a = permute(a, c["n_head"])
        elif name.endswith("attn_k.weight"):
            a = permute(a, c["n_head_kv"])
        out.append((name, np.ascontiguousarray(a), qtype))
    return out


# -- the tokenizer ------------------------------------------------------------------------------

def _pre_tokenizer(pre: dict | None, d: Path) -> str:
    """llama.cpp's pre-tokenizer name for the two byte-level layouts this importer knows."""
    kinds = [p.get("type") for p in (pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence"
                                     else [pre] if pre else [])]
    if kinds == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"  # SmolLM/SmolLM2: single digits, then GPT-2's byte-level regex
    raise ConvertError(f"{d}/tokenizer.json: pre-tokenizer {kinds or None} is not one this importer knows (GPT-2 "
                       "byte-level, or single digits + byte-level as in SmolLM2); convert the checkpoint with "
                       "llama.cpp's convert_hf_to_gguf.py and pass the GGUF")


def _tokenizer_kv(d: Path, n_vocab: int) -> list:
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
          ("tokenizer.ggml.pre", _pre_tokenizer(tj.get("pre_tokenizer"), d), S.STRING, None),
          ("tokenizer.ggml.tokens", tokens, A, S.STRING),
          ("tokenizer.ggml.token_type", types, A, S.INT32),
          ("tokenizer.ggml.merges", merges, A, S.STRING)]
    kv += [scalar_kv(f"tokenizer.ggml.{typ}_token_id", int(i)) for typ, i in special.special_token_ids.items()]
    kv += [(f"tokenizer.ggml.add_{typ}_token", bool(v), S.BOOL, None) for typ, v in special.add_special_token.items()]
    if isinstance(special.chat_template, str):
        kv.append(("tokenizer.chat_template", special.chat_template, S.STRING, None))
    return kv


def check_config(d: Path, hidden: int, base_vocab: int | None) -> dict:
    """The artifact-facing facts, before anything is written (hidden size and base vocabulary)."""
    c = read_config(d)
    if hidden != c["hidden"]:
        raise ConvertError(f"the artifact is for hidden size {hidden}; {d} has {c['hidden']}")
    if base_vocab is not None and base_vocab != c["n_vocab"]:
        raise ConvertError(f"the artifact expects a base vocabulary of {base_vocab}; {d} has {c['n_vocab']}")
    return c


def hf_to_gguf(d: str | Path, out: str | Path, *, progress: bool = False) -> Path:
    """Write the checkpoint in `d` as a base GGUF (llama architecture) to `out`, atomically."""
    d = Path(d)
    c = read_config(d)
    tensors = _gguf_tensors(d, c)
    emb = next(t for t in tensors if t[0] == "token_embd.weight")
    if emb[1].shape != (c["n_vocab"], c["hidden"]):
        raise ConvertError(f"{d}: embed_tokens is {tuple(emb[1].shape)}, config says ({c['n_vocab']}, {c['hidden']})")
    a, S = c["arch"], gguf.GGUFValueType
    kv = [("general.name", str(c["name"]), S.STRING, None),
          ("general.file_type", int(_FILE_TYPE[emb[2]]), S.UINT32, None)]
    kv += [scalar_kv(f"{a}.{k}", v) for k, v in (
        ("vocab_size", c["n_vocab"]), ("context_length", c["n_ctx"]), ("embedding_length", c["hidden"]),
        ("block_count", c["n_layer"]), ("feed_forward_length", c["n_ff"]), ("attention.head_count", c["n_head"]),
        ("attention.head_count_kv", c["n_head_kv"]), ("rope.dimension_count", c["head_dim"]),
        ("rope.freq_base", c["rope_theta"]), ("attention.layer_norm_rms_epsilon", c["eps"]))]
    if c["head_dim"] != c["hidden"] // c["n_head"]:
        kv += [scalar_kv(f"{a}.attention.key_length", c["head_dim"]),
               scalar_kv(f"{a}.attention.value_length", c["head_dim"])]
    kv += _tokenizer_kv(d, c["n_vocab"])
    return write_gguf(out, a, kv, tensors, progress=progress)


def convert_hf(d: str | Path, art, out: str | Path, **kw):
    """`convert_gguf` for a checkpoint folder: checked against the artifact first, then imported to a
    temp GGUF beside `out`, folded, and the temp file removed."""
    from runtime.files import temp_beside
    from runtime.fold import convert_gguf

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
    from runtime.fold import convert_gguf
    return convert_hf(base, art, out, **kw) if Path(base).is_dir() else convert_gguf(base, art, out, **kw)
