"""A GGUF file as a transformers model: the float32 reference `convert verify` compares llama.cpp with.

    model, facts = reference_model("safe.gguf")     # a transformers *ForCausalLM, eval mode, float32

The inverse of `hf_import`: the config comes from the file's `{arch}.*` keys, every tensor is
dequantized with gguf-py and put back into Hugging Face's layout by the same family table
(`hf_families`: Q/K permutation undone, Gemma's 1 + w norms back to w, Llama 3's rope_freqs as the
rotary embedding's inverse frequencies). The file's safety rows ([CLS], side tokens, head rows,
category rows) are ordinary rows of its embedding and output matrices, so the model scores a [CLS]
as the runtime does: feed its token id, read the logits of the safe/unsafe ids.

Why not transformers' own GGUF loader (`from_pretrained(gguf_file=...)`): measured on the tiny
models of tests/test_hf_families.py it ignores `rope_freqs` (Llama 3 logits off by ~5), gets Gemma 3
wrong (off by ~3), and cannot load Qwen3 (explicit head_dim) or Phi-3; it also needs accelerate.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from runtime.gguf_io import ConvertError, architecture, read_gguf

from .hf_families import FAMILIES, GEMMA3_PATTERN, gguf_names
from .hf_families import read_config as family_config

CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma3": "Gemma3TextConfig",
           "phi3": "Phi3Config"}


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise ConvertError(f"the file has no {key}")
        return default
    return f.contents()


def hf_config(reader, where: str) -> dict:
    """The config.json a Hugging Face checkpoint of this file's weights would have."""
    arch = architecture(reader, where)
    if arch not in CONFIGS:
        raise ConvertError(f"{where}: architecture {arch!r} has no transformers reference here; supported: "
                           f"{', '.join(CONFIGS)}")
    tensors = {t.name: t for t in reader.tensors}
    a = arch
    hidden, n_head = int(_field(reader, f"{a}.embedding_length")), int(_field(reader, f"{a}.attention.head_count"))
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // n_head))
    theta = float(_field(reader, f"{a}.rope.freq_base", 10000.0))
    c = {"architectures": [next(k for k, f in FAMILIES.items() if f.arch == arch)],
         "vocab_size": int(tensors["token_embd.weight"].shape[1]), "hidden_size": hidden,
         "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
         "num_hidden_layers": int(_field(reader, f"{a}.block_count")), "num_attention_heads": n_head,
         "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", n_head)), "head_dim": head_dim,
         "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
         "max_position_embeddings": int(_field(reader, f"{a}.context_length", 4096)),
         "tie_word_embeddings": "output.weight" not in tensors, "attention_bias": "blk.0.attn_q.bias" in tensors,
         "rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    scaling = str(_field(reader, f"{a}.rope.scaling.type", "none"))
    if scaling == "linear":
        c["rope_parameters"] = {"rope_type": "linear", "rope_theta": theta,
                                "factor": float(_field(reader, f"{a}.rope.scaling.factor"))}
    elif scaling not in ("none", ""):
        raise ConvertError(f"{where}: rope scaling {scaling!r} has no transformers reference here")
    rope_dims = int(_field(reader, f"{a}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        c["partial_rotary_factor"] = rope_dims / head_dim
    if arch == "gemma3":
        n = c["num_hidden_layers"]
        local = float(_field(reader, f"{a}.rope.freq_base_swa", 10000.0))
        c.update(sliding_window=int(_field(reader, f"{a}.attention.sliding_window")), query_pre_attn_scalar=head_dim,
                 layer_types=["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention"
                              for i in range(n)],
                 rope_parameters={"full_attention": c["rope_parameters"],
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local}})
    return c


def _dequantized(t) -> np.ndarray:
    return np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def reference_model(path: str | Path):
    """(the transformers model of the file's weights in float32, eval mode; the importer's facts about it)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise ConvertError("the reference model needs torch and transformers: pip install -e '.[train]'") from None
    path = Path(path)
    reader = read_gguf(path)
    cfg_json = hf_config(reader, str(path))
    facts = family_config(path, cfg_json)
    cfg = getattr(transformers, CONFIGS[facts["arch"]])(**{k: v for k, v in cfg_json.items() if k != "architectures"},
                                                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.AutoModelForCausalLM.from_config(cfg)  # on the CPU: its rotary buffers are computed
    wanted = [k for k in model.state_dict() if not k.endswith("inv_freq")]
    names = gguf_names(facts, wanted, path)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for hf, name in names.items():
        if name not in tensors:
            raise ConvertError(f"{path}: no {name} tensor (for {hf})")
        a = _dequantized(tensors[name])
        a = to_hf(facts, name, a)
        state[hf] = torch.from_numpy(np.ascontiguousarray(a)).reshape(model.get_parameter(hf).shape)
    if facts["tied"] and "lm_head.weight" in model.state_dict():
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing = set(wanted) - set(state) - {"lm_head.weight"}
    if missing:
        raise ConvertError(f"{path}: the reference model lacks {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if factors is not None:  # Llama 3's frequency-dependent scaling: llama.cpp divides each frequency by its factor
        div = torch.from_numpy(_dequantized(factors))
        for mod in model.modules():
            if isinstance(getattr(mod, "inv_freq", None), torch.Tensor):
                mod.inv_freq = mod.inv_freq / div.to(mod.inv_freq.dtype)
                mod.original_inv_freq = mod.inv_freq
    return model.float().eval(), facts


def to_hf(c: dict, name: str, a: np.ndarray) -> np.ndarray:
    """`hf_families.transform` undone."""
    fam = c["family"]
    if fam.permute_qk and name.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
        n = c["n_head"] if "attn_q" in name else c["n_head_kv"]
        rows = a.shape[0] // n // 2
        return a.reshape(n, rows, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
    if fam.norm_plus_one and name.endswith("norm.weight"):
        return a - 1.0
    return a
