"""Gemma 3 (GGUF architecture `gemma3`) as a frozen torch model: the `cls` recipe on a second base.

`FrozenLlama` with the pieces Gemma 3 changes, as llama.cpp computes them (llm_build_gemma3_iswa):

* input embeddings scaled by sqrt(n_embd) (a [CLS] row too: it is a token of the file);
* per-head RMSNorm of queries and keys (attn_q_norm, attn_k_norm) before the rotary embedding,
  which rotates the two halves of each head (NEOX), with base 10,000 on sliding-window layers and
  the file's rope.freq_base on the others;
* sliding-window attention (attention.sliding_window keys back) on five of every six layers
  (layer i is global when i % 6 == 5);
* RMSNorm after the attention output and after the MLP (post_attention_norm, post_ffw_norm),
  before each residual add; GeGLU (tanh-approximated GELU) instead of SwiGLU.

GGUF stores Gemma's norm weights with the +1 already added, so `_norm` is the plain RMSNorm. Query
scale 1/sqrt(head_dim), as llama.cpp uses for every Gemma 3 size but 27B.
"""
from __future__ import annotations

import math

import gguf
import torch
import torch.nn.functional as F

from .llama_torch import FrozenLlama, _field

SWA_PATTERN = 6          # llama.cpp: set_swa_pattern(6): layers 0-4 of every 6 use the window
LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3 (unless the file says otherwise)


class FrozenGemma3(FrozenLlama):
    ARCH = "gemma3"

    def _setup(self, reader: gguf.GGUFReader) -> None:
        self.embed_scale = math.sqrt(self.cfg.n_embd)
        self.window = int(_field(reader, "gemma3.attention.sliding_window", 0)) or None
        self.inv_freq_local = self._inv_freq(float(_field(reader, "gemma3.rope.freq_base_swa", LOCAL_ROPE_BASE)))

    def to(self, device) -> "FrozenGemma3":
        super().to(device)
        self.inv_freq_local = self.inv_freq_local.to(device)
        return self

    def _window(self, i: int) -> int | None:
        return self.window if i % SWA_PATTERN < SWA_PATTERN - 1 else None

    @staticmethod
    def _rope_halves(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """NEOX rotation: dimension j pairs with j + head_dim/2. x: (..., T, H, hd), pos: (..., T)."""
        ang = (pos.to(torch.float64)[..., None] * inv_freq).to(x.dtype)
        cos, sin = ang.cos()[..., None, :], ang.sin()[..., None, :]
        x0, x1 = x.chunk(2, dim=-1)
        return torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)

    def _qkv(self, i: int, h: torch.Tensor, pos: torch.Tensor, lin=None):
        c, p = self.cfg, f"blk.{i}."
        q = self._linear(p + "attn_q.weight", h, lin).unflatten(-1, (c.n_head, c.head_dim))
        k = self._linear(p + "attn_k.weight", h, lin).unflatten(-1, (c.n_head_kv, c.head_dim))
        v = self._linear(p + "attn_v.weight", h, lin).unflatten(-1, (c.n_head_kv, c.head_dim))
        inv = self.inv_freq if self._window(i) is None else self.inv_freq_local
        q = self._rope_halves(self._norm(q, p + "attn_q_norm.weight"), pos, inv)
        k = self._rope_halves(self._norm(k, p + "attn_k_norm.weight"), pos, inv)
        return q, k, v

    def _attn_out(self, i: int, x: torch.Tensor, o: torch.Tensor, lin=None) -> torch.Tensor:
        p = f"blk.{i}."
        return x + self._norm(self._linear(p + "attn_output.weight", o, lin), p + "post_attention_norm.weight")

    def _mlp(self, i: int, x: torch.Tensor, lin=None) -> torch.Tensor:
        p = f"blk.{i}."
        h = self._norm(x, p + "ffn_norm.weight")
        g = F.gelu(self._linear(p + "ffn_gate.weight", h, lin), approximate="tanh") * \
            self._linear(p + "ffn_up.weight", h, lin)
        return x + self._norm(self._linear(p + "ffn_down.weight", g, lin), p + "post_ffw_norm.weight")
