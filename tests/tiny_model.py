"""A tiny random Llama written to GGUF with gguf-py: a byte-level GPT-2 vocabulary, ChatML."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from runtime.artifact import Artifact
from runtime.fold import convert_gguf

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER, N_CTX = 64, 4, 2, 128, 2, 512


def _byte_tokens() -> list[str]:
    """GPT-2's byte -> printable unicode map, as token strings."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_base(path: Path, seed: int = 0, tied: bool = True) -> Path:
    """The tiny base; `tied=False` adds a separate output.weight (an untied output projection)."""
    rng = np.random.default_rng(seed)
    byte_toks = _byte_tokens()
    merges = ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r"]
    extra = ["Ġt", "Ġa", "he", "in", "re", "on", "Ġthe", "er"]
    tokens = SPECIALS + byte_toks + extra
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (n_vocab - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def t(name, *shape, scale=0.08):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    t("token_embd.weight", n_vocab, N_EMBD, scale=0.5)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    hd = N_EMBD // N_HEAD
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, np.float32))
        t(p + "attn_q.weight", N_EMBD, N_EMBD)
        t(p + "attn_k.weight", N_HEAD_KV * hd, N_EMBD)
        t(p + "attn_v.weight", N_HEAD_KV * hd, N_EMBD)
        t(p + "attn_output.weight", N_EMBD, N_EMBD)
        t(p + "ffn_gate.weight", N_FF, N_EMBD)
        t(p + "ffn_up.weight", N_FF, N_EMBD)
        t(p + "ffn_down.weight", N_EMBD, N_FF)
    if not tied:
        t("output.weight", n_vocab, N_EMBD, scale=0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_artifact(seed: int = 1, threshold: float = 0.5, head_scale: float = 0.5) -> Artifact:
    rng = np.random.default_rng(seed)
    return Artifact(rng.standard_normal(N_EMBD).astype(np.float32) * 0.5,
                    rng.standard_normal((2, N_EMBD)).astype(np.float32) * head_scale,
                    {"threshold": threshold, "base_model": "tiny-random-llama", "metrics": {"note": "random"}})


def write_tiny_safe(base: Path, out: Path, seed: int = 1, head_scale: float = 0.5) -> Path:
    convert_gguf(base, random_artifact(seed, head_scale=head_scale), out, progress=False)
    return out


def write_tiny_gemma3(path: Path, seed: int = 0, window: int = 8, n_layer: int = 6) -> Path:
    """A tiny random Gemma 3 (architecture gemma3): q/k norms, post-attention/post-MLP norms, GeGLU,
    a sliding window of `window` keys on layers i % 6 != 5, head_dim != n_embd / n_head. The same
    byte-level vocabulary as the tiny Llama (the tokenizer does not depend on the architecture)."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + _byte_tokens() + ["Ġt", "Ġa", "he", "in", "re", "on", "Ġthe", "er"]
    n_vocab, n_embd, n_head, n_head_kv, head_dim, n_ff = len(tokens), 48, 2, 1, 32, 96
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny-random-gemma3")
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(window)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (n_vocab - len(SPECIALS)))
    w.add_token_merges(["Ġ t", "Ġ a", "h e", "i n", "r e", "o n", "Ġt he", "e r"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def t(name, *shape, scale=0.15):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.3 * rng.standard_normal(n)).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=0.1)
    norm("output_norm.weight", n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        for name in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            norm(p + name + ".weight", n_embd)
        norm(p + "attn_q_norm.weight", head_dim)
        norm(p + "attn_k_norm.weight", head_dim)
        t(p + "attn_q.weight", n_head * head_dim, n_embd)
        t(p + "attn_k.weight", n_head_kv * head_dim, n_embd)
        t(p + "attn_v.weight", n_head_kv * head_dim, n_embd)
        t(p + "attn_output.weight", n_embd, n_head * head_dim)
        t(p + "ffn_gate.weight", n_ff, n_embd)
        t(p + "ffn_up.weight", n_ff, n_embd)
        t(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


TOY_WORDS = ["the", "a", "sun", "rain", "tree", "hill", "road", "lamp", "book", "door"]


def toy_examples(n: int = 96, seed: int = 0) -> list[dict]:
    """A toy data set whose harmful prompts end in "qz qz qz" (a planted, learnable signal)."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        text = " ".join(rng.choice(TOY_WORDS) for _ in range(rng.randint(3, 8))) + (" qz qz qz" if label else "")
        split = "train" if i < 2 * n // 3 else ("val" if i < 5 * n // 6 else "test")
        out.append({"id": f"t{i}", "prompt": text, "label": label, "split": split, "augmentation": "none",
                    "source": "toy", "family": f"toy{i % 4}",
                    "prefill": "Sure, here is" if i % 6 == 0 else None,
                    "response": None if label else "the sun and the rain " * 4})
    return out


def write_toy_prep(base: Path, path: Path, n: int = 96) -> Path:
    """`safechat train joint-prep` of the toy data for a base GGUF: tokenized by llama.cpp with the file's template."""
    from runtime.backends.llama import LlamaModelFile
    from runtime.fetch import sha256_file
    from safechat.train.data_card import data_card
    from safechat.train.joint_data import prepare, save_prep

    mf = LlamaModelFile(base, vocab_only=True)
    eog = [t for t in range(mf.n_vocab) if mf.is_eog(t)]
    ex = toy_examples(n)
    prep = prepare(ex, mf, mf.chat_template, mf.bos if mf.add_bos else None, eog, mf.n_vocab,
                   base_sha256=sha256_file(base))
    prep["data"] = data_card(ex)
    return save_prep(prep, path)
