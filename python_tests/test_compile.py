"""torch.compile(fullgraph=True) traces the whole FD loss: fused ops included, no graph break,
and the compiled loss draws the same random numbers as the eager one (inductor's own random
number generation is left at its default: the library's draws are its own ops)."""

import pytest
import torch
from torch import nn

from fdsm_ext import fd_dsm_loss, fd_ssm_loss, noise_conditional_loss


def mlp_energy():
    return nn.Sequential(nn.Linear(6, 32), nn.Softplus(), nn.Linear(32, 1), nn.Flatten(0))


def conv_energy():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Softplus(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1), nn.Flatten(0),
    )


class ConditionalEnergy(nn.Module):
    """E(x, c) for a label (LongTensor) or a noise level (float tensor) c."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, 32), nn.Softplus(), nn.Linear(32, 1))

    def forward(self, x, c):
        c = c.to(x.dtype).log() if c.is_floating_point() else c.to(x.dtype)
        return self.net(torch.cat([x, c[:, None]], 1))[:, 0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def loss_fn(model, loss_kind, **rng):
    sigmas = torch.tensor([1.0, 0.3, 0.1], dtype=torch.float64)

    def step(x):
        if loss_kind == "fd_ssm":
            return fd_ssm_loss(model, x, output="energy", n_projections=2, **rng)
        if loss_kind == "fd_dsm":
            return fd_dsm_loss(model, x, 0.1, output="energy", **rng)
        method, condition = loss_kind.split("/")
        return noise_conditional_loss(model, x, sigmas, method=method, condition=condition,
                                      output="energy", **rng)

    return step


def eager_and_compiled(step, x, before_each):
    """(loss, parameter gradients, next default-generator draw) for eager, then compiled."""
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        before_each()
        loss = fn(x)
        grads = torch.autograd.grad(loss, [p for p in step.model.parameters()])
        results.append((loss, grads, torch.randn(3)))
    return results


CASES = [(mlp_energy, (8, 6), "fd_ssm"), (conv_energy, (8, 1, 8, 8), "fd_ssm"),
         (mlp_energy, (8, 6), "fd_dsm"), (conv_energy, (8, 1, 8, 8), "fd_dsm"),
         (ConditionalEnergy, (8, 6), "fd_ssm/label"), (ConditionalEnergy, (8, 6), "fd_dsm/sigma")]


RNGS = [(*case, "manual_seed") for case in CASES] + [
    (*CASES[i], rng) for i in (0, 3, 4) for rng in ("int_seed", "tensor_seed")]


@pytest.mark.parametrize("make_model, shape, loss_kind, rng", RNGS)
def test_compiled_loss_and_backward_match_eager(make_model, shape, loss_kind, rng):
    torch.manual_seed(0)
    # float64: in float32 the FD cancellation amplifies inductor's different summation order.
    model = make_model().double()
    x = torch.randn(shape, dtype=torch.float64)
    kwargs = {"manual_seed": {}, "int_seed": {"seed": 12345},
              "tensor_seed": {"seed": torch.tensor(2**40 + 7)}}[rng]
    step = loss_fn(model, loss_kind, **kwargs)
    step.model = model
    (eager_loss, eager_grads, eager_next), (loss, grads, next_draw) = eager_and_compiled(
        step, x, lambda: torch.manual_seed(1))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
    # The default generator advanced identically (by the key draw only, or not at all).
    assert torch.equal(next_draw, eager_next)
    if rng != "manual_seed":  # seed=: the default generator is not used at all
        torch.manual_seed(1)
        assert torch.equal(eager_next, torch.randn(3))


def test_compiled_draws_a_fresh_key_per_call_and_per_loss():
    """Two losses in one graph get different keys (the draws are not merged), each call of
    the compiled function new ones, and all of them as in eager."""
    model = mlp_energy().double()
    x = torch.randn(8, 6, dtype=torch.float64)

    def two(x):
        return torch.stack([fd_ssm_loss(model, x, output="energy") for _ in range(2)])

    compiled = torch.compile(two, fullgraph=True)
    torch.manual_seed(5)
    eager = torch.stack([two(x), two(x)])
    torch.manual_seed(5)
    comp = torch.stack([compiled(x), compiled(x)])
    torch.testing.assert_close(comp, eager)
    assert len(set(eager.flatten().tolist())) == 4


def test_compiled_seed_changes_the_draws():
    model = mlp_energy().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    step = torch.compile(lambda x, s: fd_ssm_loss(model, x, output="energy", seed=s),
                         fullgraph=True)
    for s in (1, 2, 3):
        seed = torch.tensor(s)
        torch.testing.assert_close(step(x, seed), fd_ssm_loss(model, x, output="energy", seed=s))


SEED_KINDS = {
    "tensor": (lambda s: torch.tensor(s), 1),  # a graph input: never recompiles
    "tensor_2^40": (lambda s: torch.tensor(2**40 + s), 1),
    "int": (int, 2),  # specialised, then one recompile makes it dynamic
    "none": (None, 1),  # the key is drawn inside the graph
}


@pytest.mark.parametrize("kind", SEED_KINDS)
def test_recompile_count_per_seed_kind(kind):
    """Graphs compiled for 7 seed values, counted twice: by a counting backend (the frames
    it is handed) and by dynamo's own counters. docs/guides/compile.rst states the same."""
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    make_seed, expected = SEED_KINDS[kind]
    model = mlp_energy().double()
    x = torch.randn(8, 6, dtype=torch.float64)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()
    if make_seed is None:
        step = torch.compile(lambda x: fd_ssm_loss(model, x, output="energy"),
                             fullgraph=True, backend=backend)
        for s in range(7):
            torch.manual_seed(s)
            loss = step(x)
            torch.manual_seed(s)
            torch.testing.assert_close(loss, fd_ssm_loss(model, x, output="energy"))
    else:
        step = torch.compile(lambda x, s: fd_ssm_loss(model, x, output="energy", seed=s),
                             fullgraph=True, backend=backend)
        for s in range(7):
            seed = make_seed(s)
            torch.testing.assert_close(step(x, seed),
                                       fd_ssm_loss(model, x, output="energy", seed=seed))
    assert backend.frame_count == expected
    assert counters["stats"]["unique_graphs"] == expected


def test_generator_under_compile_says_to_pass_seed():
    model = mlp_energy()
    x = torch.randn(4, 6)
    g = torch.Generator().manual_seed(0)
    step = torch.compile(lambda x: fd_ssm_loss(model, x, output="energy", generator=g),
                         fullgraph=True)
    with pytest.raises(Exception, match="pass seed="):
        step(x)
