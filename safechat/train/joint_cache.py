"""The joint recipe's frozen lower layers, computed once (`train joint --first-layer L`).

A training step on these CPUs is compute-bound (issue 20: ~110 tokens/s with LoRA on all 30
layers), so only fewer FLOPs per useful token make a CPU-hour count. With LoRA on layers
L..n-1 alone and the [CLS] input row held fixed (taken from a `cls` artifact, `--init-from`),
every row of a laid-out training sequence, real token or [CLS], enters layer L with a residual
stream that is a function of the data alone: no real token sees a [CLS] (strategic attention),
a [CLS] sees only real tokens and itself, and the layers below L carry no adapter. So those
states are computed once, kept in one float32 array on disk beside the checkpoint, and every
training step runs layers L..n-1 only, forward and backward. The step is then what the full
pass computes, exactly (tests/test_joint_cache.py), for a fraction of its cost.

The file is keyed on the sequences, the layer, the [CLS] row and the base weights: a cache made
for anything else is refused, never silently reused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .joint import JointSeq, data_digest, expanded_len, layout, make_batches
from safechat.convert.llama_torch import FrozenLlama

STATES = "lower_states.npy"
STATES_META = "lower_states.json"


def cache_key(seqs: list[JointSeq], layer: int, cls_row, model: FrozenLlama) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([data_digest(seqs), int(layer)]).encode())
    h.update(np.ascontiguousarray(np.asarray(cls_row, dtype=np.float32)).tobytes())
    for name in ("token_embd.weight", f"blk.{max(layer - 1, 0)}.ffn_down.weight"):
        h.update(model.w[name].detach().cpu().numpy().tobytes()[:1 << 20])
    return h.hexdigest()[:16]


@dataclass
class LowerStates:
    """The residual stream entering layer `layer` for every laid-out row of every sequence."""
    states: np.ndarray     # (total rows, D) float32, sequence after sequence, in `layout` row order
    offsets: np.ndarray    # (n_seqs + 1,) row offsets
    layer: int
    key: str

    def batch(self, idx: list[int], width: int) -> torch.Tensor:
        """(B, width, D) states of sequences `idx`, zero rows after each one's end (padding)."""
        out = torch.zeros(len(idx), width, self.states.shape[1])
        for r, i in enumerate(idx):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            out[r, :b - a] = torch.from_numpy(np.array(self.states[a:b]))  # a copy: the file is mapped read-only
        return out

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        tmp = out_dir / (STATES + ".tmp.npy")
        np.save(tmp, self.states)
        tmp.replace(out_dir / STATES)
        meta = {"layer": self.layer, "key": self.key, "offsets": self.offsets.tolist()}
        (out_dir / STATES_META).write_text(json.dumps(meta))
        return out_dir / STATES

    @classmethod
    def load(cls, out_dir: Path, key: str) -> "LowerStates | None":
        """The cached states in out_dir when they were made for `key`, else None."""
        out_dir = Path(out_dir)
        if not (out_dir / STATES).is_file() or not (out_dir / STATES_META).is_file():
            return None
        meta = json.loads((out_dir / STATES_META).read_text())
        if meta.get("key") != key:
            return None
        states = np.load(out_dir / STATES, mmap_mode="r")
        offsets = np.asarray(meta["offsets"], dtype=np.int64)
        if states.shape[0] != offsets[-1]:
            return None
        return cls(states, offsets, int(meta["layer"]), key)


@torch.no_grad()
def compute_lower(model: FrozenLlama, seqs: list[JointSeq], layer: int, cls_row, *,
                  batch_tokens: int = 8192, progress: bool = True) -> LowerStates:
    """Run layers 0..layer-1 once over every laid-out sequence ([CLS] rows = `cls_row`)."""
    if not 0 < layer < model.cfg.n_layer:
        raise ValueError(f"first LoRA layer {layer}: the cached lower layers must be 1..{model.cfg.n_layer - 1}")
    dev = model.w["token_embd.weight"].device
    row = torch.as_tensor(np.asarray(cls_row), dtype=torch.float32, device=dev)
    lens = np.array([expanded_len(s) for s in seqs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    states = np.empty((int(offsets[-1]), model.cfg.n_embd), dtype=np.float32)
    batches = make_batches(seqs, batch_tokens)
    for idx in tqdm(batches, desc=f"frozen layers 0-{layer - 1}", disable=not progress, mininterval=10):
        b = layout([seqs[i] for i in idx]).to(dev)
        x = torch.where(b.is_cls[..., None], row, model.embed(b.ids))
        h, _ = model.forward(x, b.pos, b.mask, layers=range(layer))
        h = h.float().cpu().numpy()
        for r, i in enumerate(idx):
            states[offsets[i]:offsets[i + 1]] = h[r, :lens[i]]
    return LowerStates(states, offsets, layer, cache_key(seqs, layer, cls_row, model))


def lower_states(model: FrozenLlama, seqs: list[JointSeq], layer: int, cls_row, out_dir: Path,
                 batch_tokens: int = 8192, log=print) -> LowerStates:
    """The cached states in out_dir when they match, else computed (and saved there)."""
    key = cache_key(seqs, layer, cls_row, model)
    got = LowerStates.load(out_dir, key)
    if got is not None:
        log(f"frozen layers 0-{layer - 1}: cached states reused ({got.states.shape[0]} rows)")
        return got
    got = compute_lower(model, seqs, layer, cls_row, batch_tokens=batch_tokens)
    got.save(out_dir)
    return got
