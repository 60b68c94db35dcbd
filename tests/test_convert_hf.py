"""A local Hugging Face Llama checkpoint folder as `convert gguf` input (safechat/convert/hf_import.py).

The test writes the tiny GGUF model out as a Hugging Face checkpoint (Q/K un-permuted the way
transformers does when it reads a GGUF), converts the folder, and checks (a) the result equals
converting the GGUF itself, and (b) llama.cpp's logits on it equal an independent numpy forward
pass written in Hugging Face's own conventions (rotate_half rotary embeddings) on the checkpoint.
"""
import json

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

import runtime
from safechat.convert.__main__ import main
from runtime.gguf_io import ConvertError
from safechat.convert.hf_import import convert_any as convert_gguf
from runtime.backends.base import Sampling
from runtime.backends.llama import ll
from tests.tiny_model import CHATML, N_CTX, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_LAYER, random_artifact, \
    write_tiny_base

LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def reverse_permute(w, n_head):
    """transformers' GGUF loader: llama.cpp's interleaved Q/K rows back to rotate_half halves."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def write_hf_checkpoint(src, d, dtype=np.float32):
    """The tiny GGUF `src` as a Hugging Face checkpoint folder `d`."""
    r = gguf.GGUFReader(str(src))
    tied = not any(t.name == "output.weight" for t in r.tensors)
    w = {}
    for t in r.tensors:
        a = np.asarray(t.data).reshape([int(x) for x in reversed(t.shape)])
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            key = "model.embed_tokens.weight"
        elif name == "output_norm":
            key = "model.norm.weight"
        elif name == "output":
            key = "lm_head.weight"
        else:
            _, i, kind = name.split(".")
            key = f"model.layers.{i}.{LAYER[kind]}.weight"
            a = reverse_permute(a, N_HEAD if kind == "attn_q" else N_HEAD_KV) if kind in ("attn_q", "attn_k") else a
        w[key] = np.ascontiguousarray(a, dtype=dtype if a.ndim == 2 else np.float32)
    d.mkdir()
    save_file(w, str(d / "model.safetensors"))
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": N_EMBD,
        "num_hidden_layers": N_LAYER, "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV,
        "intermediate_size": N_FF, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": N_CTX,
        "vocab_size": len(tokens), "tie_word_embeddings": tied, "rope_scaling": None}))
    (d / "tokenizer.json").write_text(json.dumps({
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "special": True} for i, (t, ty) in enumerate(zip(tokens, types))
                         if ty == gguf.TokenType.CONTROL],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ") for m in r.fields["tokenizer.ggml.merges"].contents()]}}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}))
    return d, w


def hf_forward(w, ids, tied):
    """Last-position logits of a Hugging Face Llama (rotate_half RoPE), numpy float64."""
    hd, rep = N_EMBD // N_HEAD, N_HEAD // N_HEAD_KV
    W = {k: v.astype(np.float64) for k, v in w.items()}
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g  # noqa: E731
    T = len(ids)
    ang = np.outer(np.arange(T), 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd))
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # noqa: E731
    x = W["model.embed_tokens.weight"][ids]
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"])
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(T, N_HEAD, hd)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(T, N_HEAD_KV, hd)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(T, N_HEAD_KV, hd)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("hts,shd->thd", s / s.sum(-1, keepdims=True), v).reshape(T, N_EMBD)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = rms(x, W[p + "post_attention_layernorm.weight"])
        g = h @ W[p + "mlp.gate_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
    out = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    return rms(x[-1], W["model.norm.weight"]) @ out.T


def _tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def _fields(path, keys):
    f = gguf.GGUFReader(str(path)).fields
    return {k: f[k].contents() if k in f else None for k in keys}


@pytest.mark.parametrize("tied", [True, False])
def test_hf_checkpoint_converts_like_its_gguf(tied, tmp_path):
    base = write_tiny_base(tmp_path / "base.gguf", tied=tied)
    hf, _ = write_hf_checkpoint(base, tmp_path / "hf")
    art = random_artifact()
    convert_gguf(hf, art, tmp_path / "from-hf.gguf", progress=False)
    convert_gguf(base, art, tmp_path / "from-gguf.gguf", progress=False)
    assert _tensors(tmp_path / "from-hf.gguf") == _tensors(tmp_path / "from-gguf.gguf")  # Q/K permuted back
    keys = ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.chat_template",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
            "llama.vocab_size", "llama.attention.head_count_kv", "llama.rope.dimension_count", "safety.cls_token_id"]
    assert _fields(tmp_path / "from-hf.gguf", keys) == _fields(tmp_path / "from-gguf.gguf", keys)
    assert _fields(tmp_path / "from-hf.gguf", ["tokenizer.ggml.pre"]) == {"tokenizer.ggml.pre": "gpt-2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "from-gguf.gguf", "from-hf.gguf", "hf"]


@pytest.mark.parametrize("tied", [True, False])
def test_llama_cpp_on_the_import_matches_a_hugging_face_forward(tied, tmp_path):
    base = write_tiny_base(tmp_path / "base.gguf", tied=tied, seed=5)
    hf, w = write_hf_checkpoint(base, tmp_path / "hf", dtype=np.float16)   # F16 weights, as checkpoints ship
    out = tmp_path / "safe.gguf"
    assert main(["gguf", "--base", str(hf), "--artifact", str(random_artifact().save(tmp_path / "art")),
                 "--out", str(out), "--quiet"]) == 0
    m = runtime.load(out, n_ctx=256)
    ids = m.tokenize_messages([{"role": "user", "content": "the theory of the rain in spain"}])
    b = m.backend
    b.start(ids, Sampling(), check=False)
    got = np.ctypeslib.as_array(ll.llama_get_logits_ith(b.ctx, b._row), shape=(b.mf.n_vocab,))[:-3].copy()
    m.close()
    want = hf_forward(w, ids, tied)
    np.testing.assert_allclose(got, want, atol=2e-2)   # F16 weights and K/V in llama.cpp
    assert np.abs(want).max() > 0.5                    # informative logits, not all near zero


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("case", ["architecture", "rope_scaling", "hidden", "pre_tokenizer", "no_config"])
def test_hf_errors_are_clear_and_nothing_is_written(case, tmp_path):
    base = write_tiny_base(tmp_path / "base.gguf")
    hf, _ = write_hf_checkpoint(base, tmp_path / "hf")
    art = random_artifact()
    if case == "architecture":
        _edit_json(hf / "config.json", architectures=["GPTNeoXForCausalLM"])
        want = ("architecture 'GPTNeoXForCausalLM' is not supported; supported Hugging Face architectures: "
                "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM")
    elif case == "rope_scaling":
        _edit_json(hf / "config.json", rope_scaling={"type": "yarn", "factor": 4.0})
        want = "rope scaling 'yarn' is not supported by this importer; convert the checkpoint with llama.cpp's"
    elif case == "hidden":
        _edit_json(hf / "config.json", hidden_size=32)
        want = "the artifact is for hidden size 64; "
    elif case == "pre_tokenizer":
        _edit_json(hf / "tokenizer.json", pre_tokenizer={"type": "Metaspace"})
        want = "pre-tokenizer ['Metaspace'] is not one this importer knows"
    else:
        (hf / "config.json").unlink()
        want = "is a folder but not a Hugging Face checkpoint: no config.json"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConvertError, match=want.replace("[", r"\[").replace("(", r"\(").replace("'", ".")):
        convert_gguf(hf, art, out / "safe.gguf", progress=False)
    assert list(out.iterdir()) == []
