"""What users expect of a torch library: nn.Module forms, py.typed, a clean namespace, errors
that name the function, and output="auto" that never guesses a sign."""

import ast
import importlib
import importlib.resources
import pkgutil
import re
import types
from pathlib import Path

import pytest
import torch
from helpers import MLP, QuadraticLogDensity

import fdsm_ext
from fdsm_ext import (
    annealed_langevin_dynamics,
    dsm_loss,
    exact_sm_loss,
    fd_directional_derivative,
    fd_dsm_loss,
    fd_ssm_loss,
    fd_stencil,
    geometric_sigmas,
    langevin_dynamics,
    noise_conditional_loss,
    ssm_loss,
)
from fdsm_ext import nn as fnn

X = torch.randn(4, 3)


def energy(y, *args):
    return 0.5 * (y * y).sum(1)


def score(y, *args):
    return -y


# --- nn.Module forms ---------------------------------------------------------------------


def gen():
    return torch.Generator().manual_seed(3)


@pytest.mark.parametrize(
    "module, function, args, options",
    [
        (fnn.FDSSMLoss, fd_ssm_loss, (), {"eps": 0.2, "output": "log_density",
                                          "n_projections": 2}),
        (fnn.FDDSMLoss, fd_dsm_loss, (0.3,), {"eps": 0.2, "output": "log_density"}),
        (fnn.SSMLoss, ssm_loss, (), {"output": "log_density", "variance_reduction": True}),
        (fnn.DSMLoss, dsm_loss, (0.3,), {"output": "log_density"}),
        (fnn.ExactSMLoss, exact_sm_loss, (), {"output": "log_density"}),
    ],
)
def test_module_forms_equal_their_functions(module, function, args, options):
    model, x = MLP(3), torch.randn(5, 3, dtype=torch.float64)

    def seeded():
        return {} if function is exact_sm_loss else {"generator": gen()}

    loss_fn = module(**options)
    assert isinstance(loss_fn, torch.nn.Module)
    assert all(f"{k}={v!r}" in repr(loss_fn) for k, v in options.items())
    torch.testing.assert_close(loss_fn(model, x, *args, **seeded()),
                               function(model, x, *args, **options, **seeded()))
    # Per-call keyword arguments pass through and override the stored options.
    per_sample = loss_fn(model, x, *args, reduction="none", **seeded())
    assert per_sample.shape == (5,)
    torch.testing.assert_close(
        per_sample, function(model, x, *args, **{**options, "reduction": "none"}, **seeded())
    )


def test_module_form_rejects_unknown_options():
    with pytest.raises(TypeError, match="FDSSMLoss: unknown option.*epsilon.*accepts.*eps"):
        fnn.FDSSMLoss(epsilon=0.1)


def test_noise_conditional_module_keeps_sigmas_as_a_buffer():
    sigmas = geometric_sigmas(1.0, 0.1, 4)
    loss_fn = fnn.NoiseConditionalLoss(sigmas, method="dsm", output="score")
    assert "sigmas" in dict(loss_fn.named_buffers())
    x, labels = torch.randn(6, 2), torch.tensor([0, 1, 2, 3, 0, 1])

    def model(y, lab):
        return -y / (1 + loss_fn.sigmas[lab, None] ** 2)

    torch.testing.assert_close(
        loss_fn(model, x, labels=labels, generator=gen()),
        noise_conditional_loss(model, x, sigmas, method="dsm", output="score", labels=labels,
                               generator=gen()),
    )
    assert loss_fn.double().sigmas.dtype == torch.float64


# --- packaging and namespace ---------------------------------------------------------------


def test_py_typed_is_in_the_package_and_shipped():
    assert importlib.resources.files("fdsm_ext").joinpath("py.typed").is_file()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'wheel.packages = ["fdsm_ext"]' in pyproject  # the whole folder goes in the wheel


def test_namespace_has_only_the_public_api_and_submodules():
    names = [n for n in dir(fdsm_ext) if not n.startswith("__")]
    stray = [n for n in names if n not in fdsm_ext.__all__
             and not isinstance(getattr(fdsm_ext, n), types.ModuleType)]
    assert stray == []
    assert "version" not in names and isinstance(fdsm_ext.__version__, str)
    assert all(hasattr(fdsm_ext, n) for n in fdsm_ext.__all__)


ROOT = Path(__file__).parents[1]


def _public_submodules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(fdsm_ext.__path__)
                  if not m.name.startswith("_"))


def test_every_public_submodule_declares_its_api_and_is_in_the_reference():
    """Modules without a leading underscore are public: each lists its names in __all__
    and has a section in docs/api.rst."""
    api = (ROOT / "docs" / "api.rst").read_text()
    assert _public_submodules()
    for name in _public_submodules():
        module = importlib.import_module(f"fdsm_ext.{name}")
        assert isinstance(module.__all__, list), name
        assert all(hasattr(module, n) for n in module.__all__), name
        assert f".. automodule:: fdsm_ext.{name}" in api, name
        # Names defined here and re-exported at the top level are documented there, once.
        for n in module.__all__:
            if n in fdsm_ext.__all__:
                assert getattr(fdsm_ext, n) is getattr(module, n), (name, n)


def test_the_test_only_philox_directions_is_not_public():
    """The Philox replay is a test oracle: private in fdsm_ext.reference, absent from the
    package namespace, the ops wrappers and the API reference."""
    from fdsm_ext import _ops, reference

    for module in (fdsm_ext, reference, _ops):
        assert "philox_directions" not in dir(module)
        assert "philox_directions" not in getattr(module, "__all__", ())
    assert callable(reference._philox_directions)
    assert "philox" not in (ROOT / "docs" / "api.rst").read_text()


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_losses_and_the_precision_guard_do_not_import_each_other_in_a_circle():
    """precision.suggest_eps calls the losses; the losses use the guard in the private
    fdsm_ext._guard, which imports neither, and precision re-exports its public names."""
    from fdsm_ext import _guard, precision

    package = ROOT / "fdsm_ext"
    assert "precision" not in _imported_modules(package / "losses.py")
    assert not _imported_modules(package / "_guard.py") & {"losses", "precision"}
    assert precision.FDPrecisionWarning is _guard.FDPrecisionWarning is fdsm_ext.FDPrecisionWarning
    assert precision.FDPrecisionWarning.__module__ == "fdsm_ext.precision"
    assert precision.unit_roundoff is _guard.unit_roundoff
    assert precision._calls is _guard._calls  # the tests' per-call-site reset reaches the guard


# --- errors name the function ------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fd_ssm_loss(energy, X, eps=0.0), ValueError, "fd_ssm_loss: eps must be"),
        (lambda: fd_ssm_loss(energy, X, noise="x"), ValueError, "fd_ssm_loss: noise must be"),
        (lambda: fd_ssm_loss(energy, X, n_projections=0), ValueError,
         "fd_ssm_loss: n_projections must be"),
        (lambda: fd_ssm_loss(energy, X, output="x"), ValueError, "fd_ssm_loss: output must be"),
        (lambda: fd_dsm_loss(energy, X, -1.0), ValueError, "fd_dsm_loss: sigma must be"),
        (lambda: fd_dsm_loss(energy, X, 0.1, eps="a"), TypeError, "fd_dsm_loss: eps must be"),
        (lambda: ssm_loss(energy, X, reduction="max"), ValueError,
         "ssm_loss: reduction must be"),
        (lambda: exact_sm_loss(energy, X, chunk_size=0), ValueError,
         "exact_sm_loss: chunk_size must be"),
        (lambda: dsm_loss(score, X, 0.0), ValueError, "dsm_loss: sigma must be"),
        (lambda: noise_conditional_loss(score, X, [1.0, -1.0]), ValueError,
         "noise_conditional_loss: sigmas must be"),
        (lambda: noise_conditional_loss(score, X, [1.0], method="x"), ValueError,
         "noise_conditional_loss: method must be"),
        (lambda: geometric_sigmas(0.0), ValueError, "geometric_sigmas: sigma_max must be"),
        (lambda: geometric_sigmas(n_levels=0), ValueError, "geometric_sigmas: n_levels must be"),
        (lambda: langevin_dynamics(score, X, -1, 0.1), ValueError,
         "langevin_dynamics: n_steps must be"),
        (lambda: annealed_langevin_dynamics(score, X, [1.0], step_lr=0.0), ValueError,
         "annealed_langevin_dynamics: step_lr must be"),
        (lambda: fd_directional_derivative(energy, X, X, order=0), ValueError,
         "fd_directional_derivative: order must be"),
        (lambda: fd_stencil(2, accuracy=3), ValueError, "fd_stencil: accuracy must be"),
    ],
)
def test_every_error_starts_with_the_function_name(call, error, match):
    with pytest.raises(error, match="^" + match):
        call()


@pytest.mark.parametrize(
    "call, fn",
    [
        (lambda g: fd_ssm_loss(energy, X, output="energy", generator=g), "fd_ssm_loss"),
        (lambda g: fd_dsm_loss(energy, X, 0.1, output="energy", generator=g), "fd_dsm_loss"),
        (lambda g: ssm_loss(score, X, generator=g), "ssm_loss"),
        (lambda g: dsm_loss(score, X, 0.1, generator=g), "dsm_loss"),
        (lambda g: noise_conditional_loss(score, X, [1.0], generator=g),
         "noise_conditional_loss"),
        (lambda g: langevin_dynamics(score, X, 1, 0.1, generator=g), "langevin_dynamics"),
        (lambda g: annealed_langevin_dynamics(score, X, [1.0], generator=g),
         "annealed_langevin_dynamics"),
    ],
)
def test_a_seed_instead_of_a_generator_is_a_clear_type_error(call, fn):
    with pytest.raises(TypeError, match=f"^{fn}: generator must be a torch.Generator or None, "
                                        "got int 0 .*manual_seed"):
        call(0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: fd_ssm_loss(m, x, output="energy"),
         "returned 191 rows (shape (191,)) for 192 input rows = 3 stacked copies x batch 64"),
        (lambda m, x: fd_ssm_loss(m, x, output="energy", n_projections=2),
         "returned 319 rows (shape (319,)) for 320 input rows = 5 stacked copies x batch 64"),
        (lambda m, x: fd_dsm_loss(m, x, 0.1, output="energy", direction="random"),
         "returned 127 rows (shape (127,)) for 128 input rows = 2 stacked copies x batch 64"),
        (lambda m, x: fd_dsm_loss(m, x, 0.1, output="energy"),
         "returned 63 rows (shape (63,)) for 64 input rows"),
    ],
)
def test_shape_errors_explain_the_row_count(call, match):
    def drops_a_row(y):
        return energy(y)[:-1]

    with pytest.raises(ValueError, match=re.escape(match)):
        call(drops_a_row, torch.randn(64, 3))


@pytest.mark.parametrize("dtype, u", [(torch.bfloat16, "0.0039"), (torch.float16, "0.00049")])
def test_half_precision_x_refusal_quotes_its_own_dtype(dtype, u):
    with pytest.raises(TypeError, match=rf"x has dtype {dtype}.*u = {u}\b"):
        fd_ssm_loss(energy, X.to(dtype), output="energy")


# --- output="auto" -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: fd_ssm_loss(m, x),
        lambda m, x: fd_dsm_loss(m, x, 0.1),
        lambda m, x: ssm_loss(m, x),
        lambda m, x: dsm_loss(m, x, 0.1),
        lambda m, x: exact_sm_loss(m, x),
        lambda m, x: langevin_dynamics(m, x, 1, 0.01),
        lambda m, x: annealed_langevin_dynamics(lambda y, lab: m(y), x, [1.0]),
        lambda m, x: noise_conditional_loss(lambda y, lab: m(y), x, [1.0]),
    ],
)
def test_auto_refuses_scalar_models_everywhere(call):
    """An energy read as a log-density flips every sign: "auto" must not guess."""
    with pytest.raises(ValueError, match="output='auto' does not guess: pass output='energy'"):
        call(energy, X)


def test_auto_refuses_the_one_dimensional_ambiguity():
    """d = 1 with a (B, 1) output: a score or a scalar? Both readings are named."""
    x = torch.randn(6, 1)
    with pytest.raises(ValueError, match="output='energy'.*output='log_density'.*output='score'"):
        fd_ssm_loss(lambda y: -y, x)
    quad = QuadraticLogDensity(1)
    x64 = x.double()
    torch.testing.assert_close(
        fd_ssm_loss(quad.score, x64, output="score", reduction="none"), quad.exact_sm(x64))
    torch.testing.assert_close(
        fd_ssm_loss(lambda y: quad(y)[:, None], x64, output="log_density", reduction="none"),
        quad.exact_sm(x64))


def test_auto_accepts_score_models_and_evaluates_two_blocks():
    rows = []

    def model(y):
        rows.append(y.shape[0])
        return score(y)

    auto = fd_ssm_loss(model, X, generator=gen())
    declared = fd_ssm_loss(model, X, output="score", generator=gen())
    assert torch.equal(auto, declared) and rows == [8, 8]
