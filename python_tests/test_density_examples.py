"""Tests of the density-estimation examples: examples.dkef_uci and examples.nice_mnist.

Model pieces are checked against exact answers (library losses, least squares, closed-form
normalisers, torch.func Jacobians); the scripts get smoke runs on tiny settings.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import philox_normal
from test_examples import (
    assert_methods_differ,
    assert_same_loss,
    common,
    load_script,
    loss_and_grads,
    read_ckpt,
    run,
    run_killed,
)

from fdsm_ext import reference

DKEF_SCRIPT = "examples.dkef_uci"
TINY_DKEF = ["--m", "16", "--width", "8", "--batch-size", "432", "--max-epochs", "1",
             "--val-every", "1", "--val-fit-size", "64", "--final-steps", "5",
             "--final-draws", "1", "--is-samples", "3000", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def dkef():
    """The DKEF model, closed-form alpha, losses and log Z (examples.common.dkef)."""
    return common("dkef")


def small_model(dkef, d=3, m=7, seed=0):
    torch.manual_seed(seed)
    model = dkef.DKEF(torch.randn(m, d), n_kernels=2, width=5).double()
    with torch.no_grad():
        model.log_lambda.fill_(-1.5)
    return model


# --------------------------------------------------------------------------- DKEF
@pytest.mark.parametrize("method", ["exact", "ssm", "ssm_vr", "dsm"])
def test_dkef_quadratic_terms_reproduce_library_loss(dkef, method):
    """loss(alpha) - loss(0) == 1/2 a^T G a + b^T a for the library's own loss (same noise)."""
    model = small_model(dkef)
    x = torch.randn(9, 3, dtype=torch.float64)
    kw = {"eps": 0.1, "sigma": 0.3}
    seed = 5
    # The noise the library's loss draws for seed=5: z of DSM, the Rademacher u of SSM.
    noise = {"dsm": philox_normal(seed, 9, 3),
             "ssm": reference._philox_directions(seed, 9, 3, "rademacher").double()}
    noise["ssm_vr"] = noise["ssm"]
    G, b = dkef.normal_equations(*dkef.quadratic_terms(
        method, model, x, None, noise=noise.get(method), **kw))
    for scale in (0.3, 2.0):
        alpha = scale * torch.randn(7, dtype=torch.float64)
        loss = dkef.method_loss(method, model, alpha, x, None, create_graph=False, seed=seed,
                                **kw)
        base = dkef.method_loss(method, model, torch.zeros_like(alpha), x, None,
                                create_graph=False, seed=seed, **kw)
        quad = 0.5 * alpha @ G @ alpha + b @ alpha
        torch.testing.assert_close(loss - base, quad.detach(), rtol=1e-9, atol=1e-9)


def test_dkef_method_is_the_library_loss_it_names(dkef):
    """dkef_uci's method_loss (the training and validation loss of every --methods entry)
    equals the library loss it names on log p~(.; alpha): value and gradients with respect
    to the network, the inducing points, the bandwidths and alpha; no two methods agree."""
    import fdsm_ext

    dkef_uci = load_script(DKEF_SCRIPT)
    model = small_model(dkef)
    alpha = torch.randn(7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    params = [*model.parameters(), alpha]

    def logp(y):
        return model.log_density(y, alpha)

    direct = {
        ("exact", "residual"): lambda g: fdsm_ext.exact_sm_loss(
            logp, x, output="log_density", create_graph=True),
        ("ssm", "residual"): lambda g: fdsm_ext.ssm_loss(
            logp, x, variance_reduction=False, n_projections=2, output="log_density",
            generator=g),
        ("ssm_vr", "residual"): lambda g: fdsm_ext.ssm_loss(
            logp, x, variance_reduction=True, n_projections=2, output="log_density",
            generator=g),
        ("fd_ssm", "residual"): lambda g: fdsm_ext.fd_ssm_loss(
            logp, x, eps=0.1, variance_reduction=True, n_projections=2,
            output="log_density", generator=g),
        ("dsm", "residual"): lambda g: fdsm_ext.dsm_loss(logp, x, 0.3, output="log_density",
                                                         generator=g),
        ("fd_dsm", "residual"): lambda g: fdsm_ext.fd_dsm_loss(
            logp, x, 0.3, eps=0.1, direction="residual", output="log_density", generator=g),
        ("fd_dsm", "random"): lambda g: fdsm_ext.fd_dsm_loss(
            logp, x, 0.3, eps=0.1, direction="random", n_projections=2,
            output="log_density", generator=g),
    }
    assert {m for m, _ in direct} == set(dkef_uci.METHODS)
    results = {}
    for (method, direction), fn in direct.items():
        got = loss_and_grads(dkef.method_loss(
            method, model, alpha, x, torch.Generator().manual_seed(4), eps=0.1, sigma=0.3,
            n_projections=2, fd_dsm_direction=direction), params)
        want = loss_and_grads(fn(torch.Generator().manual_seed(4)), params)
        assert_same_loss(got, want)
        results[method, direction] = got
    assert_methods_differ(results)


@pytest.mark.parametrize("fd, exact", [("fd_ssm", "exact"), ("ssm", "exact"),
                                       ("ssm_vr", "exact")])
def test_dkef_sliced_terms_average_to_exact(dkef, fd, exact):
    """Averaged over many random directions, the sliced / FD normal equations are exact SM's."""
    model = small_model(dkef, seed=1)
    x = torch.randn(4, 3, dtype=torch.float64).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad() if fd.startswith("fd") else torch.enable_grad():
        G, b = dkef.normal_equations(*dkef.quadratic_terms(fd, model, x, g, eps=0.05, sigma=0.1))
    G_ex, b_ex = dkef.normal_equations(*dkef.quadratic_terms(exact, model, x[:4], g, eps=0.05,
                                                              sigma=0.1))
    scale_G, scale_b = G_ex.abs().max(), b_ex.abs().max()
    assert (G.detach() - G_ex.detach()).abs().max() < 0.05 * scale_G
    assert (b.detach() - b_ex.detach()).abs().max() < 0.05 * scale_b


@pytest.mark.parametrize("method, exact", [("fd_ssm", "exact"), ("fd_dsm", "dsm")])
def test_dkef_fd_terms_with_d_orthogonal_directions_are_deterministic(dkef, method, exact):
    """With d orthogonal directions per sample the FD normal equations equal the autograd
    ones up to O(eps^2), with no sampling noise (same DSM noise z: same generator state)."""
    model = small_model(dkef, seed=4)
    x = torch.randn(6, 3, dtype=torch.float64)
    kw = {"eps": 1e-3, "sigma": 0.3}
    G, b = dkef.normal_equations(*dkef.quadratic_terms(
        method, model, x, torch.Generator().manual_seed(2), directions=3, **kw))
    G_ex, b_ex = dkef.normal_equations(*dkef.quadratic_terms(
        exact, model, x, torch.Generator().manual_seed(2), **kw))
    torch.testing.assert_close(G, G_ex.detach(), rtol=1e-5, atol=1e-6 * float(G_ex.abs().max()))
    # DSM's b holds the noise term z/sigma once; FD-DSM's holds it through v^T z: same sum.
    torch.testing.assert_close(b, b_ex.detach(), rtol=1e-5, atol=1e-6 * float(b_ex.abs().max()))


def test_dkef_closed_form_alpha_matches_least_squares(dkef):
    """DSM's alpha (no linear term) is a ridge regression: compare with torch.linalg.lstsq."""
    model = small_model(dkef, seed=2)
    x = torch.randn(12, 3, dtype=torch.float64)
    A, c, e = dkef.quadratic_terms("dsm", model, x, torch.Generator().manual_seed(1), eps=0.1,
                                   sigma=0.2)
    assert e.abs().max() == 0
    alpha = dkef.solve_alpha(*dkef.normal_equations(A, c, e), model.log_lambda).detach()
    n, m, k = A.shape
    lam = 10.0 ** float(model.log_lambda.detach())
    # min_a mean_n 1/2 ||A_n^T a + c_n||^2 + lam/2 ||a||^2 as one stacked least-squares system.
    design = torch.cat([A.detach().transpose(1, 2).reshape(n * k, m) / math.sqrt(n),
                        math.sqrt(lam) * torch.eye(m, dtype=A.dtype)])
    target = torch.cat([-c.detach().reshape(n * k) / math.sqrt(n), torch.zeros(m, dtype=A.dtype)])
    direct = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    torch.testing.assert_close(alpha, direct, rtol=1e-8, atol=1e-10)


def test_dkef_alpha_minimises_exact_sm_loss(dkef):
    """At the fitted alpha the gradient of exact SM loss + ridge (library) vanishes."""
    import fdsm_ext

    model = small_model(dkef, seed=3)
    x = torch.randn(15, 3, dtype=torch.float64)
    alpha = dkef.fit_alpha("exact", model, x, torch.Generator(), eps=0.1, sigma=0.1).detach()
    alpha.requires_grad_(True)
    lam = 10.0 ** model.log_lambda.detach()
    loss = fdsm_ext.exact_sm_loss(lambda y: model.log_density(y, alpha), x,
                                  output="log_density", create_graph=True)
    (grad,) = torch.autograd.grad(loss + 0.5 * lam * alpha.pow(2).sum(), alpha)
    assert grad.abs().max() < 1e-9


def test_importance_sampling_log_normaliser_gaussian(dkef):
    """log Z of an unnormalised Gaussian exp(-||x - mu||^2 / (2 s^2)) is d/2 log(2 pi s^2)."""
    d, s = 3, 1.3
    mu = torch.tensor([0.5, -0.3, 0.2])
    log_z, se = dkef.log_normaliser(lambda x: -0.5 * (x - mu).pow(2).sum(1) / s**2, d, 200_000,
                                    torch.Generator().manual_seed(0), chunk=50_000)
    truth = 0.5 * d * math.log(2 * math.pi * s**2)
    assert 0 < se < 0.01
    assert abs(log_z - truth) < 4 * se


def test_red_wine_preparation():
    common_data = pytest.importorskip("examples.common.data")
    try:
        raw = common_data.load_red_wine()
    except common_data.DataError as e:
        pytest.skip(str(e))
    prepare = load_script(DKEF_SCRIPT).prepare
    train, val, test = prepare(raw)
    assert raw.shape == (1599, 11)
    assert (len(train), len(val), len(test)) == (1296, 144, 159)
    whole = torch.cat([train, val, test]).double()
    # Whitened (up to the added N(0, 0.05^2) noise): unit covariance, zero mean.
    cov = torch.cov(whole.T)
    assert (cov - torch.eye(11, dtype=cov.dtype) * (1 + 0.05**2)).abs().max() < 0.02
    torch.testing.assert_close(prepare(raw)[2], test)  # fixed split and noise


def test_dkef_missing_data_file_is_one_line_error(tmp_path):
    proc = run(DKEF_SCRIPT, "--data-file", str(tmp_path / "nope.csv"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no such file" in proc.stderr


def test_dkef_smoke_and_exact_resume(tmp_path):
    args = ["--methods", "fd_ssm", "exact", "--seeds", "0", "--ckpt-every", "1", *TINY_DKEF]
    full = str(tmp_path / "full")
    run(DKEF_SCRIPT, *args, "--out", full, timeout=300)
    m = json.load(open(os.path.join(full, "metrics.json")))
    assert set(m["summary"]) == {"fd_ssm", "exact"}
    for r in m["runs"]:
        assert r["steps"] == 3 and math.isfinite(r["test_nll"]) and r["test_nll_is_se"] > 0
        assert math.isfinite(r["test_exact_sm"]) and r["seconds_per_iteration"] > 0
    assert os.path.getsize(os.path.join(full, "table.md")) > 0

    part = str(tmp_path / "part")
    run_killed(DKEF_SCRIPT, *args, "--out", part, after_step=1, timeout=300)
    resumed = run(DKEF_SCRIPT, *args, "--out", part, "--resume", timeout=300)
    assert "resumed at step 1" in resumed.stdout
    m2 = json.load(open(os.path.join(part, "metrics.json")))
    for a, b in zip(m["runs"], m2["runs"]):
        assert a["method"] == b["method"]
        assert a["test_nll"] == b["test_nll"] and a["test_exact_sm"] == b["test_exact_sm"]

    # A finished run continues when --max-epochs grows, and then equals a fresh longer run.
    longer = [*args, "--max-epochs", "2", "--timing-rounds", "0"]
    extended = run(DKEF_SCRIPT, *longer, "--out", part, "--resume", timeout=300)
    assert "fd_ssm seed 0: resumed at step 3" in extended.stdout
    run(DKEF_SCRIPT, *longer, "--out", str(tmp_path / "fresh"), timeout=300)
    m3 = json.load(open(os.path.join(part, "metrics.json")))
    m4 = json.load(open(os.path.join(tmp_path, "fresh", "metrics.json")))
    for a, b in zip(m3["runs"], m4["runs"]):
        assert a["steps"] == b["steps"] == 6
        assert a["test_nll"] == b["test_nll"] and a["test_exact_sm"] == b["test_exact_sm"]


# --------------------------------------------------------------------------- NICE
NICE_SCRIPT = "examples.nice_mnist"


@pytest.fixture(scope="module")
def nice():
    return load_script(NICE_SCRIPT)


def test_nice_log_density_matches_jacobian_determinant(nice):
    """log p(x) == log N(T(x); 0, I) + log|det dT/dx| with the Jacobian from torch.func."""
    torch.manual_seed(0)
    flow = nice.NICE(7, hidden=6, depth=3).double()
    with torch.no_grad():
        flow.log_scale.normal_(0, 0.5)
    x = torch.randn(5, 7, dtype=torch.float64)
    for xi, lp in zip(x, flow.log_prob(x)):
        jac = torch.func.jacrev(lambda v: flow.transform(v[None])[0])(xi)
        y = flow.transform(xi[None])[0]
        expected = (torch.distributions.Normal(0.0, 1.0).log_prob(y).sum()
                    + torch.linalg.slogdet(jac).logabsdet)
        torch.testing.assert_close(lp, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.inverse(flow.transform(x)), x, rtol=1e-10, atol=1e-10)


def test_nice_bits_per_dim_change_of_variables(nice):
    """bits/dim adds log|dy/dp| of the logit and the 1/256 scaling, per dimension."""
    y = torch.randn(3, 4, dtype=torch.float64)
    nll = torch.rand(3, dtype=torch.float64)
    p = torch.sigmoid(y)
    expected = (nll + torch.log(p * (1 - p)).sum(1) + 4 * math.log(256)) / (4 * math.log(2))
    torch.testing.assert_close(nice.bits_per_dim(nll, y), expected)


@pytest.mark.parametrize("method,fn", [("ssm", "ssm_loss"), ("fd_ssm", "fd_ssm_loss"),
                                       ("fd_dsm", "fd_dsm_loss")])
def test_nice_method_loss_passes_n_projections(nice, method, fn):
    """--n-projections reaches the library loss: same value as the direct call."""
    import fdsm_ext

    torch.manual_seed(0)
    flow = nice.NICE(6, hidden=5, depth=3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    got = nice.method_loss(method, flow, x, torch.Generator().manual_seed(3), eps=0.1,
                           sigma=0.2, n_projections=3, fd_dsm_direction="random")
    args = (0.2,) if method == "fd_dsm" else ()
    extra = {} if method == "ssm" else {"eps": 0.1}
    if method == "fd_dsm":
        extra["direction"] = "random"
    want = getattr(fdsm_ext, fn)(flow.log_prob, x, *args, output="log_density",
                                 generator=torch.Generator().manual_seed(3), n_projections=3,
                                 **extra)
    torch.testing.assert_close(got, want)
    one = nice.method_loss(method, flow, x, torch.Generator().manual_seed(3), eps=0.1,
                           sigma=0.2, n_projections=1, fd_dsm_direction="random")
    assert not torch.allclose(got, one)


def test_nice_fd_dsm_residual_is_the_library_loss_with_dsm_value(nice):
    import fdsm_ext

    torch.manual_seed(0)
    flow = nice.NICE(6, hidden=5, depth=3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    got = nice.method_loss("fd_dsm", flow, x, torch.Generator().manual_seed(3), eps=0.1,
                           sigma=0.2)
    dsm = nice.method_loss("dsm", flow, x, torch.Generator().manual_seed(3), eps=0.1, sigma=0.2)
    torch.testing.assert_close(got, dsm.detach(), rtol=1e-12, atol=0)
    want = fdsm_ext.fd_dsm_loss(flow.log_prob, x, 0.2, eps=0.1, output="log_density",
                                generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# nice_mnist --methods (and --fd-dsm-direction): the library loss of flow.log_prob
def _nice_direct(key, flow, x, g):
    import fdsm_ext

    kw = {"output": "log_density", "generator": g}
    return {
        ("mle", "residual"): lambda: -flow.log_prob(x).mean(),
        ("ssm", "residual"): lambda: fdsm_ext.ssm_loss(
            flow.log_prob, x, variance_reduction=False, n_projections=2, **kw),
        ("ssm_vr", "residual"): lambda: fdsm_ext.ssm_loss(
            flow.log_prob, x, variance_reduction=True, n_projections=2, **kw),
        ("fd_ssm", "residual"): lambda: fdsm_ext.fd_ssm_loss(
            flow.log_prob, x, eps=0.1, variance_reduction=True, n_projections=2, **kw),
        ("dsm", "residual"): lambda: fdsm_ext.dsm_loss(flow.log_prob, x, 0.2, **kw),
        ("fd_dsm", "residual"): lambda: fdsm_ext.fd_dsm_loss(
            flow.log_prob, x, 0.2, eps=0.1, direction="residual", **kw),
        ("fd_dsm", "random"): lambda: fdsm_ext.fd_dsm_loss(
            flow.log_prob, x, 0.2, eps=0.1, direction="random", n_projections=2, **kw),
        ("exact", "residual"): lambda: fdsm_ext.exact_sm_loss(
            flow.log_prob, x, output="log_density", create_graph=True),
    }[key]()


NICE_KEYS = [("mle", "residual"), ("ssm", "residual"), ("ssm_vr", "residual"),
             ("fd_ssm", "residual"), ("dsm", "residual"), ("fd_dsm", "residual"),
             ("fd_dsm", "random"), ("exact", "residual")]


def test_nice_method_is_the_library_loss_it_names(nice):
    """Loss and parameter gradients of every --methods entry equal the direct library call
    (same flow, batch, generator); no two methods agree."""
    assert {m for m, _ in NICE_KEYS} == set(nice.METHODS)
    torch.manual_seed(0)
    flow = nice.NICE(6, hidden=5, depth=3).double()
    with torch.no_grad():
        flow.log_scale.normal_(0, 0.3)
    x = torch.randn(4, 6, dtype=torch.float64)
    params = list(flow.parameters())
    results = {}
    for key in NICE_KEYS:
        method, direction = key
        got = loss_and_grads(nice.method_loss(
            method, flow, x, torch.Generator().manual_seed(3), eps=0.1, sigma=0.2,
            n_projections=2, fd_dsm_direction=direction), params)
        want = loss_and_grads(_nice_direct(key, flow, x, torch.Generator().manual_seed(3)),
                              params)
        assert_same_loss(got, want)
        results[key] = got
    assert_methods_differ(results)


def test_nice_smoke(tmp_path):
    out = str(tmp_path / "nice")
    run(NICE_SCRIPT, "--limit", "300", "--test-limit", "50", "--hidden", "16", "--depth", "2",
        "--epochs", "1", "--batch-size", "64", "--eval-every", "2", "--sm-subset", "2",
        "--threads", "1", "--no-progress", "--out", out, timeout=300)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert [r["method"] for r in m["runs"]] == ["mle", "ssm", "ssm_vr", "fd_ssm", "dsm",
                                                "fd_dsm"]
    for r in m["runs"]:
        assert r["steps"] == 4 and math.isfinite(r["test_nll_nats"])
        assert math.isfinite(r["test_exact_sm"]) and r["saved_for_backward_mb"] > 0
    for f in ("table.md", "nll_vs_time.png", "samples.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0
    # --resume with more --epochs continues the finished runs from their checkpoints.
    more = run(NICE_SCRIPT, "--methods", "mle", "fd_ssm", "--limit", "300", "--test-limit", "50",
               "--hidden", "16", "--depth", "2", "--epochs", "2", "--batch-size", "64",
               "--eval-every", "2", "--sm-subset", "2", "--threads", "1", "--no-progress",
               "--out", out, "--resume", timeout=300)
    assert "fd_ssm: resumed at step 4" in more.stdout
    assert [r["steps"] for r in json.load(open(os.path.join(out, "metrics.json")))["runs"]] \
        == [8, 8]


def test_nice_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    """A NICE run killed mid-way (after its step-2 checkpoint) and resumed ends bit for bit
    where an uninterrupted run ends: parameters, Adam state, losses, held-out NLLs, the best
    model, exact SM, samples. The killed method is the first; the second starts fresh."""
    args = ["--methods", "fd_ssm", "dsm", "--limit", "300", "--test-limit", "50", "--hidden",
            "16", "--depth", "2", "--epochs", "2", "--batch-size", "64", "--eval-every", "2",
            "--ckpt-every", "2", "--sm-subset", "2", "--timing-rounds", "0", "--threads", "1",
            "--no-progress"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(NICE_SCRIPT, *args, "--out", full, timeout=300)
    run_killed(NICE_SCRIPT, *args, "--out", part, after_step=3, timeout=300)
    assert read_ckpt(os.path.join(part, "fd_ssm"))["state"]["step"] == 2
    assert not os.path.exists(os.path.join(part, "metrics.json"))
    resumed = run(NICE_SCRIPT, *args, "--out", part, "--resume", timeout=300)
    assert "fd_ssm: resumed at step 2" in resumed.stdout

    timing = ("seconds_per_iteration", "train_seconds", "interleaved_timing", "peak_rss_mb",
              "peak_cuda_mb")
    ma = json.load(open(os.path.join(full, "metrics.json")))["runs"]
    mb = json.load(open(os.path.join(part, "metrics.json")))["runs"]
    assert [r["method"] for r in ma] == [r["method"] for r in mb] == ["fd_ssm", "dsm"]
    for ra, rb in zip(ma, mb):
        assert ra["steps"] == rb["steps"] == 8
        assert {k: v for k, v in ra.items() if k not in timing} == \
            {k: v for k, v in rb.items() if k not in timing}
    for method in ("fd_ssm", "dsm"):
        a = read_ckpt(os.path.join(full, method))
        b = read_ckpt(os.path.join(part, method))
        for k, v in a["model"].items():
            assert torch.equal(v, b["model"][k]), (method, k)
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k in sa[i]:
                assert torch.equal(sa[i][k], sb[i][k]), (method, i, k)
        ta, tb = a["state"], b["state"]
        assert ta["step"] == tb["step"] == 8
        assert ta["train"] == tb["train"] and ta["val"] == tb["val"]
        # curve: (step, training seconds, test NLL, bits/dim); the seconds are wall clock
        assert [c[:1] + c[2:] for c in ta["curve"]] == [c[:1] + c[2:] for c in tb["curve"]]
        assert (ta["best_step"], ta["best_val_nll"]) == (tb["best_step"], tb["best_val_nll"])
        for k, v in ta["best_model"].items():
            assert torch.equal(v, tb["best_model"][k]), (method, "best", k)
        assert torch.equal(
            torch.load(os.path.join(full, method, "samples.pt"), weights_only=True),
            torch.load(os.path.join(part, method, "samples.pt"), weights_only=True))
