"""LoRA through PEFT on a transformers base (`FrozenHF`): the joint recipe's adapters for every family.

    model = FrozenHF("qwen3.gguf")                    # safechat/convert/hf_frozen.py, any family the importer knows
    lora = PeftLoRA(model, "all", rank=8, alpha=16)   # PEFT LoRA layers injected into transformers' projections

The interface of the hand-written `LoRA` (safechat/train/lora.py) that `train_joint` uses: `parameters()`,
`state()`/`load_state()`, `factors()` and `names`, in GGUF tensor names. PEFT replaces each targeted
`nn.Linear` in place, so `FrozenHF.forward` (transformers' own decoder layers, a 4D mask, explicit
positions) runs through the adapters with no hook; `linear` is None.

Targets are named as for the hand-written path (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up,
ffn_down; groups attn, mlp, all); each Linear's GGUF name comes from the family table
(`hf_families.gguf_names`). Phi-3's fused projections (qkv_proj -> attn_qkv, gate_up_proj -> ffn_up) get
one adapter when any of their parts is a target. `factors()` gives the deltas in the GGUF's layout: the
rows of `scale * B` go through the family's transform (Llama's Q/K permutation), A is the input side and
needs none, so `runtime/merge.py` adds `second @ first` to the file's tensor.
"""
from __future__ import annotations

import numpy as np
import torch

from safechat.convert.hf_families import gguf_names, transform
from safechat.convert.hf_reference import to_hf

from .joint_dist import assign, full
from .lora import target_names

_ALWAYS = ["model.embed_tokens.weight", "model.norm.weight"]  # what gguf_names wants to see in every checkpoint
FUSED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_up": ("ffn_gate", "ffn_up")}  # Phi-3's fused tensors


def target_modules(model, targets: str | list[str], first_layer: int = 0) -> dict[str, str]:
    """{transformers module name: GGUF tensor name} of the Linear layers the adapters go on."""
    want = {n.split(".")[2] for n in target_names(model, targets, first_layer)}  # the hand-written path's parsing
    linears = [n for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    always = _ALWAYS + ([] if model.facts["tied"] else ["lm_head.weight"])
    names = gguf_names(model.facts, [n + ".weight" for n in linears] + always, model.path)
    out = {}
    for mod in linears:
        g = names[mod + ".weight"]               # blk.{i}.{part}.weight
        _, i, part, _ = g.split(".")
        fused = FUSED.get(part) if model.facts["arch"] == "phi3" else None
        if int(i) >= first_layer and (part in want or (fused and want & set(fused))):
            out[mod] = g
    if not out:
        raise ValueError(f"no projection of this {model.facts['arch']} model matches the LoRA targets {targets!r}")
    return out


def _strip(module: torch.nn.Module) -> None:
    """Put back the plain Linear layers under any PEFT LoRA layers (their base layers, untouched)."""
    from peft.tuners.lora import LoraLayer

    for name, mod in list(module.named_modules()):
        if isinstance(mod, LoraLayer):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, mod.get_base_layer())


class PeftLoRA:
    """Rank-r PEFT LoRA adapters on a `FrozenHF` model's projections (B starts at zero: training starts
    from the base model exactly)."""

    linear = None  # the adapters live inside the model's layers

    def __init__(self, model, targets: str | list[str] = "all", rank: int = 16, alpha: float = 32.0,
                 seed: int = 0, first_layer: int = 0):
        from peft import LoraConfig, inject_adapter_in_model

        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        _strip(model.model)  # a new set replaces the adapters of an earlier run on this model
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / rank
        self._gguf = target_modules(model, targets, first_layer)
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                         target_modules=list(self._gguf))
        dev = model.w["token_embd.weight"].device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # PEFT initialises A (kaiming-uniform) from the global generator
            inject_adapter_in_model(cfg, model.model)
        model.model.to(dev)
        mods = dict(model.model.named_modules())
        self._layers = {g: mods[m] for m, g in self._gguf.items()}
        self._family = model.facts

    @property
    def names(self) -> list[str]:
        return list(self._layers)

    def pair(self, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        """(A (r, in), B (out, r)) of a GGUF tensor's adapter, in transformers' layout."""
        layer = self._layers[name]
        return layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def parameters(self) -> list[torch.nn.Parameter]:
        return [t for n in self._layers for t in self.pair(n)]

    def state(self) -> dict[str, torch.Tensor]:
        """The adapters as the hand-written `LoRA.state()` holds them (GGUF names and layout), so a
        checkpoint reads the same whichever engine wrote it."""
        s = {}
        for n in self._layers:
            a, b = (full(t.detach()).cpu() for t in self.pair(n))  # whole tensors under FSDP (every rank calls)
            s[n + ".lora_a"] = a
            s[n + ".lora_b"] = torch.from_numpy(np.ascontiguousarray(transform(self._family, n, b.numpy())))
        return s

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self._layers if n + ".lora_a" not in state or n + ".lora_b" not in state]
        if missing or len(state) != 2 * len(self._layers):
            raise ValueError(f"LoRA state does not match the adapters ({len(missing)} tensors missing)")
        for n in self._layers:
            a, b = self.pair(n)
            assign(a, state[n + ".lora_a"])
            assign(b, torch.from_numpy(np.ascontiguousarray(to_hf(self._family, n, state[n + ".lora_b"].numpy()))))

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """GGUF name -> (A (r, in), scale * B (out, r)) in the file's layout: delta = second @ first."""
        out = {}
        for n in self._layers:
            a, b = (full(t.detach()).float().cpu() for t in self.pair(n))
            out[n] = (a.numpy(), np.ascontiguousarray(transform(self._family, n, (b * self.scale).numpy())))
        return out
