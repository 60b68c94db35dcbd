"""The ONNX export's decoder step for every family but llama, through transformers' own layers.

`build_hf_module(FrozenHF(path), safe_id, unsafe_id, category_ids)` is a torch module with the I/O
of `safechat/convert/onnx_export.py` (input_ids, position_ids, logits_index, past keys/values per layer in,
next-token logits, safety logits and the new keys/values out); `torch.onnx.export(dynamo=True)`
traces it, cache and all. The past keys/values become a transformers `DynamicCache` inside the
graph; the attention mask is built in the graph from the past length (the causal mask, and for
Gemma 3's sliding-window layers the window), so the file computes what transformers computes
(tests/test_onnx_families.py: what llama.cpp computes on the same GGUF).

llama keeps its hand-written graph (`onnx_export.build_module`): its grouped-query attention never
repeats keys/values and its weights are laid out for onnxruntime's MatMulNBits quantizer, as
measured on the default model (docs/results/default.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG = torch.finfo(torch.float32).min


def build_hf_module(fh, safe_id: int, unsafe_id: int, category_ids: tuple[int, ...] = ()) -> torch.nn.Module:
    """fh: a `safechat.convert.hf_frozen.FrozenHF`; keys/values are sequence-major [1, P, Hkv, hd] as the runtime keeps them."""
    from transformers import DynamicCache

    hf = fh.model
    window = fh.window if fh._mapping else None

    class HFSafeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = hf
            head = hf.get_output_embeddings().weight[[safe_id, unsafe_id, *category_ids]]
            self.register_buffer("head", head.detach().clone(), persistent=False)  # [2 + C, D]

        def forward(self, input_ids, position_ids, logits_index, *past):
            T, P = input_ids.shape[1], past[0].shape[1]
            cache = DynamicCache()  # every layer keeps all its keys: the window is the mask's
            for i in range(len(past) // 2):
                cache.update(past[2 * i].transpose(1, 2), past[2 * i + 1].transpose(1, 2), i)
            q_pos = torch.arange(T) + P
            k_pos = torch.arange(P + T)
            seen = k_pos[None, :] <= q_pos[:, None]                                   # [T, P + T]
            mask = torch.zeros(seen.shape).masked_fill(~seen, _NEG)[None, None]
            if window is not None:
                near = (q_pos[:, None] - k_pos[None, :]) < window
                mask = {"full_attention": mask, "sliding_attention": mask.masked_fill(~near[None, None], _NEG)}
            out = self.m.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, cache=cache,
                               use_cache=True)
            hid = out.last_hidden_state[0]                                             # [T, D]
            logits = F.linear(hid.index_select(0, logits_index), self.m.get_output_embeddings().weight)
            safety = F.linear(hid[-1:], self.head)
            new = []
            for layer in cache.layers:
                new += [layer.keys[:, :, P:].transpose(1, 2), layer.values[:, :, P:].transpose(1, 2)]
            return (logits, safety, *new)

    return HFSafeDecoder().eval()
