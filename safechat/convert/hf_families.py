"""The model families a Hugging Face checkpoint folder may hold, and how each becomes llama.cpp's GGUF.

    FAMILIES["Qwen2ForCausalLM"]  ->  Family(arch="qwen2", ...)

Names come from gguf-py's own tensor map (`gguf.get_tensor_name_map`, the table llama.cpp's
converter uses); what is written here is only what differs between families, each line checked by
a test that builds a tiny random model of that family with transformers and compares llama.cpp's
logits with transformers' (tests/test_hf_families.py):

- llama (Llama 2/3.x, SmolLM, Mistral 7B as `llama`): Hugging Face stores Q/K rows with the rotary
  halves split (rotate_half), llama.cpp's `llama` rotates interleaved pairs, so attn_q/attn_k are
  permuted; Llama 3.1+'s `llama3` rope scaling becomes llama.cpp's `rope_freqs` tensor.
- qwen2 (Qwen2, Qwen2.5): q/k/v biases; rotate_half in both (no permutation).
- qwen3: q/k RMS norms, an explicit head_dim.
- gemma3 (Gemma 3 text models, 270M/1B): RMS norms store w where Gemma computes x * (1 + w), so
  1 is added (as llama.cpp's converter does); post-attention and post-MLP norms; a sliding window
  on five layers of six and a separate local rope base. Input embeddings are scaled by sqrt(d) in
  both, so a [CLS] row of a gemma3 artifact is a row of the file (safechat/convert/gemma3_torch.py).
- phi3 (Phi-3, Phi-3.5-mini, Phi-4-mini): fused qkv and gate/up projections, partial rotary.

What a family's converter cannot vouch for (rope scalings other than linear/llama3, a Mistral
sliding window, Phi's longrope, Gemma's multimodal checkpoints) is refused with a message that
says so and names llama.cpp's convert_hf_to_gguf.py, whose GGUF `convert gguf` then takes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from runtime.gguf_io import ConvertError


@dataclass(frozen=True)
class Family:
    arch: str                  # GGUF general.architecture
    permute_qk: bool = False   # rotate_half (HF) -> interleaved pairs (llama.cpp's `llama`)
    norm_plus_one: bool = False  # Gemma: x * (1 + w) -> x * w'
    biases: bool = False       # q/k/v biases allowed (Qwen2)


FAMILIES = {"LlamaForCausalLM": Family("llama", permute_qk=True),
            "MistralForCausalLM": Family("llama", permute_qk=True),
            "Qwen2ForCausalLM": Family("qwen2", biases=True),
            "Qwen3ForCausalLM": Family("qwen3"),
            "Gemma3ForCausalLM": Family("gemma3", norm_plus_one=True),
            "Phi3ForCausalLM": Family("phi3")}
GEMMA3_PATTERN = 6  # llama.cpp's gemma3: layer i attends globally iff (i + 1) % 6 == 0, else in the window


def _refuse(d: Path, what: str) -> ConvertError:
    return ConvertError(f"{d}: {what} is not supported by this importer; convert the checkpoint with llama.cpp's "
                        "convert_hf_to_gguf.py and pass the GGUF")


def _rope(c: dict, d: Path) -> dict:
    """rope theta(s) and scaling from either config layout (transformers 5's `rope_parameters` or the
    older `rope_theta` + `rope_scaling`); Gemma 3 keeps one set per attention kind."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # Gemma 3 (transformers 5)
        full, local = params["full_attention"], params.get("sliding_attention") or {}
    elif isinstance(params, dict):
        full, local = params, {}
    else:
        full = {**(c.get("rope_scaling") or {}), "rope_theta": c.get("rope_theta", 10000.0)}
        local = {"rope_theta": c["rope_local_base_freq"]} if "rope_local_base_freq" in c else {}
    kind = full.get("rope_type") or full.get("type") or "default"
    if kind not in ("default", "linear", "llama3"):
        raise _refuse(d, f"rope scaling {kind!r}")
    if local.get("rope_type", "default") not in ("default", None):
        raise _refuse(d, f"local rope scaling {local.get('rope_type')!r}")
    return {"theta": float(full.get("rope_theta", 10000.0)), "kind": kind, "scaling": full,
            "theta_local": float(local["rope_theta"]) if "rope_theta" in local else None}


def read_config(d: Path, c: dict) -> dict:
    """The fields the importer uses, from a parsed config.json; ConvertError for anything it cannot vouch for."""
    archs = c.get("architectures") or [c.get("model_type")]
    if archs[0] not in FAMILIES:
        raise ConvertError(f"{d}: architecture {archs[0]!r} is not supported; supported Hugging Face "
                           f"architectures: {', '.join(FAMILIES)}")
    fam = FAMILIES[archs[0]]
    if c.get("mlp_bias"):
        raise _refuse(d, "mlp_bias=True")
    if c.get("attention_bias") and not fam.biases:
        raise _refuse(d, f"attention_bias=True for {archs[0]}")
    if archs[0] == "MistralForCausalLM" and c.get("sliding_window"):
        raise _refuse(d, f"Mistral's sliding_window={c['sliding_window']}")
    if fam.arch == "phi3" and c.get("sliding_window"):
        raise _refuse(d, f"Phi-3's sliding_window={c['sliding_window']}")
    n_head, hidden = int(c["num_attention_heads"]), int(c["hidden_size"])
    head_dim = int(c.get("head_dim") or hidden // n_head)
    out = {"family": fam, "arch": fam.arch, "hidden": hidden, "n_layer": int(c["num_hidden_layers"]),
           "n_head": n_head, "n_head_kv": int(c.get("num_key_value_heads") or n_head), "head_dim": head_dim,
           "n_ff": int(c["intermediate_size"]), "eps": float(c.get("rms_norm_eps", 1e-6)),
           "n_ctx": int(c.get("max_position_embeddings", 2048)), "n_vocab": int(c["vocab_size"]),
           "tied": bool(c.get("tie_word_embeddings", fam.arch == "gemma3")),
           "name": c.get("_name_or_path") or d.name, "rope": _rope(c, d),
           "rope_dims": int(head_dim * float(c.get("partial_rotary_factor") or 1.0))}
    if fam.arch == "gemma3":
        _check_gemma3(d, c, out)
    return out


def _check_gemma3(d: Path, c: dict, out: dict) -> None:
    n = out["n_layer"]
    want = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(n)]
    if c.get("layer_types") not in (None, want):
        raise _refuse(d, f"Gemma 3 layer_types {c['layer_types']} (llama.cpp: one global layer in {GEMMA3_PATTERN})")
    if int(c.get("query_pre_attn_scalar") or out["head_dim"]) != out["head_dim"]:
        raise _refuse(d, f"query_pre_attn_scalar={c['query_pre_attn_scalar']} != head_dim (the 27B layout)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if c.get(key):
            raise _refuse(d, f"{key}={c[key]}")
    out["window"] = int(c.get("sliding_window") or 4096)


def metadata(c: dict) -> list[tuple[str, object]]:
    """The `{arch}.*` keys of the family (beyond the tokenizer's)."""
    a, r = c["arch"], c["rope"]
    kv = [("vocab_size", c["n_vocab"]), ("context_length", c["n_ctx"]), ("embedding_length", c["hidden"]),
          ("block_count", c["n_layer"]), ("feed_forward_length", c["n_ff"]), ("attention.head_count", c["n_head"]),
          ("attention.head_count_kv", c["n_head_kv"]), ("rope.dimension_count", c["rope_dims"]),
          ("rope.freq_base", r["theta"]), ("attention.layer_norm_rms_epsilon", c["eps"])]
    if c["head_dim"] != c["hidden"] // c["n_head"] or a in ("qwen3", "gemma3"):
        kv += [("attention.key_length", c["head_dim"]), ("attention.value_length", c["head_dim"])]
    if r["kind"] == "linear":
        kv += [("rope.scaling.type", "linear"), ("rope.scaling.factor", float(r["scaling"]["factor"]))]
    if a == "gemma3":
        kv += [("attention.sliding_window", c["window"])]
        if r["theta_local"] is not None:
            kv += [("rope.freq_base_swa", r["theta_local"])]
    return [(f"{a}.{k}", v) for k, v in kv]


def llama3_rope_factors(c: dict) -> np.ndarray:
    """Llama 3.1+'s frequency-dependent rope scaling as llama.cpp's `rope_freqs` (one divisor per pair):
    1 for wavelengths under original_context / high_freq_factor, `factor` above original_context /
    low_freq_factor, a smooth blend between (Meta's published formula)."""
    s, dims = c["rope"]["scaling"], c["rope_dims"]
    factor, lo, hi = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old = float(s.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / c["rope"]["theta"] ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate_half Q/K rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_names(c: dict, hf_names, d: Path) -> dict[str, str]:
    """{Hugging Face tensor name: GGUF name} for every tensor the model uses; ConvertError for one it does not know."""
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == c["arch"])
    table = gguf.get_tensor_name_map(arch, c["n_layer"])
    out = {}
    for hf in hf_names:
        if c["tied"] and hf == "lm_head.weight":
            continue  # a copy of the embedding some checkpoints store anyway
        if hf.endswith(("rotary_emb.inv_freq", "rotary_emb.freqs")):
            continue  # recomputed by llama.cpp from the rope keys
        name = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"{d}: tensor {hf} has no GGUF name for {c['arch']}; convert the checkpoint with "
                               "llama.cpp's convert_hf_to_gguf.py and pass the GGUF")
        out[hf] = name
    need = {"token_embd.weight", "output_norm.weight"} | (set() if c["tied"] else {"output.weight"})
    missing = sorted(need - set(out.values()))
    if missing:
        raise ConvertError(f"{d}: missing tensors for {missing}")
    return out


def transform(c: dict, name: str, a: np.ndarray) -> np.ndarray:
    """A float32 tensor as the family's GGUF stores it (permuted Q/K, Gemma's 1 + w norms)."""
    fam: Family = c["family"]
    if fam.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute(a, c["n_head"])
    if fam.permute_qk and name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute(a, c["n_head_kv"])
    if fam.norm_plus_one and name.endswith("norm.weight"):
        return a + 1.0
    return a
