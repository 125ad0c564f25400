"""torch.compile(fullgraph=True) traces the whole FD loss: fused ops included, no graph break."""

import pytest
import torch
from torch import nn

from fdsm_ext import fd_dsm_loss, fd_ssm_loss


def mlp_energy():
    return nn.Sequential(nn.Linear(6, 32), nn.Softplus(), nn.Linear(32, 1), nn.Flatten(0))


def conv_energy():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Softplus(), nn.Flatten(), nn.Linear(4 * 4 * 4, 1), nn.Flatten(0),
    )


@pytest.fixture(autouse=True)
def _same_random_numbers_as_eager():
    # Inductor generates its own random numbers unless told to call the eager kernels.
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make_model, shape", [(mlp_energy, (8, 6)), (conv_energy, (8, 1, 8, 8))])
@pytest.mark.parametrize("loss_kind", ["fd_ssm", "fd_dsm"])
def test_compiled_loss_and_backward_match_eager(make_model, shape, loss_kind):
    torch.manual_seed(0)
    # float64: in float32 the FD cancellation amplifies inductor's different summation order.
    model = make_model().double()
    x = torch.randn(shape, dtype=torch.float64)

    def step(x):
        if loss_kind == "fd_ssm":
            return fd_ssm_loss(model, x, output="energy", n_projections=2)
        return fd_dsm_loss(model, x, 0.1, output="energy")

    compiled = torch.compile(step, fullgraph=True)
    torch.manual_seed(1)
    eager_loss = step(x)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    torch.manual_seed(1)
    compiled_loss = compiled(x)
    compiled_grads = torch.autograd.grad(compiled_loss, list(model.parameters()))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
