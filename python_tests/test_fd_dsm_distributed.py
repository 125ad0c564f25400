"""FD-DSM along the residual under FSDP2 (``fully_shard``, 2 processes, gloo): the model is
called twice per step, and the sharded gradient equals the single-process one."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import fdsm_ext

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Softplus(),
                                   torch.nn.Linear(16, 1)).double()

    def batch(rank):
        return torch.randn(8, 6, generator=torch.Generator().manual_seed(rank),
                           dtype=torch.float64)

    def loss(net, x, method):
        model = lambda y: net(y)[:, 0]
        if method == "dsm":
            return fdsm_ext.dsm_loss(model, x, 0.2, output="energy", seed=3)
        return fdsm_ext.fd_dsm_loss(model, x, 0.2, eps=1e-3, output="energy", seed=3)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    net = make()
    fully_shard(net, mesh=init_device_mesh("cpu", (world,)))
    loss(net, batch(rank), "fd_dsm").backward()
    grads = [p.grad.full_tensor() for p in net.parameters()]
    if rank == 0:
        # One process: the mean of the per-rank losses (FSDP averages gradients over ranks).
        ref = make()
        total = sum(loss(ref, batch(r), sys.argv[2]) for r in range(world)) / world
        want = torch.autograd.grad(total, list(ref.parameters()), materialize_grads=True)
        err = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12))
                  for g, w in zip(grads, want))
        json.dump({"max_relative_error": err}, open(sys.argv[1], "w"))
    # Without the barrier a rank can tear gloo down while its peer's last collective is in
    # flight, and gloo aborts ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("reference, tol", [("fd_dsm", 1e-12), ("dsm", 1e-5)])
def test_fsdp2_two_processes_match_one_process(tmp_path, reference, tol):
    """Against the same FD loss in one process (exactly, up to the reduction's rounding) and
    against DSM's double backward (to the FD truncation at eps 1e-3)."""
    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), str(out), reference],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text())["max_relative_error"] < tol
