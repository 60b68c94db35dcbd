"""Any family the importer knows as the frozen base of the `cls` recipe, computed by transformers.

    model = FrozenHF("qwen3.gguf")       # what safechat.convert.reference.load_frozen returns for qwen2/qwen3/phi3

The recipe's interface of `FrozenLlama` (`cfg`, `embed`, `prefill`, `forward` with past keys/values
and a 4D mask, `cls_forward` against cached keys/values, `w["token_embd.weight"]`), on top of the
transformers model of the file's weights (`safechat/convert/hf_reference.py`: the model `verify` checks
llama.cpp against). Every pass goes through transformers' own decoder layers with
an explicit 4D mask and explicit position ids, which is all strategic attention needs: a [CLS] row is
an input embedding at the position of the token after its context, attending to the context's
cached keys/values and to itself, and nothing attends to it.

Why `FrozenLlama`/`FrozenGemma3` stay for llama and gemma3: their `cls_forward` splits the context's
and the side rows' attention so backpropagation never builds gradients for the (frozen) context
keys/values; through transformers' attention it does. `safechat bench frozen_speed` measures the
difference (docs/byom.md). Keys/values here are in transformers' layout (rotate-half rotary), not
llama.cpp's; they only ever meet this class's own queries.

The joint recipe runs here too: PEFT's LoRA layers go into transformers' projections in place
(safechat/train/hf_lora.py), so `forward` needs no hook; the `lin` hook and layer ranges (the cached
lower layers of safechat/train/joint_cache.py) are the hand-written models' only.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .hf_reference import reference_model
from .llama_torch import Config

_NEG = torch.finfo(torch.float32).min


class FrozenHF:
    """A frozen GGUF base through transformers (float32, no grad on weights)."""

    def __init__(self, path: str | Path):
        from transformers import DynamicCache

        self._cache_cls = DynamicCache
        model, facts = reference_model(path)
        self.model = model.requires_grad_(False)
        self.path, self.facts, self.arch = Path(path), facts, facts["arch"]
        c = model.config
        emb = model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", 1.0)  # Gemma 3: sqrt(hidden), applied inside embed_tokens
        self.embed_scale = float(scale)
        self.w = {"token_embd.weight": emb.weight}
        self.tied = facts["tied"]
        self.cfg = Config(n_layer=c.num_hidden_layers, n_embd=c.hidden_size, n_head=c.num_attention_heads,
                          n_head_kv=c.num_key_value_heads, n_ff=c.intermediate_size,
                          rope_base=float(getattr(c, "rope_theta", 0.0) or 0.0), eps=float(c.rms_norm_eps),
                          n_vocab=emb.weight.shape[0],
                          head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
        self.window = getattr(c, "sliding_window", None) if "sliding_attention" in types else None
        self._mapping = "sliding_attention" in types

    def to(self, device) -> "FrozenHF":
        self.model.to(device)
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model.get_input_embeddings()(tokens)

    def output_matrix(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    # -- one pass through transformers ---------------------------------------------------
    def _masks(self, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
        """transformers' attention_mask argument: additive float masks (B, 1, S, P + S) from `allowed`,
        the sliding-window layers' with the window applied by position (a key is seen while q - k < window)."""
        full = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, _NEG)
        if not self._mapping:
            return full
        near = (q_pos[:, None, :, None] - k_pos[:, None, None, :]) < self.window
        return {"full_attention": full, "sliding_attention": full.masked_fill(~near, _NEG)}

    def _run(self, x: torch.Tensor, pos: torch.Tensor, allowed: torch.Tensor, past=None):
        """(final normed hidden (B, S, D), the cache) for input embeddings x at positions pos, after
        `past` keys/values (per layer (k, v) in (B, H_kv, P, hd)), each row attending where `allowed`."""
        cache = self._cache_cls()  # every layer keeps all its keys (no sliding-window cropping)
        P = 0
        if past is not None:
            for j, (k, v) in enumerate(past):
                cache.update(k, v, j)
            P = past[0][0].shape[2]
        B, S = pos.shape
        k_pos = pos if P == 0 else torch.cat([torch.arange(P, device=pos.device).expand(B, P), pos], 1)
        out = self.model.model(inputs_embeds=x, position_ids=pos, attention_mask=self._masks(allowed, pos, k_pos),
                               cache=cache, use_cache=True)
        return out.last_hidden_state, cache

    @staticmethod
    def _layers(cache):
        return [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, return_logits: bool = False):
        """tokens (B, T), right-padded -> (kv (n_layer, 2, B, T, H_kv, hd), final hidden[, logits])."""
        B, T = tokens.shape
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril().expand(B, 1, T, T)
        hid, cache = self._run(self.embed(tokens), pos, causal)
        kv = torch.stack([torch.stack([k, v]) for k, v in self._layers(cache)]).transpose(3, 4)
        if return_logits:
            return kv, hid, hid @ self.output_matrix().T
        return kv, hid

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None, lin=None,
                past: list | None = None, keep_kv: bool = False, layers: range | None = None):
        """`FrozenLlama.forward` for the `cls` recipe: past per-layer (k, v) in (B, P, H_kv, hd), a bool
        mask (B, 1, S, P + S) (None: causal); returns (final normed hidden, per-layer (k, v) with past)."""
        if lin is not None or layers is not None:
            raise ValueError(f"a LoRA hook or a layer range needs the hand-written llama model; this base is "
                             f"{self.arch} through transformers (LoRA: safechat/train/hf_lora.py)")
        B, S = pos.shape
        if mask is None:
            if past is not None:
                raise ValueError("forward with past keys/values needs an explicit mask")
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril().expand(B, 1, S, S)
        hf_past = None if past is None else [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in past]
        hid, cache = self._run(x, pos, mask, hf_past)
        kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in self._layers(cache)] if keep_kv else None
        return hid, kv

    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new: int, eog: set[int], batch_size: int = 64,
               n_vocab: int | None = None, part: tuple[int, int] = (0, 1)) -> list[list[int]]:
        """Greedy continuations by transformers' `generate` (left-padded batches; each ends with the
        end-of-generation token when one was produced), as `joint_data.generate` gives for the hand-written
        models. part=(k, n): only the batches k, k + n, ... (the others' answers are left empty)."""
        dev = self.w["token_embd.weight"].device
        out: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        bad = None
        if n_vocab is not None and n_vocab < self.cfg.n_vocab:  # never predict rows past the base vocabulary
            bad = [[t] for t in range(n_vocab, self.cfg.n_vocab)]
        for b, s in enumerate(range(0, len(order), batch_size)):
            if b % part[1] != part[0]:
                continue
            idx = order[s:s + batch_size]
            L = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), L, dtype=torch.long)
            att = torch.zeros(len(idx), L, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, L - len(prompts[i]):] = torch.tensor(prompts[i])
                att[r, L - len(prompts[i]):] = 1
            gen = self.model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=sorted(eog), pad_token_id=0,
                                      bad_words_ids=bad, temperature=None, top_p=None, top_k=None)
            for r, i in enumerate(idx):
                for t in gen[r, L:].tolist():
                    out[i].append(t)
                    if t in eog:
                        break
        return out

    def cls_forward(self, cls_row: torch.Tensor, ctx_kv: torch.Tensor, ctx_len: torch.Tensor) -> torch.Tensor:
        """`FrozenLlama.cls_forward`: final hidden state of [CLS] (or K chained side rows) after each
        query's context; ctx_kv (n_layer, 2, Q, L, H_kv, hd) from this class's `prefill`."""
        c = self.cfg
        if ctx_kv.shape[0] != c.n_layer:
            raise ValueError("reading the [CLS] after fewer layers (read_layer) needs a llama or gemma3 base")
        rows = cls_row.view(-1, c.n_embd) * self.embed_scale
        K = rows.shape[0]
        Q, L = ctx_kv.shape[2], ctx_kv.shape[3]
        pos = ctx_len.view(Q, 1) + torch.arange(K).view(1, K)
        seen = (torch.arange(L).view(1, 1, 1, L) < ctx_len.view(Q, 1, 1, 1)).expand(Q, 1, K, L)
        side = torch.ones(K, K, dtype=torch.bool).tril().expand(Q, 1, K, K)
        past = [(ctx_kv[i, 0].transpose(1, 2), ctx_kv[i, 1].transpose(1, 2)) for i in range(c.n_layer)]
        hid, _ = self._run(rows.expand(Q, K, c.n_embd), pos, torch.cat([seen, side], -1), past)
        return hid[:, -1]
