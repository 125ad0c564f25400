"""Data parallelism: ``torchrun --nproc_per_node=N`` sets the environment read here (gloo on
CPU, NCCL on GPU); the batch size of the scripts is the GLOBAL batch and only rank 0 writes
files. The model is replicated (DDP, or an explicit all-reduce) or, with ``--fsdp``, trained
as an FSDP2 copy sharded over the ranks (:func:`replicate`)."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys

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


def replicate(model: torch.nn.Module, d: Dist, use_ddp_hooks: bool,
              fsdp: bool = False) -> torch.nn.Module:
    """The module to call in training, whose parameters the optimizer updates:
    DistributedDataParallel; or (``use_ddp_hooks`` false, for losses whose create_graph=True
    autograd DDP does not support; pair with :func:`average_gradients`) the model itself with
    rank 0's parameters broadcast; or (``fsdp``) a copy of the model sharded with FSDP2's
    ``fully_shard`` over all ranks, whose backward reduce-scatters the gradients (mean over
    ranks). The copy leaves ``model`` unsharded for what runs on rank 0 alone (evaluation,
    sampling): :func:`gather_model` copies the trained parameters back into it. FSDP2 cannot
    run a double backward (the gathered parameters are freed after the first backward)."""
    if not d.enabled:
        return model
    if use_ddp_hooks and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    if not fsdp:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    return fully_shard(copy.deepcopy(model), mesh=init_device_mesh(d.device.type,
                                                                   (d.world_size,)))


def _sharded(net: torch.nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing is sharded
    return fsdp is not None and isinstance(net, fsdp.FSDPModule)


def gather_model(model: torch.nn.Module, net: torch.nn.Module) -> None:
    """For an FSDP2 ``net`` from :func:`replicate`: load its full (all-gathered) parameters
    into the unsharded ``model`` on every rank, a collective that every rank must call.
    Nothing for other ``net`` s, which train ``model``'s own parameters."""
    if _sharded(net):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        model.load_state_dict(get_model_state_dict(
            net, options=StateDictOptions(full_state_dict=True)))


def optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()``; for an FSDP2 ``net``, the full (gathered) state in the same
    format, keyed by parameter index (a collective: rank 0 gets it, on the CPU, the other ranks
    an empty dict), so that a checkpoint is the same with or without FSDP."""
    if not _sharded(net):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
    )

    state = get_optimizer_state_dict(
        net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return {"state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in state["param_groups"]]}


def load_state(model: torch.nn.Module, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
               model_state: dict, optim_state: dict) -> None:
    """Load full (unsharded) state dicts, as :func:`optimizer_state` and ``model.state_dict()``
    give them, into ``model`` and ``optimizer``, and into an FSDP2 ``net``, sharded."""
    model.load_state_dict(model_state)
    if not _sharded(net):
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = [name for name, _ in net.named_parameters()]
    by_name = {"state": {names[i]: s for i, s in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in optim_state["param_groups"]]}
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(net, model_state, options=full)
    set_optimizer_state_dict(net, optimizer, by_name, options=full)
    for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):
        # set_optimizer_state_dict turns tuples (Adam's betas) into lists; keep them as saved
        group.update({k: v for k, v in saved.items() if k != "params"})


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
