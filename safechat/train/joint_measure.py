"""Measuring a joint artifact: p_unsafe at the held-out [CLS] positions, by llama.cpp on the converted GGUF
(the runtime's own path) or by the torch model with the adapters (`score`); the threshold calibrated on val.
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from runtime.artifact import Artifact
from runtime.fold import convert_gguf
from runtime.merge import load_deltas

from .cls_recipe import metrics_for
from .joint import JointSeq, hidden, layout, make_batches
from .joint_data import held_out


@torch.no_grad()
def score(model, lora, cls_row, head, seqs: list[JointSeq],
          batch_tokens: int = 8192) -> list[list[float]]:
    """p_unsafe at every [CLS] position (in `cls_at` order) of every sequence, in torch."""
    dev = model.w["token_embd.weight"].device
    cls_row = torch.as_tensor(cls_row, dtype=torch.float32, device=dev)
    head = torch.as_tensor(head, dtype=torch.float32, device=dev)
    out: list[list[float]] = [[] for _ in seqs]
    for idx in make_batches(seqs, batch_tokens):
        batch = layout([seqs[i] for i in idx]).to(dev)
        h = hidden(model, lora, cls_row, batch)
        p = torch.softmax(h.float() @ head.T, -1)[..., 1]
        for r, i in enumerate(idx):
            out[i] = p[r][batch.is_cls[r]].tolist()
    return out


def score_torch(model, lora, cls_row, head, held) -> list[list[float]]:
    seqs = [JointSeq(e.tokens, e.positions, e.label) for e in held]
    return score(model, lora, cls_row, head, seqs)


def score_llama(base: Path, cls_row, head, deltas_dir: Path, held: dict, threads: int) -> dict:
    from .cls_recipe import score_gguf
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "candidate.gguf"
        convert_gguf(base, Artifact(cls_row, head, {"threshold": 0.5}), path, progress=False,
                     deltas=load_deltas(deltas_dir))
        return {s: score_gguf(path, held[s], threads=threads) for s in held}


def held_sets(prep: dict, limit: int, seed: int) -> dict:
    held = {s: held_out(prep, s) for s in ("val", "test")}
    if limit:
        rng = random.Random(seed)
        held = {s: rng.sample(v, min(limit, len(v))) for s, v in held.items()}
    return held


def measure(how: str, base: Path, model, lora, cls_row, head, art_dir: Path, held: dict, max_fpr: float,
            threads: int):
    if how == "llama":
        scored = score_llama(base, cls_row, head, art_dir, held, threads)
        on = "converted GGUF (deltas merged), llama.cpp, [CLS] positions"
    else:
        scored = {s: score_torch(model, lora, cls_row, head, held[s]) for s in held}
        on = "torch float32 model with the LoRA adapters, [CLS] positions"
    thr, metrics = metrics_for(held, scored, max_fpr, on)
    scores = {s: {e.meta["id"]: [round(float(p), 6) for p in ps] for e, ps in zip(held[s], scored[s])}
              for s in held}
    return thr, metrics, scores
