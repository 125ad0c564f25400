"""The ViT energy example (examples/common/transformer.py, ``train_ebm --arch vit``).

FD-SSM of the ViT energy against its autograd limit on the same directions (float64, MATH
attention): the error shrinks like eps^2. The flash attention kernel has no double backward
(autograd score matching fails) while FD losses train through it, giving the MATH backend's
values. train_ebm: a smoke run with FD-SSM under flash, the one-line refusal of autograd
methods under flash, and the first training loss of autograd SSM under --attention math
equal to the library call on the same model, batch and generator.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from test_examples import EBM, TINY_EBM, load_script, read_ckpt, run
from test_losses import directions, ssm_with_directions

import fdsm_ext
from examples.common.transformer import ViTEnergy, attention_context

SIGMAS = [1.0, 0.3, 0.1]


def _vit(attention, *, sigmas=None, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ViTEnergy(1, 8, patch=4, dim=16, depth=2, heads=2, head_dim=8, sigmas=sigmas,
                     attention=attention).to(dtype)


def test_energy_shape_and_per_sample():
    """(B,) energies, each a function of its own image only (no batch coupling)."""
    net = _vit("math")
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    e = net(x)
    assert e.shape == (5,) and (e >= 0).all()
    torch.testing.assert_close(net(x[2:3]), e[2:3], rtol=1e-12, atol=1e-12)


def test_fd_ssm_of_vit_approaches_autograd_ssm_like_eps_squared():
    """FD-SSM (energy) on the ViT, MATH backend, float64: against the eps -> 0 value
    (d/eps^2) [1/2 (v.s)^2 + v^T H v] on the same directions v, by double backward."""
    net = _vit("math")
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    d = x[0].numel()
    errors = []
    for eps in (0.4, 0.2, 0.1):
        loss = fdsm_ext.fd_ssm_loss(net, x, eps=eps, output="energy", reduction="none",
                                    generator=torch.Generator().manual_seed(3))
        u = directions(x, 3, 1, "sphere", eps) * math.sqrt(d) / eps
        exact = ssm_with_directions(lambda y: -net(y.reshape(x.shape)), x.reshape(4, -1), u,
                                    "scalar")
        errors.append((loss - exact).abs().max().item())
    for coarse, fine in zip(errors, errors[1:], strict=False):
        assert 3.0 < coarse / fine < 5.0, errors


def test_flash_has_no_double_backward_but_fd_trains_through_it():
    """Autograd DSM through the flash kernel fails; FD-SSM's value and parameter gradients
    under flash equal those under MATH (float64: rounding only; in float32 the d / eps^2
    factor of the differences magnifies the kernels' different rounding)."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    flash = _vit("flash", sigmas=sigmas)
    with pytest.raises(RuntimeError, match="flash_attention.*not implemented"):
        fdsm_ext.noise_conditional_loss(flash, x, sigmas, method="dsm", output="energy",
                                        seed=0).backward()
    results = {}
    for attention in ("flash", "math"):
        net = _vit(attention, sigmas=sigmas)
        loss = fdsm_ext.noise_conditional_loss(net, x, sigmas, method="fd_ssm", eps=0.1,
                                               output="energy", seed=1)
        results[attention] = [loss.detach(), *torch.autograd.grad(loss, net.parameters())]
    for a, b in zip(results["flash"], results["math"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_attention_backend_is_checked():
    with pytest.raises(ValueError, match="attention must be one of"):
        attention_context("fast")
    with pytest.raises(ValueError, match="divisible by the patch size"):
        ViTEnergy(1, 28, patch=5)


VIT = ["--arch", "vit", "--n-sigmas", "3"]


def test_train_ebm_vit_fd_ssm_flash_smoke(tmp_path):
    out = str(tmp_path / "vit")
    run(EBM, *VIT, "--method", "fd_ssm", "--steps", "3", "--out", out, *TINY_EBM)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["arch"] == "vit" and m["attention"] == "flash" and m["method"] == "fd_ssm"
    assert m["samples_finite"] and math.isfinite(m["final_train_loss"])
    # the held-out exact SM loss differentiates twice: evaluated under MATH, not flash
    assert math.isfinite(m["final_heldout_exact_sm_loss"])
    assert any(k.startswith("blocks.") for k in read_ckpt(out)["model"])


@pytest.mark.parametrize("method", ["ssm", "ssm_vr", "dsm", "exact"])
def test_train_ebm_refuses_autograd_methods_under_flash(tmp_path, capsys, method):
    ebm = load_script(EBM)
    with pytest.raises(SystemExit) as e:
        ebm.main([*VIT, "--method", method, "--out", str(tmp_path / "o"), *TINY_EBM])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for phrase in ("double backward", "flash", "--attention math", "fd_ssm"):
        assert phrase in err, err
    assert not os.path.exists(tmp_path / "o")


def test_train_ebm_refuses_vit_options_for_conv(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script(EBM).main(["--attention", "math", "--out", str(tmp_path / "o"), *TINY_EBM])
    assert "only to --arch vit" in capsys.readouterr().err


def test_train_ebm_vit_math_ssm_first_loss_is_the_library_loss(tmp_path):
    """Step 1 of ``--arch vit --attention math --method ssm``: the logged loss equals
    noise_conditional_loss(method="ssm") on the same initial ViT, batch and generator."""
    from examples.common import data, seeding
    from examples.common.distributed import Dist

    out = str(tmp_path / "ssm")
    run(EBM, *VIT, "--attention", "math", "--method", "ssm", "--steps", "1",
        "--eval-every", "0", "--out", out, *TINY_EBM)
    logged = read_ckpt(out)["history"]["train"][0][1]
    seeding.seed_everything(0)
    sigmas = fdsm_ext.geometric_sigmas(1.0, 0.05, 3)
    net = ViTEnergy(1, 8, patch=4, sigmas=sigmas, attention="math")
    train_x, _ = data.load_dataset("digits", limit=64)
    x = train_x[seeding.batch_indices(len(train_x), 16, 0, 0, Dist())]
    want = fdsm_ext.noise_conditional_loss(
        net, x, sigmas, method="ssm", variance_reduction=False, n_projections=1,
        output="energy", condition="label",
        generator=seeding.step_generator(0, 0, 0, torch.device("cpu")))
    assert logged == pytest.approx(float(want.detach()), rel=1e-6)
