"""The frozen base model in torch, read straight from a GGUF file.

One readable file in the spirit of gpt-fast: weights are dequantized with gguf-py, the
forward pass is written out (RMSNorm, grouped-query attention, rotary embeddings, SwiGLU).
The pieces the recipes need:

* `prefill(tokens)`   runs the frozen model over whole sequences and returns every
                      layer's keys/values (what a [CLS] position attends to);
* `cls_forward(...)`  runs [CLS] query positions against those cached keys/values and
                      returns their final (normed) hidden states, differentiable in the
                      [CLS] input row.
* `forward(x, pos, mask, lin, past)`  the general differentiable pass over input
                      embeddings with explicit position ids, a 4D boolean attention mask and
                      an optional linear-layer hook (the `joint` recipe's LoRA) and past
                      keys/values (batched generation).

Weights are used exactly as llama.cpp uses them: GGUF stores Q/K permuted for llama.cpp's
"normal" (interleaved pair) rotary embedding, so that is the rotation applied here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F


class DecodeCache:
    """Preallocated per-layer keys/values for incremental decoding.

    `forward(..., past=cache)` writes each layer's new keys/values into the buffer in place and
    attends to a view of it, so a decoding step costs no copy of the past (a list of (k, v) pairs
    is concatenated, i.e. copied, at every step). The buffers are (B, H_kv, capacity, hd), the
    layout attention reads, so the views need no transpose copy either.
    """

    def __init__(self, n_layer: int, batch: int, capacity: int, n_head_kv: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layer, batch, n_head_kv, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.n = 0  # positions filled

    def write(self, j: int, k: torch.Tensor, v: torch.Tensor):
        """Store layer j's new (B, S, H_kv, hd) keys/values after the filled ones; (k, v) views of all."""
        n, S = self.n, k.shape[1]
        if n + S > self.k.shape[3]:
            raise ValueError(f"DecodeCache holds {self.k.shape[3]} positions; {n} + {S} do not fit")
        self.k[j, :, :, n:n + S] = k.transpose(1, 2)
        self.v[j, :, :, n:n + S] = v.transpose(1, 2)
        return self.k[j, :, :, :n + S].transpose(1, 2), self.v[j, :, :, :n + S].transpose(1, 2)


@dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    rope_base: float
    eps: float
    n_vocab: int
    head_dim: int  # per attention head (GGUF attention.key_length; n_embd // n_head when absent)


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


class FrozenLlama:
    """A frozen Llama-architecture model loaded from GGUF (float32, no grad on weights).

    Subclasses for other architectures (`gemma3_torch.FrozenGemma3`) override the per-layer pieces:
    `_qkv`, `_attn_out`, `_mlp`, `_window` (sliding-window layers) and `embed_scale`.
    """
    ARCH = "llama"
    embed_scale = 1.0  # input embeddings are multiplied by this (Gemma: sqrt(n_embd))

    def __init__(self, path: str | Path):
        reader = gguf.GGUFReader(str(path))
        arch = _field(reader, "general.architecture")
        if arch != self.ARCH:
            supported = "llama and gemma3 (safechat.convert.reference.load_frozen)"
            raise ValueError(f"{path}: architecture {arch!r} is not read by {type(self).__name__}; "
                             f"the torch recipes support {supported}")
        a = arch
        w: dict[str, torch.Tensor] = {}
        for t in reader.tensors:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            w[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32))
        self.w = w
        self.tied = "output.weight" not in w
        n_embd = int(_field(reader, f"{a}.embedding_length"))
        n_head = int(_field(reader, f"{a}.attention.head_count"))
        self.cfg = Config(
            n_layer=int(_field(reader, f"{a}.block_count")),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=int(_field(reader, f"{a}.attention.head_count_kv", n_head)),
            n_ff=int(_field(reader, f"{a}.feed_forward_length")),
            rope_base=float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
            eps=float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            n_vocab=w["token_embd.weight"].shape[0],
            head_dim=int(_field(reader, f"{a}.attention.key_length", n_embd // n_head)),
        )
        self.inv_freq = self._inv_freq(self.cfg.rope_base)
        self._setup(reader)

    def _setup(self, reader: gguf.GGUFReader) -> None:
        """Architecture-specific settings read from the file (none for Llama)."""

    def _inv_freq(self, base: float) -> torch.Tensor:
        hd = self.cfg.head_dim
        return 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))

    # -- building blocks -------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.w["token_embd.weight"][tokens]
        return e if self.embed_scale == 1.0 else e * self.embed_scale

    def _window(self, i: int) -> int | None:
        """Layer i attends only to keys fewer than this many positions back (None: all)."""
        return None

    def _window_mask(self, i: int, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """(..., S, P) bool, True where a query at q_pos (..., S) may see a key at k_pos (..., P) under
        layer i's sliding window; None when the layer has none or no pair is far enough apart."""
        win = self._window(i)
        if win is None or int(q_pos.max()) - int(k_pos.min()) < win:
            return None
        return (q_pos[..., :, None] - k_pos[..., None, :]) < win

    def output_matrix(self) -> torch.Tensor:
        return self.w["token_embd.weight"] if self.tied else self.w["output.weight"]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * self.w[name]

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Interleaved-pair rotation (llama.cpp ROPE_TYPE_NORM). x: (..., T, H, hd), pos: (..., T)."""
        ang = (pos.to(torch.float64)[..., None] * self.inv_freq).to(x.dtype)  # (..., T, hd/2)
        cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2)

    def _linear(self, name: str, h: torch.Tensor, lin=None) -> torch.Tensor:
        """h @ W.T for the GGUF tensor `name`; `lin(name, h, W)` replaces it when given (LoRA)."""
        return h @ self.w[name].T if lin is None else lin(name, h, self.w[name])

    def _qkv(self, i: int, h: torch.Tensor, pos: torch.Tensor, lin=None):
        c, p = self.cfg, f"blk.{i}."
        q = self._linear(p + "attn_q.weight", h, lin).unflatten(-1, (c.n_head, c.head_dim))
        k = self._linear(p + "attn_k.weight", h, lin).unflatten(-1, (c.n_head_kv, c.head_dim))
        v = self._linear(p + "attn_v.weight", h, lin).unflatten(-1, (c.n_head_kv, c.head_dim))
        return self._rope(q, pos), self._rope(k, pos), v

    def _attn_out(self, i: int, x: torch.Tensor, o: torch.Tensor, lin=None) -> torch.Tensor:
        """The residual stream after layer i's attention output o (heads concatenated)."""
        return x + self._linear(f"blk.{i}.attn_output.weight", o, lin)

    def _mlp(self, i: int, x: torch.Tensor, lin=None) -> torch.Tensor:
        p = f"blk.{i}."
        h = self._norm(x, p + "ffn_norm.weight")
        g = F.silu(self._linear(p + "ffn_gate.weight", h, lin)) * self._linear(p + "ffn_up.weight", h, lin)
        return x + self._linear(p + "ffn_down.weight", g, lin)

    # -- whole sequences -------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, return_logits: bool = False):
        """tokens: (B, T), right-padded. Returns (kv, final_hidden[, logits]).

        kv: (n_layer, 2, B, T, n_head_kv, head_dim) keys (rotated) and values.
        """
        c = self.cfg
        B, T = tokens.shape
        pos = torch.arange(T).expand(B, T)
        x = self.embed(tokens)
        kv = torch.empty(c.n_layer, 2, B, T, c.n_head_kv, c.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        for i in range(c.n_layer):
            h = self._norm(x, f"blk.{i}.attn_norm.weight")
            q, k, v = self._qkv(i, h, pos)
            kv[i, 0], kv[i, 1] = k, v
            win = self._window_mask(i, pos[0], pos[0])
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=None if win is None else causal & win,
                                                 is_causal=win is None, enable_gqa=True)
            x = self._attn_out(i, x, att.transpose(1, 2).flatten(-2))
            x = self._mlp(i, x)
        hid = self._norm(x, "output_norm.weight")
        if return_logits:
            return kv, hid, hid @ self.output_matrix().T
        return kv, hid

    # -- [CLS] queries against cached context ---------------------------------------
    def cls_forward(self, cls_row: torch.Tensor, ctx_kv: torch.Tensor, ctx_len: torch.Tensor) -> torch.Tensor:
        """Final normed hidden state of a [CLS] token placed right after a context.

        cls_row: (D,) the [CLS] input embedding (may require grad), or (K, D): K chained side
                 tokens (a learned soft prompt whose last row is the [CLS]) at positions
                 ctx_len .. ctx_len+K-1, each attending to the context and to the side rows
                 before it; the hidden state returned is the last one's.
        ctx_kv:  (n_layer, 2, Q, L, n_head_kv, head_dim) padded context keys/values, one per query
                 (fastest when its memory is laid out (n_layer, 2, Q, n_head_kv, L, head_dim), as
                 `safechat.train.cls_recipe.KVCache.gather` returns it). The [CLS] is read after as many layers as it holds (output
                 norm applied): the first n layers' keys/values read it after layer n, a measurement of
                 where the signal lives (`bench cls_variants --read-layers`; files and backends read the last).
        ctx_len: (Q,) number of valid context positions for each query; the [CLS] sits at
                 position ctx_len and attends to context[:ctx_len] and to itself.

        Attention is written out rather than one scaled_dot_product_attention over the context
        and side keys concatenated: the rep query heads sharing a key/value head become rep*K
        query rows against that head (no repeated keys/values), and the context's scores and
        weighted values are separate products, so backpropagation never builds gradients for
        the (large, frozen) context keys/values. Same mathematics; about 2x faster to train.
        """
        c = self.cfg
        rows = cls_row.view(-1, c.n_embd) * self.embed_scale
        K = rows.shape[0]
        Q, L = ctx_kv.shape[2], ctx_kv.shape[3]
        hkv, rep, hd = c.n_head_kv, c.n_head // c.n_head_kv, c.head_dim
        pos = ctx_len.view(Q, 1) + torch.arange(K).view(1, K)
        pad = torch.arange(L).view(1, 1, 1, L) >= ctx_len.view(Q, 1, 1, 1)
        ctx_bias = torch.zeros(Q, 1, 1, L).masked_fill(pad, float("-inf"))
        later = ~torch.ones(K, K, dtype=torch.bool).tril()                     # side rows see earlier ones
        side_bias = torch.zeros(K, K).masked_fill(later, float("-inf")).repeat(rep, 1)  # rows: (rep, K)
        scale = hd ** -0.5
        x = rows.expand(Q, K, c.n_embd)
        for i in range(ctx_kv.shape[0]):
            bias = ctx_bias
            win = self._window_mask(i, pos.view(Q, 1, K), torch.arange(L).view(1, 1, L))  # (Q, 1, K, L)
            if win is not None:  # query rows are (rep, K): the window per side row, repeated per query head
                bias = ctx_bias.masked_fill(~win.repeat(1, 1, rep, 1), float("-inf"))
            h = self._norm(x, f"blk.{i}.attn_norm.weight")
            q, k, v = self._qkv(i, h, pos)                                      # (Q, K, H, hd)
            q = q.view(Q, K, hkv, rep, hd).permute(0, 2, 3, 1, 4).reshape(Q, hkv, rep * K, hd)
            kc, vc = ctx_kv[i, 0].transpose(1, 2), ctx_kv[i, 1].transpose(1, 2)  # (Q, Hkv, L, hd)
            ks, vs = k.transpose(1, 2), v.transpose(1, 2)                        # (Q, Hkv, K, hd)
            s = torch.cat([(q @ kc.transpose(-1, -2)) * scale + bias,
                           (q @ ks.transpose(-1, -2)) * scale + side_bias], dim=-1)
            p = torch.softmax(s, dim=-1)
            o = p[..., :L] @ vc + p[..., L:] @ vs                                # (Q, Hkv, rep*K, hd)
            o = o.view(Q, hkv, rep, K, hd).permute(0, 3, 1, 2, 4).reshape(Q, K, c.n_head * hd)
            x = self._attn_out(i, x, o)
            x = self._mlp(i, x)
        return self._norm(x[:, -1], "output_norm.weight")                       # (Q, D)

    # -- the general pass (joint recipe, generation) ------------------------------------
    def to(self, device) -> "FrozenLlama":
        """Move the (frozen, float32) weights to `device`; returns self."""
        self.w = {k: v.to(device) for k, v in self.w.items()}
        self.inv_freq = self.inv_freq.to(device)
        return self

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None, lin=None,
                past: list | None = None, keep_kv: bool = False, layers: range | None = None):
        """Differentiable pass over input embeddings; returns (final normed hidden (B, S, D), kv).

        x:    (B, S, D) input embeddings (rows of token_embd, or a learned [CLS] row);
        pos:  (B, S) rotary position of every row (the joint recipe gives a [CLS] the position
              of the token after it, as the runtime's side [CLS] has);
        mask: (B, 1, S, P + S) bool, True where a row may attend; None = plain causal (no past);
        lin:  optional `lin(name, h, W)` replacing `h @ W.T` (LoRA adapters);
        past: optional per-layer (k, v), each (B, P, n_head_kv, head_dim), prepended to the keys,
              or a `DecodeCache`, written in place (P = its filled length; it is advanced by S);
        kv:   with keep_kv, the per-layer (k, v) including past, or the DecodeCache (else None);
        layers: run only these layers (default: all). x is then the residual stream entering the
              first of them, and the output norm is applied only when the range ends at the last
              layer; otherwise the raw residual stream after the range is returned (the joint
              recipe's frozen lower layers, computed once: `safechat/train/joint_cache.py`). `past` is
              indexed by position in the range.
        """
        c = self.cfg
        layers = range(c.n_layer) if layers is None else layers
        cache = past if isinstance(past, DecodeCache) else None
        kv = [] if keep_kv else None
        P = cache.n if cache is not None else 0 if past is None else past[0][0].shape[1]
        k_pos = pos if past is None else torch.cat([torch.arange(P, device=pos.device).expand(len(pos), P), pos], 1)
        for j, i in enumerate(layers):
            h = self._norm(x, f"blk.{i}.attn_norm.weight")
            q, k, v = self._qkv(i, h, pos, lin)
            if cache is not None:
                k, v = cache.write(j, k, v)
            elif past is not None:
                k, v = torch.cat([past[j][0], k], 1), torch.cat([past[j][1], v], 1)
            if keep_kv and cache is None:
                kv.append((k, v))
            m, win = mask, self._window_mask(i, pos, k_pos)  # past rows are positions 0 .. P-1
            if win is not None:
                causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
                m = (causal if m is None else m) & win.unsqueeze(1)
            att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=m, is_causal=m is None, enable_gqa=True)
            x = self._attn_out(i, x, att.transpose(1, 2).flatten(-2), lin)
            x = self._mlp(i, x, lin)
        if cache is not None:
            cache.n += x.shape[1]
            kv = cache if keep_kv else None
        if layers.stop < c.n_layer:
            return x, kv
        return self._norm(x, "output_norm.weight"), kv
