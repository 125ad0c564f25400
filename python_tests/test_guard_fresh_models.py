"""The precision guard on freshly initialised float32 networks at d = 784, eps 0.1.

There the output L is small against the values inside the network (random-signed sums that
nearly cancel), so its rounding noise is many times u*|L|: the formula floor u*mean|L|*d/eps^2
alone stayed far under the threshold while FD-SSM's per-sample values were mostly noise. The
guard's rounding probe measures that noise (python_tests/test_precision.py checks the same
floor on a fixed MLP across eps and precisions). Every error here is float32 against the same
model in float64 with the same directions (the same seed), so it is rounding only."""

import copy
import re
import warnings

import pytest
import torch
from torch import nn

from fdsm_ext import FDPrecisionWarning, _guard, fd_ssm_loss
from fdsm_ext.precision import NOISE_LEVEL, THRESHOLD, _calls

EPS = 0.1
D = 784


class FreshMLP(nn.Module):
    """The 784-256-256-1 softplus MLP energy, PyTorch's default initialisation."""

    def __init__(self, out_scale: float = 1.0):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 256), nn.Softplus(), nn.Linear(256, 256),
                                 nn.Softplus(), nn.Linear(256, 1))
        with torch.no_grad():  # a larger output, as after training
            self.net[4].weight.mul_(out_scale)

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))[:, 0]


class FreshConv(nn.Module):
    """A 3-layer conv energy on 28x28 (5x5 kernels, stride 2, softplus, linear head)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 5, 2, 2), nn.Softplus(), nn.Conv2d(32, 64, 5, 2, 2), nn.Softplus(),
            nn.Conv2d(64, 64, 5, 2, 2), nn.Softplus(), nn.Flatten(), nn.Linear(64 * 16, 1))

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 28, 28))[:, 0]


def in_float64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def data(batch: int, kind: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, D, generator=g) if kind == "normal" else torch.rand(batch, D,
                                                                                  generator=g)


def guarded_call(model, x, eps=EPS, autocast=False, **kw):
    """fd_ssm_loss per sample with a fresh guard: (values, warning or None, the guard's
    (floor, typical value))."""
    seen = []
    report = _guard._report

    def recording(numbers, context):
        seen.append(numbers)
        report(numbers, context)

    _calls.clear()
    _guard._report = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FDPrecisionWarning)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                values = fd_ssm_loss(model, x, eps=eps, output="energy", seed=3,
                                     reduction="none", **kw)
    finally:
        _guard._report = report
    return values.detach(), (caught[0].message if caught else None), seen[0]


def measured(model, x, eps=EPS, autocast=False, **kw):
    """The guard's verdict and the measured rounding error, both per sample."""
    got, warning, (floor, typical) = guarded_call(model, x, eps, autocast, **kw)
    exact = fd_ssm_loss(in_float64(model), x.double(), eps=eps, output="energy", seed=3,
                        reduction="none", **kw)
    rms = (got.double() - exact).pow(2).mean().sqrt().item()
    with torch.no_grad():
        formula = 2.0**-24 * model(x).abs().mean().item() * D / eps**2
    return {"warning": warning, "floor": floor, "typical": typical, "rms": rms,
            "scale": exact.abs().mean().item(), "formula": formula}


def assert_warning_tells_the_truth(m):
    """The warning's floor is the measured rms error to within 30 %, and its words match the
    measured error."""
    message = str(m["warning"])
    floor = float(re.search(r"rounding noise of about ([\d.e+-]+) per sample", message)[1])
    assert floor == pytest.approx(m["floor"], rel=1e-2)
    assert 0.7 * m["rms"] < floor < 1.3 * m["rms"], m
    assert m["rms"] > THRESHOLD * m["scale"], m
    if "the loss is noise" in message:
        assert m["floor"] >= NOISE_LEVEL * m["typical"]
        assert m["rms"] > NOISE_LEVEL * m["scale"], m


def test_fresh_mlp_warns_and_its_values_are_noise():
    """Measured: rms error 0.74 of the typical per-sample value; the formula's ratio 0.03, the
    guard's 0.63 (its floor 0.99 of the measured error)."""
    model = FreshMLP()
    m = measured(model, data(128))
    assert m["warning"] is not None, m
    assert m["formula"] < 0.1 * m["typical"], m  # the formula alone would be silent
    assert m["rms"] > 0.5 * m["scale"], m
    assert_warning_tells_the_truth(m)


def test_fresh_conv_warns_and_its_values_are_noise():
    """Measured: rms error 5.3 times the typical per-sample value (the float32 values are 4.5
    times the float64 ones in mean size); the formula's ratio 0.07, the guard's 1.19 (its floor
    1.02 of the measured error)."""
    m = measured(FreshConv(), data(64, "uniform"))
    assert m["warning"] is not None, m
    assert m["formula"] < 0.1 * m["typical"], m
    assert m["rms"] > 2 * m["scale"], m
    assert_warning_tells_the_truth(m)


def test_bfloat16_autocast_with_large_internal_values_warns():
    """Under bfloat16 autocast the probe shifts its rows by a fraction of bfloat16's rounding
    step, so that they round on their own like x +- v. The conv energy with weights scaled
    so that its values inside are 100 times larger, eps 0.3: measured rms error 0.74 of the
    typical value; the formula's ratio alone 0.28 (quiet), the guard's 0.48 (its floor 0.92
    of the measured error)."""
    model = FreshConv()
    with torch.no_grad():
        for layer in (model.net[0], model.net[2], model.net[4]):
            layer.weight.mul_(100.0 ** (1 / 3))
        model.net[-1].weight.mul_(100.0)
    m = measured(model, data(64, "uniform"), 0.3, autocast=True)
    assert m["warning"] is not None and "(autocast)" in str(m["warning"]), m
    assert_warning_tells_the_truth(m)


@pytest.mark.parametrize("out_scale, eps", [(100.0, EPS), (1.0, 0.3)])
def test_larger_output_or_eps_is_quiet_and_accurate(out_scale, eps):
    """The MLP with its last layer 100 times larger (the size of a trained one's output), or
    at eps 0.3: quiet, the measured rms error under THRESHOLD of the typical value (measured
    0.090 and 0.077) and within 30 % of the guard's floor (0.99 and 1.07)."""
    m = measured(FreshMLP(out_scale), data(128), eps)
    assert m["warning"] is None, m
    assert m["rms"] < THRESHOLD * m["scale"], m
    assert 0.7 * m["rms"] < m["floor"] < 1.3 * m["rms"], m


def test_projection_average_keeps_the_centre_rounding():
    """Why the expectation over projections had the wrong sign: L(x) is evaluated once per
    sample and shared by every projection, so its rounding error e0 enters the batch mean as
    -2 sign d/eps^2 mean_b e0 (sign = -1 for energies) whatever the number of projections.
    With 16 projections the batch-mean error is that term to within 30 %."""
    model, x = FreshMLP(), data(128)
    model64 = in_float64(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDPrecisionWarning)
        got = fd_ssm_loss(model, x, eps=EPS, output="energy", seed=5, n_projections=16)
    exact = fd_ssm_loss(model64, x.double(), eps=EPS, output="energy", seed=5, n_projections=16)
    with torch.no_grad():
        e0 = model(x).double() - model64(x.double())
    centre = 2 * D / EPS**2 * e0.mean().item()  # energies: L = -E, so -2 (-e0) d/eps^2
    error = got.item() - exact.item()
    assert error == pytest.approx(centre, rel=0.3), (error, centre)
    assert abs(error) > 0.5 * abs(exact.item()), (error, exact.item())


class Noisy(nn.Module):
    """Batch norm (train mode) and dropout: the probe must leave both states as they were."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.Softplus(),
                                 nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)[:, 0]


def test_probe_leaves_random_state_and_buffers_unchanged():
    """The same call with and without the probe: the same global random state (dropout draws
    from it) and batch-norm statistics afterwards."""
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    probe = _guard._probe_second_difference
    states, probed = [], []

    def recording_probe(*args):
        probed.append(True)
        return probe(*args)

    for replacement in (recording_probe, lambda *args: None):
        model = Noisy()
        torch.manual_seed(7)
        _calls.clear()
        _guard._probe_second_difference = replacement
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FDPrecisionWarning)
                fd_ssm_loss(model, x, eps=EPS, output="energy", seed=1)
        finally:
            _guard._probe_second_difference = probe
        bn = model.net[1]
        states.append((torch.get_rng_state(), bn.running_mean.clone(), bn.running_var.clone(),
                       bn.num_batches_tracked.item()))
    assert probed == [True]
    (rng1, mean1, var1, n1), (rng2, mean2, var2, n2) = states
    assert torch.equal(rng1, rng2) and torch.equal(mean1, mean2) and torch.equal(var1, var2)
    assert n1 == n2 == 1


def test_probe_runs_once_per_check_and_never_in_float64():
    """float32: one extra gradient-free call on 3B rows at the first check of a call site, none
    on the next checks (they reuse its value); float64: never."""
    rows = []

    class Counting(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.inner = nn.Linear(8, 1).to(dtype)

        def forward(self, x):
            rows.append((x.shape[0], torch.is_grad_enabled()))
            return self.inner(x)[:, 0]

    for dtype, expected in ((torch.float32, [(12, True), (12, False), (12, True)]),
                            (torch.float64, [(12, True), (12, True)])):
        rows.clear()
        _calls.clear()
        model, x = Counting(dtype), torch.randn(4, 8, dtype=dtype)
        for _ in range(2):  # one call site
            fd_ssm_loss(model, x, eps=EPS, output="energy", seed=0)
        assert rows == expected, (dtype, rows)


def test_probe_is_off_in_multi_process_runs(monkeypatch):
    """A DDP or FSDP model's forward is a collective; the probe, whose schedule may differ
    between ranks, does not call it when several processes are running."""
    calls = []

    def model(y):
        calls.append(y.shape[0])
        return (y * y).sum(1)

    x = torch.randn(4, 8)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
    fd_ssm_loss(model, x, eps=EPS, output="energy", seed=0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 1)
    fd_ssm_loss(model, x, eps=EPS, output="energy", seed=0)
    assert calls == [12, 12, 12]


def test_formula_floor_has_the_bias_of_the_squared_difference():
    """Without a probe (float64 here): floor = e d/eps^2 + d e^2/(12 eps^2), e = u mean|L|;
    the second term, the bias of the squared first difference, dominates once e > 12: a
    large output in half precision (a trained conv energy near 1.7e5 under bfloat16 autocast
    gave per-sample errors 10^4 to 10^5 times the values, on the benchmarks page)."""
    seen = []
    report = _guard._report
    _guard._report = lambda numbers, context: seen.append(numbers)
    try:
        for size in (1.0, 1e19):
            out = torch.full((3 * 4,), size, dtype=torch.float64)
            _calls.clear()
            _guard.guard_fd_ssm("fd_ssm_loss", out, torch.ones(4, dtype=torch.float64), True,
                                D, EPS)
    finally:
        _guard._report = report
    u = 2.0**-53
    for (floor, typical), size in zip(seen, (1.0, 1e19)):
        e = u * size
        assert floor == pytest.approx(e * D / EPS**2 + D * e**2 / (12 * EPS**2), rel=1e-5)
        assert typical == 1.0
    assert seen[1][0] > 10 * 1e19 * u * D / EPS**2  # the bias term dominates
