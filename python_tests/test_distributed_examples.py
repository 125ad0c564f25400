"""Data-parallel training equals single-process training on the global batch (issue 19, item 1).

``torchrun --nproc_per_node 2`` (gloo) trains examples.train_ebm for a few steps; one process
trains the same script, from the same initialisation, on the same global batches. The final
parameters and the Adam state of the two runs must agree.

What the single process must reproduce. Rank r trains on ``batch[r::2]`` of global batch i
(:func:`examples.common.seeding.batch_indices`) and draws its loss noise (levels, Gaussian
noise, directions) from ``step_generator(seed, r, i)``: the draws are a function of the rank,
not of the global sample index (one generator per rank and step, consumed in the loss's own
order over that rank's samples). A plain one-process run on the whole batch therefore draws
other numbers and trains a different model; no tolerance can compare it with the two-process
run. The reference run is instead the unchanged script in one process whose loss is the mean
over the two shards of the per-shard loss with that shard's generator: the same per-sample
inputs and random numbers as the two ranks, the same value as the global-batch mean (equal
shards), and no collective anywhere. What remains to differ is exactly what data
parallelism does: averaging the per-rank gradients (DDP's hooks for the FD loss fd_ssm, the
hand-written all-reduce of :func:`examples.common.distributed.average_gradients` for the
double-backward loss dsm).

Adam is almost invariant to a constant factor on the gradient (m / sqrt(v)), so comparing
the parameters alone would hardly notice gradients that are summed instead of averaged; the
checkpoint's Adam moments (exp_avg scales with the gradient, exp_avg_sq with its square) do.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_examples import EBM, ROOT, TINY_EBM, _env, common, load_script, read_ckpt

WORLD = 2
# float32 tolerance, relative to each tensor's largest entry. Each rank's forward and backward
# run on exactly the reference's per-shard inputs and draws; only the summation differs. A
# parameter's gradient is a sum of many contributions (several network calls per loss, the
# input derivative of the energy), and the reference's one backward over both shards adds
# them in another order than (shard 0's sum)/2 + (shard 1's sum)/2: a few float32 ulps per
# gradient, which Adam's division by sqrt(v) can enlarge for small entries over the 3 steps.
# Measured here: at most 1.7e-6 (parameters) and 7e-7 (Adam moments). Gradients summed
# instead of averaged make exp_avg differ by 100% (and the parameters by ~2e-5, Adam being
# almost scale invariant).
RTOL = 1e-5

# The script, unchanged, in one process; its loss is the two ranks' shard losses averaged,
# each shard with its rank's generator (see the module docstring).
_SHARDED_REFERENCE = """
import runpy, sys
from examples.common import image_training

world, module = int(sys.argv[1]), sys.argv[2]
real_step_generator, real_train = image_training.step_generator, image_training.train
now = {}

def step_generator(seed, rank, step, device):
    assert rank == 0
    now.update(seed=seed, step=step, device=device)
    return real_step_generator(seed, rank, step, device)

def train(*, loss_fn, **kw):
    def sharded(net, x, g):
        losses = [loss_fn(net, x[r::world],
                          real_step_generator(now["seed"], r, now["step"], now["device"]))
                  for r in range(world)]
        return sum(losses) / world
    return real_train(loss_fn=sharded, **kw)

image_training.step_generator, image_training.train = step_generator, train
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _run(cmd, timeout=240):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_global_batch_shards_are_the_ranks_batches():
    """x[r::world] of the one-process global batch is rank r's batch, step by step."""
    seeding, Dist = common("seeding"), common("distributed").Dist
    for step in range(6):  # crosses epochs: 64 images, batches of 16
        whole = seeding.batch_indices(64, 16, step, 0, Dist())
        for r in range(WORLD):
            assert torch.equal(whole[r::WORLD], seeding.batch_indices(64, 16, step, 0,
                                                                      Dist(r, WORLD)))


def test_loss_draws_depend_on_the_rank_split():
    """Why the reference run emulates the shards: the loss noise of a step is drawn per rank,
    so the whole batch with one generator is not the mean of the two ranks' losses. (Should
    the draws become a function of the global sample index, this fails and the plain
    one-process run becomes the reference.)"""
    ebm, seeding, models = load_script(EBM), common("seeding"), common("models")
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.3, 0.1])
    net = models.EnergyNet(image_size=8, ch=8, sigmas=sigmas)
    x = torch.rand(16, 1, 8, 8)
    for method in ("fd_ssm", "dsm"):
        loss = ebm.make_loss(method, sigmas, 0.1)
        whole = loss(net, x, seeding.step_generator(0, 0, 1, x.device))
        shards = sum(loss(net, x[r::WORLD], seeding.step_generator(0, r, 1, x.device))
                     for r in range(WORLD)) / WORLD
        assert not torch.allclose(whole, shards, rtol=1e-3), method


def _assert_close(a, b, what, rtol=RTOL):
    """max |a - b| <= rtol * max |b|: rounding of a reordered sum scales with the tensor's
    largest terms, not with each element (an element near zero may differ in every digit)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rtol * scale, f"{what}: max |difference| {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.mark.parametrize("method", ["fd_ssm", "dsm"],
                         ids=["fd_ssm-ddp-hooks", "dsm-manual-all-reduce"])
def test_two_processes_train_like_one_process_on_the_global_batch(tmp_path, method):
    args = ["--method", method, "--steps", "3", "--eval-every", "3", "--ckpt-every", "3",
            "--n-samples", "4", *TINY_EBM]
    ddp, ref = str(tmp_path / "ddp"), str(tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
          f"--nproc_per_node={WORLD}", "-m", EBM, *args, "--out", ddp])
    _run([sys.executable, "-c", _SHARDED_REFERENCE, str(WORLD), EBM, *args, "--out", ref])

    a, b = read_ckpt(ddp), read_ckpt(ref)
    assert a["step"] == b["step"] == 3
    assert a["args"]["method"] == b["args"]["method"] == method
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() == set(b["optimizer"]["param_groups"][0]["params"])
    for i in sb:
        assert float(sa[i]["step"]) == float(sb[i]["step"]) == 3
        assert sb[i]["exp_avg"].abs().max() > 0  # a real gradient reached every parameter
        _assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], f"Adam exp_avg of parameter {i}")
        _assert_close(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"],
                      f"Adam exp_avg_sq of parameter {i}")
    for k, v in b["model"].items():
        _assert_close(a["model"][k], v, f"parameter {k}")
    # The held-out exact SM loss of the final model (rank 0's evaluation).
    (sa_, va), (sb_, vb) = a["history"]["eval"][-1], b["history"]["eval"][-1]
    assert sa_ == sb_ == 3
    _assert_close(va, vb, "held-out exact SM loss")
