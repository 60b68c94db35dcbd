"""torch.distributed for the training recipes: one process, or N under `torchrun` (DDP, or FSDP with --fsdp).

    torchrun --nproc-per-node 2 -m safechat.train joint --base B.gguf --data PREP --out DIR ...

`Dist.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
joins the process group: gloo on the CPU, nccl on CUDA (each process on the GPU of its LOCAL_RANK).
Without torchrun it is one process and every call below is a no-op, so the one-process run is the
same code.

How the joint recipe uses it (safechat/train/joint.py `train_joint`):

- the global batch of a step is what one process would take (`batch_for_step`, seeded by step), so it
  does not change with N; rank r takes its sequences r, r + N, ... (`shard`), in `accum` micro-batches;
- the losses of a micro-batch are sums divided by the *global batch's* row counts, times N: DDP averages
  the gradients over the N ranks, so the step's gradient is the one-process gradient of the whole batch
  (up to float summation order), whatever N and `accum` are;
- the trainable tensors (adapters, [CLS] row, head) are one module (`TrainStep`) that DDP wraps, the frozen
  base a replica on every rank; or, with `fsdp` (a base that does not fit one device), FSDP2 (`fully_shard`)
  shards each decoder layer of the transformers model, its frozen weights and the adapters inside it, over
  the ranks (each rank holds 1/N and gathers a layer while it runs); the embedding and output matrices, the
  [CLS] row and the head stay replicated (their gradients averaged with all_reduce), and checkpoints gather
  the full adapters and optimizer state (torch.distributed.checkpoint's full state dicts);
- rank 0 writes checkpoints and the artifact; every rank reads the checkpoint to resume; a time budget
  stops every rank at the same step (`any`).
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist


CLOSE_HOURS = 6  # the process group's timeout: how long ranks 1.. may wait for rank 0's measurement


class Dist:
    """This process's place in the run (world 1 without torchrun)."""

    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0):
        self.world, self.rank, self.local_rank = world, rank, local_rank

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_type == "cuda":
                torch.cuda.set_device(local)
            # a long timeout: at the end the other ranks wait in `close` while rank 0 measures the artifact
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(hours=CLOSE_HOURS))
        return cls(world, rank, local)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, dev: torch.device) -> torch.device:
        return torch.device("cuda", self.local_rank) if dev.type == "cuda" and self.active else dev

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's share of a global batch (never empty: a rank short of sequences repeats the first one
        with weight 0, see `train_joint`)."""
        return idx[self.rank::self.world]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def merge(self, parts: list[list]) -> list[list]:
        """Every rank's share of a list, each entry filled by one rank (the others leave it empty), as one list."""
        if not self.active:
            return parts
        every = [None] * self.world
        dist.all_gather_object(every, parts)
        return [next((p[i] for p in every if p[i]), []) for i in range(len(parts))]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a time budget that stops all ranks together)."""
        return self.sum([float(flag)])[0] > 0 if self.active else flag

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around the trainable module (gradients averaged over the ranks in backward)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(module.parameters()).device
        return DDP(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def no_sync(self, module: torch.nn.Module, last: bool):
        """Gradient accumulation: DDP reduces only at the last micro-batch of a step."""
        return module.no_sync() if self.active and not last and hasattr(module, "no_sync") else nullcontext()

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Average replicated parameters' gradients over the ranks (what DDP does, for the tensors FSDP leaves
        replicated)."""
        if self.active:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def close(self) -> None:
        """Leave the group together: every rank waits here for the others (rank 0 writes and measures the artifact
        first), then the group is destroyed. A rank that tore its group down while another still held it was
        seen to abort at interpreter exit (once in many runs, after --fsdp)."""
        if self.active and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def shard_layers(model) -> None:
    """FSDP2 over each decoder layer of a transformers base (`FrozenHF`), with the adapters already inside."""
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise ValueError("--fsdp needs torchrun (a process group of 2 or more processes)")
    for layer in model.model.model.layers:
        fully_shard(layer)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP-sharded parameter (a collective: every rank calls it), or t itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """param <- value (the whole tensor), into the local shard when param is FSDP-sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(param, DTensor):
            param.copy_(distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements))
        else:
            param.copy_(value)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """`torch.nn.utils.clip_grad_norm_` over parameters of which some are FSDP-sharded (torch's refuses the mix):
    one global norm, the same coefficient max_norm / (norm + 1e-6), at most 1."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import get_total_norm

    groups = [[p.grad for p in params if p.grad is not None and isinstance(p, DTensor) == d] for d in (True, False)]
    norms = [full(get_total_norm(g)).reshape(()) for g in groups if g]
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in groups:
        for t in g:
            t.mul_(coef)


def optimizer_state(module: torch.nn.Module, opt, state: dict | None = None) -> dict | None:
    """The optimizer's full state (FQN-keyed, gathered to rank 0; a collective) or, given `state`, load it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    if state is not None:
        set_optimizer_state_dict(module, opt, state, options=StateDictOptions(full_state_dict=True))
        return None
    return get_optimizer_state_dict(module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class TrainStep(torch.nn.Module):
    """The trainable tensors of the joint recipe as one module (what DDP wraps); forward = the losses.

    The frozen model and the adapters' bookkeeping are held outside the module's registry (the adapters'
    tensors are registered, the base weights are not), so DDP broadcasts and reduces the trainable
    tensors only."""

    def __init__(self, model, lora, cls_row: torch.nn.Parameter, head: torch.nn.Parameter, loss_fn):
        super().__init__()
        self.adapters = torch.nn.ParameterList(lora.parameters())
        self.head = head
        self.cls_row = cls_row  # requires_grad False when fixed (first_layer > 0): DDP leaves it alone
        self._ctx = (model, lora, loss_fn)

    def forward(self, batch, **kw):
        model, lora, loss_fn = self._ctx
        return loss_fn(model, lora, self.cls_row, self.head, batch, **kw)
