"""The paper's `joint` recipe (docs/design.md section 4): LoRA + [CLS] row + head, one loss.

loss = LM loss on response tokens + lambda * class-balanced cross-entropy of the [CLS] head
(two logits, i.e. a binary BCE) at several [CLS] positions per sequence.

Strategic attention, laid out exactly as the runtime computes it (docs/design.md section 3): a
[CLS] placed after `tokens[:p]` is inserted into the sequence right after token p-1, gets
rotary position p, and the real token after it keeps position p too; the 4D mask lets a
[CLS] row see every real token before it and itself, and hides every [CLS] column from every
other row. So the real tokens compute exactly what they compute without any [CLS] (the LM
loss is unchanged by the insertion) and each [CLS] computes what a side [CLS] appended
alone after its prefix computes (tests/test_joint.py checks both).

Checkpoints (LoRA, [CLS] row, head, optimizer, schedule) are written every N steps; the batch
order is a function of (seed, step), so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cls_recipe import pack_batches
from safechat.convert.llama_torch import FrozenLlama
from .joint_dist import Dist, TrainStep, clip_grad_norm, optimizer_state, shard_layers
from .joint_window import apply_windows
from .lora import LoRA
from .run_state import resume_from, save_state

IGNORE = -100
CHECKPOINT = "checkpoint.pt"


@dataclass
class JointSeq:
    tokens: list[int]
    cls_at: list[int]             # a [CLS] right after tokens[:p], for each p (1 <= p <= len(tokens))
    label: int                    # the sequence's verdict: every [CLS]'s target unless cls_labels says otherwise
    lm_from: int | None = None    # LM loss on tokens[lm_from:] (the response); None: no LM loss
    meta: dict = field(default_factory=dict)
    cls_labels: list[int] | None = None  # per [CLS] position (multi-turn: benign until the harmful turn)

    def __post_init__(self):
        labels = self.cls_labels if self.cls_labels is not None else [self.label] * len(self.cls_at)
        if len(labels) != len(self.cls_at):
            raise ValueError(f"{len(labels)} [CLS] labels for {len(self.cls_at)} positions")
        by_pos = dict(zip((int(p) for p in self.cls_at), (int(v) for v in labels)))
        self.cls_at = sorted(by_pos)
        self.cls_labels = None if self.cls_labels is None else [by_pos[p] for p in self.cls_at]
        if self.cls_at and not 1 <= self.cls_at[0] <= self.cls_at[-1] <= len(self.tokens):
            raise ValueError(f"[CLS] positions {self.cls_at} outside 1..{len(self.tokens)}")

    def labels(self) -> list[int]:
        """The target of each [CLS] position, in cls_at order."""
        return list(self.cls_labels) if self.cls_labels is not None else [int(self.label)] * len(self.cls_at)


@dataclass
class Batch:
    ids: torch.Tensor        # (B, S) token ids (0 at [CLS] and padding)
    is_cls: torch.Tensor     # (B, S) bool
    pos: torch.Tensor        # (B, S) rotary positions ([CLS] shares the next real token's)
    mask: torch.Tensor       # (B, 1, S, S) bool, True = may attend
    lm_target: torch.Tensor  # (B, S) next token to predict at real rows, IGNORE elsewhere
    cls_label: torch.Tensor  # (B, S) label at [CLS] rows, IGNORE elsewhere

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def expanded_len(s: JointSeq) -> int:
    return len(s.tokens) + len(s.cls_at)


def layout(seqs: list[JointSeq], window=None) -> Batch:
    """Insert the [CLS] positions, build positions, the strategic-attention mask and targets; `window`
    (r1, r2, r3): the [CLS] inside answers attend to their windows (safechat/train/joint_window.py)."""
    rows = []
    for s in seqs:
        T, at, row = len(s.tokens), dict(zip(s.cls_at, s.labels())), []  # row: (id, is_cls, pos, lm, label)
        for j in range(T + 1):
            if j in at:  # the [CLS] after tokens[:j], at position j
                row.append((0, True, j, IGNORE, at[j]))
            if j < T:
                lm = s.lm_from is not None and max(s.lm_from, 1) <= j + 1 < T
                row.append((s.tokens[j], False, j, s.tokens[j + 1] if lm else IGNORE, IGNORE))
        rows.append(row)
    B, S = len(rows), max(len(r) for r in rows)
    ids = torch.zeros(B, S, dtype=torch.long)
    is_cls = torch.zeros(B, S, dtype=torch.bool)
    pos = torch.zeros(B, S, dtype=torch.long)
    valid = torch.zeros(B, S, dtype=torch.bool)
    lm_t = torch.full((B, S), IGNORE, dtype=torch.long)
    lab_t = torch.full((B, S), IGNORE, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        i, c, p, lm, lab = (torch.tensor(col) for col in zip(*row))
        ids[b, :n], is_cls[b, :n], pos[b, :n], lm_t[b, :n], lab_t[b, :n] = i, c, p, lm, lab
        valid[b, :n] = True
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    eye = torch.eye(S, dtype=torch.bool)
    key_ok = valid[:, None, :] & (~is_cls[:, None, :] | eye[None])   # nobody else sees a [CLS]
    mask = (causal[None] & key_ok)[:, None]
    if window is not None:
        apply_windows(seqs, window, pos, mask)
    return Batch(ids, is_cls, pos, mask, lm_t, lab_t)


def adapters(model, targets: str | list[str] = "all", rank: int = 16, alpha: float = 32.0, seed: int = 0,
             first_layer: int = 0):
    """LoRA adapters for the model: the hand-written hook on `FrozenLlama`, PEFT's layers inside a
    transformers base (`FrozenHF`, any family: safechat/train/hf_lora.py)."""
    if isinstance(model, FrozenLlama):
        return LoRA(model, targets, rank, alpha, seed, first_layer=first_layer)
    from .hf_lora import PeftLoRA
    if first_layer:
        raise ValueError("--first-layer (cached lower layers) needs the hand-written llama model (--engine llama)")
    return PeftLoRA(model, targets, rank, alpha, seed)


def hidden(model: FrozenLlama, lora: LoRA | None, cls_row: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Final normed hidden states of every row of a laid-out batch. The [CLS] input is its row times the
    model's embedding scale (Gemma's sqrt(d)), as the runtime feeds the row of the file."""
    x = model.embed(batch.ids)
    x = torch.where(batch.is_cls[..., None], (cls_row * getattr(model, "embed_scale", 1.0)).to(x.dtype), x)
    h, _ = model.forward(x, batch.pos, batch.mask, lin=lora.linear if lora is not None else None)
    return h


def hidden_upper(model: FrozenLlama, lora: LoRA | None, x: torch.Tensor, batch: Batch, first: int) -> torch.Tensor:
    """Final normed hidden states from the residual stream x entering layer `first` (safechat/train/joint_cache.py)."""
    h, _ = model.forward(x, batch.pos, batch.mask, lin=lora.linear if lora is not None else None,
                         layers=range(first, model.cfg.n_layer))
    return h


def joint_loss(model, lora, cls_row, head, batch: Batch, lam: float, class_w: torch.Tensor,
               h: torch.Tensor | None = None, lm_keep: torch.Tensor | None = None,
               norms: tuple[float, float] | None = None):
    """(total, lm, cls) losses of one batch; lm/cls are plain floats for logging.

    h: the batch's final hidden states when computed by the caller (the cached-lower-layers path);
    lm_keep: (B, S) bool, the LM-target rows to use (a sample of them: the 49k-wide output matrix
    costs about as much per row as ten upper layers), None = all;
    norms: (LM rows, [CLS] rows) of the whole global batch when this is a part of it (a rank's share, a
    micro-batch): the losses are then sums over this part divided by those counts, so the parts add up
    to the whole batch's means. None: means over this batch.
    """
    h = hidden(model, lora, cls_row, batch) if h is None else h
    sel = batch.lm_target != IGNORE
    if lm_keep is not None:
        sel = sel & lm_keep
    zero = h.sum() * 0.0 + head.sum() * 0.0  # every trainable tensor in the graph (DDP expects each one's gradient)
    red = "mean" if norms is None else "sum"
    if sel.any():
        logits = h[sel].float() @ model.output_matrix().T
        lm = F.cross_entropy(logits, batch.lm_target[sel], reduction=red) / (1.0 if norms is None else norms[0])
    else:
        lm = zero
    csel = batch.cls_label != IGNORE
    if csel.any():
        y = batch.cls_label[csel]
        ce = F.cross_entropy(h[csel].float() @ head.T, y, reduction="none")
        cls = (ce * class_w[y]).mean() if norms is None else (ce * class_w[y]).sum() / norms[1]
    else:
        cls = zero
    return lm + lam * cls, float(lm.detach()), float(cls.detach())


def row_counts(seqs: list[JointSeq]) -> tuple[float, float]:
    """(LM target rows, [CLS] rows) that `layout` gives these sequences."""
    lm = sum(max(0, len(s.tokens) - max(s.lm_from, 1)) for s in seqs if s.lm_from is not None)
    return float(lm), float(sum(len(s.cls_at) for s in seqs))


def make_batches(seqs: list[JointSeq], max_tokens: int) -> list[list[int]]:
    """Length-sorted groups of sequence indices with (count * longest) <= max_tokens."""
    order = sorted(range(len(seqs)), key=lambda i: expanded_len(seqs[i]))
    return pack_batches(order, lambda b, i: (len(b) + 1) * expanded_len(seqs[i]) > max_tokens)


def batch_for_step(batches: list[list[int]], step: int, seed: int) -> list[int]:
    """The batch of a global step: each pass over the data is a fresh shuffle of (seed, pass)."""
    epoch, k = divmod(step, len(batches))
    order = list(range(len(batches)))
    random.Random(seed * 100003 + epoch).shuffle(order)
    return batches[order[k]]


def data_digest(seqs: list[JointSeq]) -> str:
    blob = json.dumps([[s.tokens, s.cls_at, s.label, s.lm_from] + ([s.cls_labels] if s.cls_labels is not None else [])
                       for s in seqs])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class JointResult:
    cls_row: np.ndarray
    head: np.ndarray
    lora: LoRA
    info: dict
    factors: dict | None = None  # lora.factors(), gathered on every rank (FSDP needs all of them to take part)


def train_joint(model: FrozenLlama, seqs: list[JointSeq], out_dir: str | Path, *, steps: int, rank: int = 16,
                alpha: float = 32.0, targets: str = "all", lr: float = 2e-4, cls_lr: float = 3e-3,
                lam: float = 1.0, batch_tokens: int = 8192, warmup: int | None = None, ckpt_every: int = 100,
                resume: bool = False, seed: int = 0, init: tuple[np.ndarray, np.ndarray] | None = None,
                max_seconds: float | None = None, log_every: int = 25, log=print, first_layer: int = 0,
                lower=None, lm_sample: float = 1.0, bf16: bool = False, state_dir: Path | None = None,
                state_command: str | None = None, dist: Dist | None = None, accum: int = 1,
                fsdp: bool = False, window=None) -> JointResult:
    """Train LoRA adapters, the [CLS] row and the head rows; checkpoint into out_dir.

    The model's weights must already be on the training device. With `resume`, an existing
    checkpoint for the same configuration and data is continued, also to a larger `steps` (the
    cosine schedule then stretches to the new end from where it was); `max_seconds` stops early
    (after checkpointing) so a run fits a time budget and can be resumed later.

    first_layer > 0: adapters on layers first_layer.. only, the [CLS] row fixed at `init`, and
    `lower` (`joint_cache.LowerStates` for these sequences and that layer) supplies the residual
    stream entering first_layer, so a step runs the upper layers alone (safechat/train/joint_cache.py).
    lm_sample < 1: the LM loss on that random fraction of its rows per step (seeded by step).
    bf16: matrix products in bfloat16 on the CPU too (torch.autocast; the weights, adapters and
    optimizer stay float32). On a CUDA device they always are.
    state_dir: also keep the run's small state there at every checkpoint (run_state.py: to commit, so that a
    later sitting resumes without this out_dir); `resume` falls back to it when out_dir has no checkpoint.
    dist: this process's place under torchrun (safechat/train/joint_dist.py): the same global batches,
    each rank computing its share in `accum` micro-batches, DDP averaging the gradients, rank 0 writing
    the checkpoint. accum > 1 in one process splits each batch the same way (less memory, same step).
    fsdp: shard the transformers base's decoder layers over the ranks instead of replicating it (DDP).
    window: (r1, r2, r3), the [CLS] inside answers attend to the runtime's windows (joint_window.py).
    """
    dist = dist or Dist()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = model.w["token_embd.weight"].device
    torch.manual_seed(seed)
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    if first_layer and (init is None or lower is None or lower.layer != first_layer):
        raise ValueError("first_layer > 0 needs init (the fixed [CLS] row) and the lower-layer states for that layer")
    if not 0 < lm_sample <= 1:
        raise ValueError(f"lm_sample {lm_sample} outside (0, 1]")
    split = dist.active or accum > 1
    if split and lm_sample < 1:
        raise ValueError("lm_sample < 1 samples rows of the whole padded batch: one process, accum 1")
    if fsdp and (not dist.active or isinstance(model, FrozenLlama) or state_dir is not None):
        raise ValueError("--fsdp shards a transformers base (--engine transformers) over 2 or more torchrun processes "
                         "(and keeps no --state: its optimizer state is keyed by parameter name)")
    config = {"rank": rank, "alpha": alpha, "targets": targets, "lr": lr, "cls_lr": cls_lr, "lam": lam,
              "batch_tokens": batch_tokens, "warmup": warmup, "steps": steps, "seed": seed,
              "data": data_digest(seqs), "n_seqs": len(seqs)}
    if first_layer or lm_sample < 1:  # absent from older checkpoints' configs, which stay loadable
        config.update(first_layer=first_layer, lm_sample=lm_sample)
    for key, value in (("bf16", bool(bf16)), ("fsdp", bool(fsdp)), ("window", list(window or ()))):
        if value:  # absent from older configs unless set (fsdp: its checkpoints keep the optimizer by name)
            config[key] = value
    ckpt = out_dir / CHECKPOINT
    st, ckpt = resume_from(ckpt, state_dir) if resume else (None, ckpt)
    if st is not None:
        old = st["config"]
        diff = {k: (old.get(k), config.get(k)) for k in [*config, "window"]  # a window is never dropped silently
                if k not in ("steps", "warmup") and old.get(k) != config.get(k)}
        if diff or steps < st["step"]:
            diff.update({"steps": (old["steps"], steps)} if steps < st["step"] else {})
            raise ValueError(f"{ckpt} was written by a different run (checkpoint vs now: {diff}); "
                             "use another --out or drop --resume")
        warmup = config["warmup"] = old["warmup"]  # extending the step count keeps the warm-up it had
    lora = adapters(model, targets, rank, alpha, seed, first_layer=first_layer)
    if fsdp:
        shard_layers(model)
    emb = model.w["token_embd.weight"]
    if init is not None:
        cls_row = torch.tensor(init[0], dtype=torch.float32, device=dev)
        head = torch.tensor(init[1], dtype=torch.float32, device=dev)
    else:
        g = torch.Generator().manual_seed(seed)
        cls_row = (emb.mean(0).cpu() + 0.01 * torch.randn(emb.shape[1], generator=g)).to(dev)
        head = torch.zeros(2, emb.shape[1], device=dev)
    cls_row = torch.nn.Parameter(cls_row, requires_grad=not first_layer)
    head = torch.nn.Parameter(head)
    step_mod = TrainStep(model, lora, cls_row, head, joint_loss)
    step_mod = step_mod if fsdp else dist.wrap(step_mod)
    opt = torch.optim.AdamW([{"params": lora.parameters(), "lr": lr, "weight_decay": 0.0},
                             {"params": [head] if first_layer else [cls_row, head], "lr": cls_lr,
                              "weight_decay": 0.0}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    start, history = 0, []
    if st is not None:
        lora.load_state(st["lora"])
        with torch.no_grad():
            cls_row.copy_(st["cls_row"])
            head.copy_(st["head"])
        sched.load_state_dict(st["sched"])
        if st["opt"] is not None:
            optimizer_state(step_mod, opt, st["opt"]) if fsdp else opt.load_state_dict(st["opt"])
        else:  # a small state kept without the moments: Adam starts its averages again, at the schedule's rate
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * _schedule(st["step"], steps, warmup)
            log("the state has no optimizer moments (too large to commit): Adam's averages restart")
        start, history = st["step"], st["history"]
        log(f"resumed from {ckpt} at step {start}/{steps}" + (
            f" (the run had planned {st['config']['steps']})" if st["config"]["steps"] != steps else ""))
    n_pos = sum(sum(s.labels()) for s in seqs)
    n_all = sum(len(s.cls_at) for s in seqs)
    class_w = torch.tensor([n_all / (2.0 * max(n_all - n_pos, 1)), n_all / (2.0 * max(n_pos, 1))], device=dev)
    batches = make_batches(seqs, batch_tokens)
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" or bf16
           else contextlib.nullcontext())
    params = lora.parameters() + ([head] if first_layer else [cls_row, head])

    def save(step):
        state = lora.state()  # gathered from the shards under FSDP: every rank takes part
        opt_state = optimizer_state(step_mod, opt) if fsdp else opt.state_dict()
        if not dist.main:  # rank 0 writes
            return
        obj = {"config": config, "step": step, "lora": state, "cls_row": cls_row.detach().cpu(),
               "head": head.detach().cpu(), "opt": opt_state, "sched": sched.state_dict(), "history": history}
        _save_atomic(obj, out_dir / CHECKPOINT)
        if state_dir is not None:
            save_state(state_dir, obj, state_command)

    t0, step, recent = time.time(), start, []  # recent: the losses since the last log line
    t_win = t0
    while step < steps:
        idx = batch_for_step(batches, step, seed)
        mine, weight = dist.shard(idx), 1.0
        if not mine:  # fewer sequences than ranks: this rank runs one at weight 0 (DDP needs every rank's pass)
            mine, weight = idx[:1], 0.0
        norms = row_counts([seqs[i] for i in idx]) if split else None
        parts = [p for p in (mine[k::accum] for k in range(accum)) if p]
        opt.zero_grad(set_to_none=True)
        lm = cl = 0.0
        for k, part in enumerate(parts):
            batch = layout([seqs[i] for i in part], window).to(dev)
            keep = None
            if lm_sample < 1:
                g = torch.Generator().manual_seed(seed * 1000003 + step)
                keep = (torch.rand(batch.ids.shape, generator=g) < lm_sample).to(dev)
            with dist.no_sync(step_mod, k == len(parts) - 1), amp:
                h = (hidden_upper(model, lora, lower.batch(part, batch.ids.shape[1]).to(dev), batch, first_layer)
                     if first_layer else None)  # None: step_mod runs the whole model
                loss, lm_k, cl_k = step_mod(batch, lam=lam, class_w=class_w, h=h, lm_keep=keep, norms=norms)
                (loss * (weight * dist.world)).backward()  # DDP averages over ranks: the world factor undoes it
            lm, cl = lm + weight * lm_k, cl + weight * cl_k
        if dist.active:
            lm, cl = dist.sum([lm, cl])
        if fsdp:  # FSDP averaged the adapters' gradients; the replicated [CLS] row and head are averaged here
            dist.average_grads([head] if first_layer else [cls_row, head])
            clip_grad_norm(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        recent.append((lm, cl, sum(expanded_len(seqs[i]) for i in idx)))
        if step % log_every == 0 or step == steps:
            m = np.mean(recent, axis=0)
            rate = sum(w[2] for w in recent) / max(time.time() - t_win, 1e-9)
            history.append({"step": step, "lm": round(float(m[0]), 4), "cls": round(float(m[1]), 4),
                            "seconds": round(time.time() - t0, 1), "rows_per_s": round(rate, 1)})
            if dist.main:
                log(f"step {step}/{steps}: lm {m[0]:.4f} cls {m[1]:.4f} ({time.time() - t0:.0f}s, "
                    f"{rate:.0f} rows/s)")
            recent, t_win = [], time.time()
        if step % ckpt_every == 0 or step == steps:
            save(step)
        if max_seconds is not None and step < steps and dist.any(time.time() - t0 > max_seconds):
            save(step)
            if dist.main:
                log(f"time budget reached at step {step}/{steps}: checkpoint saved, continue with --resume")
            break
    dist.barrier()  # the checkpoint is on disk before any rank goes on
    info = {"steps_done": step, "steps": steps, "finished": step >= steps, "config": config,
            "history": history, "seconds": round(time.time() - t0, 1)}
    return JointResult(cls_row.detach().float().cpu().numpy(), head.detach().float().cpu().numpy(), lora, info,
                       factors=lora.factors())
