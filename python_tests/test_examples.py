"""Smoke tests of the training examples (python -m examples.train_ebm / examples.train_ncsn).

Everything runs on tiny data (a few built-in 8x8 digits, a handful of steps, tiny networks)
so the whole file stays well under two minutes on 2 CPU cores. The scripts run as modules
from the repository root (``python -m examples.X``), as a user runs them.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EBM = "examples.train_ebm"
NCSN = "examples.train_ncsn"

TINY = ["--limit", "64", "--batch-size", "16", "--threads", "1", "--width", "8",
        "--n-samples", "16", "--no-progress"]
TINY_EBM = TINY + ["--eval-size", "16", "--n-sigmas", "3", "--n-steps-each", "2"]
TINY_NCSN = TINY + ["--n-sigmas", "3", "--n-steps-each", "2"]

# A crash right after step N (after that step's checkpoint), for the resume tests: wrap
# examples.common.loop.run so that a last hook ends the process with os._exit(17), then run
# the script as __main__. Nothing of this lives in the examples themselves.
_KILL_AFTER = """
import os, runpy, sys
from examples.common import loop

after, module = int(sys.argv[1]), sys.argv[2]
real_run = loop.run

def crash(done):
    if done == after:
        os._exit(17)

def run(step, *, hooks=(), **kw):
    return real_run(step, hooks=[*hooks, loop.Hook(after, crash)], **kw)

loop.run = run
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _check(proc, check):
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run(module, *args, check=True, timeout=120):
    """``python -m module args`` from the repository root."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=timeout)
    return _check(proc, check)


def run_killed(module, *args, after_step, timeout=120):
    """``python -m module args``, killed (exit code 17) right after step ``after_step``."""
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, str(after_step), module, *args],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    assert proc.returncode == 17, proc.stdout + proc.stderr
    return proc


def load_script(module):
    return importlib.import_module(module)


def common(name):
    return importlib.import_module(f"examples.common.{name}")


def read_ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


# --------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("method, condition", [("fd_ssm", "label"), ("fd_ssm", "sigma")])
def test_ebm_smoke(tmp_path, method, condition):
    out = str(tmp_path / method)
    run(EBM, "--method", method, "--condition", condition, "--steps", "3", "--out", out,
        *TINY_EBM)
    for f in ("samples.png", "curves.png", "metrics.json", "checkpoint.pt"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["method"] == method and m["steps"] == 3 and len(m["sigmas"]) == 3
    assert m["condition"] == condition
    assert m["samples_finite"] and m["eval_sigma"] in m["sigmas"]
    assert np.isfinite(m["final_heldout_exact_sm_loss"])
    assert m["seconds_per_iteration"] > 0 and m["peak_rss_mb"] > 0
    assert np.isfinite(m["mmd2_samples_vs_heldout"]) and m["mmd2_init_noise_vs_heldout"] > 0


@pytest.mark.parametrize("condition", ["label", "sigma"])
def test_ncsn_smoke(tmp_path, condition):
    out = str(tmp_path / "ncsn")
    run(NCSN, "--steps", "3", "--condition", condition, "--out", out, *TINY_NCSN)
    for f in ("samples.png", "curves.png", "metrics.json", "checkpoint.pt"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["method"] == "fd_ssm" and len(m["sigmas"]) == 3 and m["samples_finite"]
    assert m["condition"] == condition
    assert np.isfinite(m["final_heldout_dsm_loss"])


# --------------------------------------------------------------------------- --method by value
# Each script's method name gives the loss of the library function it names: on a fixed
# float64 model, batch and generator, the script's loss and its parameter gradients equal a
# direct call of that function (value alone cannot tell fd_dsm along the residual from dsm:
# same value, FD against autograd gradient). Each method's result also differs from every
# other method's, so a swapped mapping cannot pass.
def loss_and_grads(loss, params):
    """[loss, d loss / d p for p in params] (zeros for a parameter the loss does not use)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(p) if g is None else g
                              for p, g in zip(params, grads, strict=True)]


def assert_same_loss(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12,
                                   msg=lambda m, i=i: f"{'loss' if i == 0 else f'grad {i}'}: {m}")


def assert_methods_differ(results):
    """No two methods give the same loss and gradients (the value tests can tell them apart)."""
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert any(not torch.allclose(u, v, rtol=1e-6, atol=1e-9)
                       for u, v in zip(results[a], results[b], strict=True)), (a, b)


EPS, N_PROJ = 0.1, 2
# train_ebm --method (and --fd-dsm-direction): noise_conditional_loss(output="energy", ...)
EBM_DIRECT = {
    ("fd_ssm", "residual"): {"method": "fd_ssm", "eps": EPS, "variance_reduction": True,
                             "n_projections": N_PROJ},
    ("ssm", "residual"): {"method": "ssm", "variance_reduction": False,
                          "n_projections": N_PROJ},
    ("ssm_vr", "residual"): {"method": "ssm", "variance_reduction": True,
                             "n_projections": N_PROJ},
    ("dsm", "residual"): {"method": "dsm"},
    ("fd_dsm", "residual"): {"method": "fd_dsm", "eps": EPS, "direction": "residual"},
    ("fd_dsm", "random"): {"method": "fd_dsm", "eps": EPS, "direction": "random",
                           "n_projections": N_PROJ},
    ("exact", "residual"): None,  # sigma_i^2-weighted exact_sm_loss, below
}


def _ebm_fixture(condition):
    models = common("models")
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.3, 0.1], dtype=torch.float64)
    net = models.EnergyNet(image_size=8, ch=8, sigmas=sigmas, condition=condition).double()
    with torch.no_grad():  # conditioning that matters (the FiLM layer starts at zero)
        torch.nn.init.normal_(net.film.mlp[-1].weight if condition == "sigma"
                              else net.film.weight, std=0.1)
    return net, sigmas, torch.rand(4, 1, 8, 8, dtype=torch.float64)


def _ebm_direct(key, net, x, sigmas, condition, seed):
    import fdsm_ext

    g = torch.Generator().manual_seed(seed)
    if EBM_DIRECT[key] is not None:
        return fdsm_ext.noise_conditional_loss(net, x, sigmas, output="energy",
                                               condition=condition, generator=g,
                                               **EBM_DIRECT[key])
    # exact: a level and Gaussian noise per sample from g, then exact_sm_loss per sample
    labels = torch.randint(len(sigmas), (len(x),), generator=g)
    xt = x + sigmas[labels].view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g,
                                                            dtype=x.dtype)
    cond = labels if condition == "label" else sigmas[labels]
    per = fdsm_ext.exact_sm_loss(net, xt, cond, output="energy", create_graph=True,
                                 reduction="none")
    return (sigmas[labels] ** 2 * per).mean()


@pytest.mark.parametrize("condition", ["label", "sigma"])
def test_ebm_method_is_the_library_loss_it_names(condition):
    ebm = load_script(EBM)
    assert {method for method, _ in EBM_DIRECT} == set(ebm.METHODS)
    net, sigmas, x = _ebm_fixture(condition)
    params = list(net.parameters())
    results = {}
    for key in EBM_DIRECT:
        method, direction = key
        loss_fn = ebm.make_loss(method, sigmas, EPS, N_PROJ, condition, direction)
        got = loss_and_grads(loss_fn(net, x, torch.Generator().manual_seed(5)), params)
        want = loss_and_grads(_ebm_direct(key, net, x, sigmas, condition, 5), params)
        assert_same_loss(got, want)
        assert all(torch.isfinite(t).all() for t in got)
        results[key] = got
    assert_methods_differ(results)


# train_ncsn --method: noise_conditional_loss(output="score", ...)
NCSN_DIRECT = {
    "fd_ssm": {"method": "fd_ssm", "eps": EPS, "variance_reduction": True},
    "ssm_vr": {"method": "ssm", "variance_reduction": True},
    "dsm": {"method": "dsm"},
}


@pytest.mark.parametrize("condition", ["label", "sigma"])
def test_ncsn_method_is_the_library_loss_it_names(condition):
    import fdsm_ext

    ncsn = load_script(NCSN)
    models = common("models")
    assert set(NCSN_DIRECT) == set(ncsn.METHODS)
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0, 0.3, 0.1], dtype=torch.float64)
    net = models.ScoreNet(sigmas, ch=8, condition=condition).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    params = list(net.parameters())
    results = {}
    for method, kw in NCSN_DIRECT.items():
        loss_fn = ncsn.make_loss(method, sigmas, EPS, condition)
        got = loss_and_grads(loss_fn(net, x, torch.Generator().manual_seed(5)), params)
        want = loss_and_grads(fdsm_ext.noise_conditional_loss(
            net, x, sigmas, output="score", condition=condition,
            generator=torch.Generator().manual_seed(5), **kw), params)
        assert_same_loss(got, want)
        results[method] = got
    assert_methods_differ(results)


@pytest.mark.parametrize("condition", ["label", "sigma"])
def test_conditional_energy_net_starts_as_unconditional_over_sigma(condition):
    """Same initialisation; zero-initialised FiLM: E(x, i) = E(x) / sigma_i at the start."""
    models = common("models")
    torch.manual_seed(0)
    plain = models.EnergyNet(image_size=8, ch=8)
    torch.manual_seed(0)
    net = models.EnergyNet(image_size=8, ch=8, sigmas=[1.0, 0.1], condition=condition)
    x = torch.rand(3, 1, 8, 8)
    sigma = torch.tensor([1.0, 0.1, 0.1])
    expected = plain(x) / sigma
    c = torch.tensor([0, 1, 1]) if condition == "label" else sigma
    torch.testing.assert_close(net(x, c), expected)


@pytest.mark.parametrize("net_name", ["ScoreNet", "EnergyNet"])
def test_sigma_conditioned_network_is_the_label_network_with_an_embedded_table(net_name):
    """A sigma-conditioned network equals the label-conditioned one whose per-level table
    holds the sigma embedding at the ladder's levels (same other weights): the conditioning
    enters only through the embedding, and the 1/sigma output scaling uses the given sigma."""
    models = common("models")
    sigmas = torch.tensor([1.0, 0.3, 0.1])
    torch.manual_seed(0)
    if net_name == "ScoreNet":
        by_sigma = models.ScoreNet(sigmas, ch=8, condition="sigma")
        by_label = models.ScoreNet(sigmas, ch=8)
        table, embedding = by_label.embed, by_sigma.embed
    else:
        by_sigma = models.EnergyNet(image_size=8, ch=8, sigmas=sigmas, condition="sigma")
        by_label = models.EnergyNet(image_size=8, ch=8, sigmas=sigmas)
        torch.nn.init.normal_(by_sigma.film.mlp[-1].weight, std=0.1)  # levels differ
        table, embedding = by_label.film, by_sigma.film
    state = {k: v for k, v in by_sigma.state_dict().items()
             if not k.startswith(("embed.", "film."))}
    by_label.load_state_dict(state, strict=False)
    by_sigma, by_label, sigmas = by_sigma.double(), by_label.double(), sigmas.double()
    with torch.no_grad():
        table.weight.copy_(embedding(sigmas))
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(by_sigma(x, sigmas[labels]), by_label(x, labels))
    # A level between the trained ones is accepted and gives a different output.
    assert not torch.allclose(by_sigma(x, torch.full((4,), 0.2)), by_sigma(x, sigmas[labels]))


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize("script,tiny", [(EBM, TINY_EBM), (NCSN, TINY_NCSN)],
                         ids=["ebm", "ncsn"])
def test_killed_and_resumed_run_matches_uninterrupted(tmp_path, script, tiny):
    args = ["--steps", "6", "--ckpt-every", "3", "--eval-every", "3", *tiny]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(script, *args, "--out", full)
    run_killed(script, *args, "--out", part, after_step=4)  # last checkpoint: step 3
    assert read_ckpt(part)["step"] == 3 and not os.path.exists(os.path.join(part, "metrics.json"))
    resumed = run(script, *args, "--out", part, "--resume")
    assert "resumed from" in resumed.stdout + resumed.stderr

    a, b = read_ckpt(full), read_ckpt(part)
    assert a["step"] == b["step"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa_all, sb_all = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa_all.keys() == sb_all.keys()
    for i in sa_all:
        sa, sb = sa_all[i], sb_all[i]
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
    assert a["history"] == b["history"]


def test_resume_rejects_other_settings(tmp_path):
    out = str(tmp_path / "r")
    run(EBM, "--steps", "2", "--out", out, *TINY_EBM)
    proc = run(EBM, "--steps", "4", "--out", out, "--resume", "--method", "dsm", *TINY_EBM,
               check=False)
    assert proc.returncode == 2 and "--method" in proc.stderr
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- torchrun / DDP
@pytest.mark.parametrize("script,method,tiny", [(EBM, "fd_ssm", TINY_EBM),
                                                (EBM, "fd_dsm", TINY_EBM),
                                                (NCSN, "ssm_vr", TINY_NCSN)],
                         ids=["ebm-fd_ssm-ddp", "ebm-fd_dsm-residual-ddp-two-model-calls",
                              "ncsn-ssm_vr-manual-allreduce"])
def test_torchrun_two_processes_stay_in_sync(tmp_path, script, method, tiny):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", script, "--method", method, "--steps", "3", "--out", out, *tiny]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["world_size"] == 2
    assert m["ranks_max_param_difference"] == 0.0
    # The checkpoint differs from the initial parameters: the ranks really trained.
    assert read_ckpt(out)["step"] == 3


def test_batches_shard_each_epoch_permutation():
    seeding, Dist = common("seeding"), common("distributed").Dist
    d0, d1 = Dist(0, 2), Dist(1, 2)
    for step in range(5):  # 3 batches of 8 per epoch from 25 images: crosses epochs
        a = seeding.batch_indices(25, 8, step, 0, d0)
        b = seeding.batch_indices(25, 8, step, 0, d1)
        whole = seeding.batch_indices(25, 8, step, 0, Dist())
        assert len(a) == len(b) == 4 and set(a.tolist()) | set(b.tolist()) == set(whole.tolist())
    epoch0 = torch.cat([seeding.batch_indices(25, 8, s, 0, Dist()) for s in range(3)])
    assert len(set(epoch0.tolist())) == 24


def test_loop_runs_hooks_in_order_and_stops():
    loop = common("loop")
    calls = []

    def hook(name):
        return lambda done: calls.append((name, done))

    hooks = [loop.Hook(3, hook("every 3")), loop.Hook(0, hook("end"), at_end=True)]
    assert loop.run(lambda i: {"loss": float(i)}, start=1, stop=7, hooks=hooks,
                    progress=False) == 7
    assert calls == [("every 3", 3), ("every 3", 6), ("end", 7)]
    calls.clear()  # ``until`` ends the loop; the at_end hooks run after that step
    assert loop.run(lambda i: {"loss": 0.0}, start=0, stop=10, hooks=hooks,
                    until=lambda done: done >= 4, progress=False) == 4
    assert calls == [("every 3", 3), ("end", 4)]
    with pytest.raises(loop.NonFiniteLoss, match="loss became nan at step 3"):
        loop.run(lambda i: {"loss": math.nan if i == 2 else 0.0}, start=0, stop=5,
                 progress=False)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    checkpoint = common("checkpoint")
    path = str(tmp_path / "f.bin")
    checkpoint.atomic_write(path, lambda f: f.write(b"old"))

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(path, boom)
    assert open(path, "rb").read() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


# --------------------------------------------------------------------------- data
def _write_idx_by_hand(path, arr):
    """Independent IDX writer (unsigned bytes, 0x08) used to check the reader."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_gzip(tmp_path):
    data = common("data")
    arr = np.random.RandomState(0).randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    _write_idx_by_hand(str(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "a.gz")), arr)
    labels = np.arange(7, dtype=np.int32)
    data.write_idx(str(tmp_path / "b.gz"), labels)
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "b.gz")), labels)
    data.write_idx(str(tmp_path / "c"), arr)  # uncompressed
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "c")), arr)


def test_read_idx_rejects_corrupt_files(tmp_path):
    data = common("data")
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(str(tmp_path / "bad.gz"))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(struct.pack(">HBBII", 0, 0x08, 2, 3, 3) + b"\x00" * 5)
    with pytest.raises(data.DataError, match="size mismatch"):
        data.read_idx(str(tmp_path / "short.gz"))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_load_idx_dataset(tmp_path, name):
    data = common("data")
    rs = np.random.RandomState(1)
    train, test = rs.randint(0, 256, (12, 28, 28)), rs.randint(0, 256, (4, 28, 28))
    _write_idx_by_hand(str(tmp_path / "train-images-idx3-ubyte.gz"), train)
    _write_idx_by_hand(str(tmp_path / "t10k-images-idx3-ubyte.gz"), test)
    tr, te = data.load_dataset(name, str(tmp_path), limit=10)
    assert tr.shape == (10, 1, 28, 28) and te.shape == (4, 1, 28, 28)
    assert tr.dtype == torch.float32 and 0 <= tr.min() and tr.max() <= 1
    torch.testing.assert_close(te[:, 0] * 255, torch.tensor(test, dtype=torch.float32))
    models = common("models")  # the networks size themselves to 28x28 images
    assert models.EnergyNet(image_size=28, ch=4)(tr[:2]).shape == (2,)
    cond = models.EnergyNet(image_size=28, ch=4, sigmas=[1.0, 0.1])
    assert cond(tr[:2], torch.tensor([0, 1])).shape == (2,)
    sn = models.ScoreNet([1.0, 0.1], ch=4)
    assert sn(tr[:2], torch.tensor([0, 1])).shape == (2, 1, 28, 28)
    sn = models.ScoreNet([1.0, 0.1], ch=4, condition="sigma")
    assert sn(tr[:2], torch.tensor([0.7, 0.2])).shape == (2, 1, 28, 28)


def test_digits_split():
    data = common("data")
    tr, te = data.load_dataset("digits")
    assert tr.shape == (1500, 1, 8, 8) and te.shape == (297, 1, 8, 8)
    assert tr.min() >= 0 and tr.max() <= 1


def test_mmd_separates_distributions():
    metrics = common("metrics")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 10, generator=g), torch.randn(200, 10, generator=g)
    c = torch.randn(200, 10, generator=g) + 1.0
    bw = metrics.median_bandwidth(a)
    assert abs(metrics.mmd2(a, b, bw)) < 0.02 < metrics.mmd2(a, c, bw)


# --------------------------------------------------------------------------- bad arguments
BAD_ARGS = [
    (EBM, ["--dataset", "cifar"], "invalid choice"),
    (EBM, ["--method", "magic"], "invalid choice"),
    (NCSN, ["--method", "fd_dsm"], "invalid choice"),
    (EBM, ["--steps", "-5"], "must be >= 0"),
    (NCSN, ["--lr", "-1"], "positive"),
    (EBM, ["--dataset", "mnist"], "needs --data-dir"),
    (NCSN, ["--dataset", "mnist", "--data-dir", "{tmp}"], "missing train-images-idx3-ubyte.gz"),
    (EBM, ["--batch-size", "5000"], "exceeds"),
]


@pytest.mark.parametrize("script,argv,message", BAD_ARGS)
def test_bad_arguments_one_line_error(tmp_path, capsys, script, argv, message):
    mod = load_script(script)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


def test_bad_arguments_subprocess_has_no_traceback(tmp_path):
    proc = run(EBM, "--dataset", "fashion_mnist", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "fashion_mnist" in proc.stderr



# --------------------------------------------------------------------------- damaged checkpoints
def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"12345 this is not a checkpoint\n" * 100)


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_load_checkpoint_names_a_damaged_file(tmp_path, damage):
    checkpoint = common("checkpoint")
    path = str(tmp_path / "checkpoint.pt")
    torch.save({k: 0 for k in checkpoint.CKPT_KEYS}, path)
    assert checkpoint.load_checkpoint(path, "cpu")["step"] == 0
    damage(path)
    with pytest.raises(checkpoint.CheckpointError, match="checkpoint.pt is damaged") as e:
        checkpoint.load_checkpoint(path, "cpu")
    assert "\n" not in str(e.value) and path in str(e.value)


def test_save_keeps_the_previous_checkpoint(tmp_path):
    checkpoint = common("checkpoint")
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    args = argparse.Namespace()
    path = str(tmp_path / "checkpoint.pt")
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(path, model=model, optimizer=opt, step=step, history={},
                                 args=args)
    assert read_ckpt(str(tmp_path))["step"] == 3
    assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)["step"] == 2
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pt", "checkpoint.pt"]


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_resume_with_damaged_checkpoint_and_no_previous_is_one_clear_line(tmp_path, damage):
    out = str(tmp_path / "r")
    run(EBM, "--steps", "2", "--ckpt-every", "0", "--out", out, *TINY_EBM)
    assert not os.path.exists(os.path.join(out, "checkpoint.prev.pt"))  # one save only
    damage(os.path.join(out, "checkpoint.pt"))
    proc = run(EBM, "--steps", "4", "--out", out, "--resume", *TINY_EBM, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1  # the whole message on this line (other lines may be warnings)
    assert os.path.join(out, "checkpoint.pt") + " is damaged" in lines[0]
    assert "run without --resume" in lines[0]


def test_resume_falls_back_to_previous_checkpoint_and_matches_uninterrupted(tmp_path):
    args = ["--steps", "6", "--ckpt-every", "2", "--eval-every", "2", *TINY_EBM]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(EBM, *args, "--out", full)
    run_killed(EBM, *args, "--out", part, after_step=4)
    latest, prev = (os.path.join(part, n) for n in ("checkpoint.pt", "checkpoint.prev.pt"))
    assert read_ckpt(part)["step"] == 4 and torch.load(prev, weights_only=True)["step"] == 2
    _truncate(latest)

    resumed = run(EBM, *args, "--out", part, "--resume")
    log = resumed.stdout + resumed.stderr
    assert f"{latest} is damaged" in log and "falling back to the previous checkpoint" in log
    assert f"resumed from {prev} at step 2" in log
    assert os.path.exists(latest + ".damaged")  # kept aside for inspection, not rotated
    a, b = read_ckpt(full), read_ckpt(part)
    assert a["step"] == b["step"] == 6 and a["history"] == b["history"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # The damaged file was not rotated in: the previous checkpoint is the good one of step 4.
    assert torch.load(prev, weights_only=True)["step"] == 4


def test_resume_with_both_checkpoints_damaged_is_one_clear_line(tmp_path):
    out = str(tmp_path / "r")
    run(EBM, "--steps", "2", "--ckpt-every", "1", "--out", out, *TINY_EBM)
    _garbage(os.path.join(out, "checkpoint.pt"))
    _truncate(os.path.join(out, "checkpoint.prev.pt"))
    proc = run(EBM, "--steps", "4", "--out", out, "--resume", *TINY_EBM, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1  # the whole message on this line (other lines may be warnings)
    assert "checkpoint.pt is damaged" in lines[0] and "checkpoint.prev.pt is damaged" in lines[0]
