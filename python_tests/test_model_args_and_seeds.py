"""Model arguments (model_kwargs, the per-sample rule, shared=) and the seed= argument."""

import pytest
import torch

from fdsm_ext import (
    annealed_langevin_dynamics,
    dsm_loss,
    exact_sm_loss,
    fd_dsm_loss,
    fd_ssm_loss,
    langevin_dynamics,
    noise_conditional_loss,
    ssm_loss,
)

B = D = 4  # the trap: a per-feature tensor (D,) with D == B
SIGMAS = torch.tensor([1.0, 0.5, 0.1])


def log_density(y, labels=None, *, t, w):
    """log p(y | t, w) = -1/2 t sum_i w_i y_i^2: per-sample precision t (B,), per-feature
    weights w (D,)."""
    return -0.5 * t * (w * y * y).sum(1)


def closure(t, w):
    """The same model with t and w bound: t repeated by rows (the stacked copies are blocks
    of B rows), w the same for every row."""
    return lambda y, *labels: log_density(y, t=t.repeat(y.shape[0] // B), w=w)


LOSSES = {
    "fd_ssm": lambda m, x, **k: fd_ssm_loss(m, x, output="log_density", n_projections=2, **k),
    "fd_dsm": lambda m, x, **k: fd_dsm_loss(m, x, 0.3, output="log_density", **k),
    "ssm": lambda m, x, **k: ssm_loss(m, x, output="log_density", n_projections=3, **k),
    "dsm": lambda m, x, **k: dsm_loss(m, x, 0.3, output="log_density", **k),
    "exact_sm": lambda m, x, **k: exact_sm_loss(m, x, output="log_density", chunk_size=2, **k),
    "noise_conditional": lambda m, x, labels=None, **k: noise_conditional_loss(
        m, x, SIGMAS, method="fd_ssm", output="log_density", **k),
}


def data():
    x = torch.randn(B, D, dtype=torch.float64)
    t = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    return x, t, w


@pytest.mark.parametrize("name", list(LOSSES))
def test_model_kwargs_per_sample_and_shared(name):
    """t (B,) is repeated with the stacked rows, w (D,) listed in shared= is not."""
    x, t, w = data()
    loss, seed = LOSSES[name], {} if name == "exact_sm" else {"seed": 7}
    got = loss(log_density, x, model_kwargs={"t": t, "w": w}, shared=["w"], reduction="none",
               **seed)
    expected = loss(closure(t, w), x, reduction="none", **seed)
    torch.testing.assert_close(got, expected)
    if name == "exact_sm":  # closed form: 1/2 t^2 sum w^2 y^2 - t sum w
        closed = 0.5 * t**2 * (w**2 * x**2).sum(1) - t * w.sum()
        torch.testing.assert_close(got, closed)


def test_positional_shared_tensor():
    x, t, w = data()

    def model(y, t_, w_):
        return log_density(y, t=t_, w=w_)

    got = fd_ssm_loss(model, x, t, w, shared=[1], output="log_density", seed=1)
    torch.testing.assert_close(got, fd_ssm_loss(closure(t, w), x, output="log_density", seed=1))


def test_undeclared_tensors_are_per_sample_by_the_rule():
    """The rule does not look at shapes: with B == D an undeclared w is per-sample (repeated),
    so the model sees w.repeat(3) for FD-SSM's 3 stacked blocks."""
    x, t, w = data()
    seen = []

    def model(y, *, t, w):
        seen.append(w)
        return -t * (y * y).sum(1)

    fd_ssm_loss(model, x, model_kwargs={"t": t, "w": w}, output="log_density")
    assert torch.equal(seen[0], w.repeat(3))


@pytest.mark.parametrize("bad", ["b_minus_1", "per_feature"])
def test_per_sample_tensor_with_wrong_leading_dim_is_a_clear_error(bad):
    x = torch.randn(6, 3, dtype=torch.float64)
    arg = torch.ones(5) if bad == "b_minus_1" else torch.ones(3)
    for call in (
        lambda: fd_ssm_loss(lambda y, a: -(y * y).sum(1), x, arg, output="log_density"),
        lambda: ssm_loss(lambda y, a: -(y * y).sum(1), x, arg, output="log_density"),
        lambda: langevin_dynamics(lambda y, a: -y, x, 1, 0.1, arg, output="score"),
    ):
        with pytest.raises(ValueError, match=r"model_args\[0\] has shape \((5|3),\).*B = 6.*"
                                             r"shared=\[0\]"):
            call()
    with pytest.raises(ValueError, match=r"model_kwargs\['a'\] has shape.*shared=\['a'\]"):
        fd_dsm_loss(lambda y, a: -(y * y).sum(1), x, 0.1, model_kwargs={"a": arg},
                    output="log_density")


def test_bad_model_args_options():
    x = torch.randn(4, 2)
    model = lambda y, *a, **k: -(y * y).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="shared entry 1 names no model argument"):
        fd_ssm_loss(model, x, torch.ones(4), shared=[1], output="log_density")
    with pytest.raises(ValueError, match="shared entry 'u' names no model argument.*'t'"):
        fd_ssm_loss(model, x, model_kwargs={"t": 1}, shared=["u"], output="log_density")
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        fd_ssm_loss(model, x, model_kwargs=[1], output="log_density")


def test_samplers_pass_model_kwargs():
    x0, t, w = data()
    g = torch.Generator().manual_seed(0)
    got = langevin_dynamics(log_density, x0, 5, 0.01, model_kwargs={"t": t, "w": w},
                            shared="w", output="log_density", generator=g)
    g = torch.Generator().manual_seed(0)
    expected = langevin_dynamics(closure(t, w), x0, 5, 0.01, output="log_density", generator=g)
    torch.testing.assert_close(got, expected)

    def ncsn(y, labels, *, scale):
        return -y * scale / (1 + SIGMAS.double()[labels, None] ** 2)

    got = annealed_langevin_dynamics(ncsn, x0, SIGMAS, 2, model_kwargs={"scale": t[:, None]},
                                     output="score", generator=torch.Generator().manual_seed(1))
    expected = annealed_langevin_dynamics(
        lambda y, labels: ncsn(y, labels, scale=t[:, None]), x0, SIGMAS, 2, output="score",
        generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------
# seed=


@pytest.mark.parametrize("name", ["fd_ssm", "fd_dsm", "ssm", "dsm", "noise_conditional"])
def test_seed_fixes_every_draw_and_leaves_the_default_generator_alone(name):
    x, t, w = data()
    model = closure(t, w)
    loss = LOSSES[name]
    torch.manual_seed(0)
    a = loss(model, x, seed=11, reduction="none")
    after = torch.randn(2)
    torch.manual_seed(123)
    b = loss(model, x, seed=torch.tensor(11), reduction="none")
    c = loss(model, x, seed=12, reduction="none")
    torch.manual_seed(0)
    assert torch.equal(torch.randn(2), after)  # seed= consumed nothing
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_seed_errors():
    x = torch.randn(4, 2)
    model = lambda y: -(y * y).sum(1)  # noqa: E731
    with pytest.raises(ValueError, match="fd_ssm_loss: pass seed or generator, not both"):
        fd_ssm_loss(model, x, seed=1, generator=torch.Generator(), output="log_density")
    for bad in (-1, 2**63, 1.5, True, "1", torch.tensor(1.0), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="dsm_loss: seed must be an int"):
            dsm_loss(model, x, 0.1, seed=bad, output="log_density")
    with pytest.raises(TypeError, match="ssm_loss: generator must be a torch.Generator"):
        ssm_loss(model, x, generator=0, output="log_density")
