"""LoRA adapters on the torch Llama's projections (the `joint` recipe's trainable weights).

For a GGUF tensor W (out, in) an adapter adds `scale * B @ A` with A (r, in), B (out, r),
scale = alpha / r; B starts at zero, so training starts from the base model exactly. The
adapters plug into `FrozenLlama.forward(lin=adapters.linear)`. `factors()` returns, per
touched tensor, (A, scale * B) as float32 numpy: the merged delta is their product, which
`convert/merge.py` adds to the GGUF tensor (numpy only, no torch).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from safechat.convert.llama_torch import FrozenLlama

TARGET_GROUPS = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "mlp": ("ffn_gate", "ffn_up", "ffn_down"),
}
TARGET_GROUPS["all"] = TARGET_GROUPS["attn"] + TARGET_GROUPS["mlp"]


def target_names(model: FrozenLlama, targets: str | list[str], first_layer: int = 0) -> list[str]:
    """GGUF tensor names for `targets`: a group ('attn', 'mlp', 'all') or projection names, in layers
    first_layer .. n_layer-1 (the joint recipe's upper layers; below them the model stays frozen)."""
    if not 0 <= first_layer < model.cfg.n_layer:
        raise ValueError(f"first LoRA layer {first_layer} outside 0..{model.cfg.n_layer - 1}")
    parts = []
    for t in ([targets] if isinstance(targets, str) else targets):
        for piece in t.split(","):
            piece = piece.strip()
            if piece in TARGET_GROUPS:
                parts += TARGET_GROUPS[piece]
            elif piece in TARGET_GROUPS["all"]:
                parts.append(piece)
            else:
                raise ValueError(f"unknown LoRA target {piece!r}: use attn, mlp, all or "
                                 f"{', '.join(TARGET_GROUPS['all'])}")
    parts = list(dict.fromkeys(parts))
    return [f"blk.{i}.{p}.weight" for i in range(first_layer, model.cfg.n_layer) for p in parts]


class LoRA:
    """Rank-r adapters for a set of the model's weight tensors."""

    def __init__(self, model: FrozenLlama, targets: str | list[str] = "all", rank: int = 16,
                 alpha: float = 32.0, seed: int = 0, first_layer: int = 0):
        if rank < 1:
            raise ValueError("LoRA rank must be at least 1")
        self.rank, self.alpha, self.scale = int(rank), float(alpha), float(alpha) / rank
        gen = torch.Generator().manual_seed(seed)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for name in target_names(model, targets, first_layer):
            out_f, in_f = model.w[name].shape
            bound = 1.0 / math.sqrt(in_f)  # kaiming-uniform(a=sqrt(5)) as in nn.Linear / peft
            dev = model.w[name].device
            # Parameters, so that the module DDP wraps (safechat/train/joint_dist.py) holds these very tensors
            self.a[name] = torch.nn.Parameter(((torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound).to(dev))
            self.b[name] = torch.nn.Parameter(torch.zeros(out_f, rank, device=dev))

    @property
    def names(self) -> list[str]:
        return list(self.a)

    def parameters(self) -> list[torch.Tensor]:
        return [t for n in self.a for t in (self.a[n], self.b[n])]

    def linear(self, name: str, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """h @ (W + scale B A).T, computed without forming the delta."""
        out = h @ w.T
        a = self.a.get(name)
        if a is None:
            return out
        return out + ((h @ a.T) @ self.b[name].T) * self.scale

    # -- persistence -----------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        s = {}
        for n in self.a:
            s[n + ".lora_a"] = self.a[n].detach().cpu()
            s[n + ".lora_b"] = self.b[n].detach().cpu()
        return s

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.a if n + ".lora_a" not in state or n + ".lora_b" not in state]
        if missing or len(state) != 2 * len(self.a):
            raise ValueError(f"LoRA state does not match the adapters ({len(missing)} tensors missing)")
        with torch.no_grad():
            for n in self.a:
                self.a[n].copy_(state[n + ".lora_a"])
                self.b[n].copy_(state[n + ".lora_b"])

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (A (r, in), scale * B (out, r)), float32 numpy: delta = second @ first."""
        return {n: (self.a[n].detach().float().cpu().numpy(),
                    (self.b[n].detach().float() * self.scale).cpu().numpy()) for n in self.a}

    def merged_into(self, model: FrozenLlama) -> dict[str, torch.Tensor]:
        """A copy of the model's weights with the deltas added (for reference computations)."""
        w = dict(model.w)
        with torch.no_grad():
            for n in self.a:
                w[n] = model.w[n] + self.scale * (self.b[n] @ self.a[n])
        return w
