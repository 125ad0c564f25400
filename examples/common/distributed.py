"""Data parallelism: ``torchrun --nproc_per_node=N`` sets the environment read here (gloo on
CPU, NCCL on GPU); the batch size of the scripts is the GLOBAL batch and only rank 0 writes
files."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Initialise torch.distributed from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # Without the barrier a rank can tear gloo down while a peer's last collective is
        # still in flight, and gloo's thread then aborts the process ("terminate called
        # without an active exception"; 1 run in 6 of the two-process test).
        dist.barrier()
        dist.destroy_process_group()


def replicate(model: torch.nn.Module, d: Dist, use_ddp_hooks: bool) -> torch.nn.Module:
    """The module to call in training: DistributedDataParallel, or (``use_ddp_hooks`` false,
    for losses whose create_graph=True autograd DDP does not support; pair with
    :func:`average_gradients`) the model itself with rank 0's parameters broadcast."""
    if not d.enabled:
        return model
    if use_ddp_hooks:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    return model


def average_gradients(module: torch.nn.Module, d: Dist) -> None:
    """All-reduce-mean the gradients by hand (used where DDP's hooks cannot be used)."""
    if not d.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world_size


def max_param_difference(module: torch.nn.Module, d: Dist) -> float:
    """Largest |difference| of any parameter between this rank and the others (0 if alone)."""
    if not d.enabled:
        return 0.0
    flat = torch.cat([p.detach().flatten().float() for p in module.parameters()]).to(d.device)
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())
