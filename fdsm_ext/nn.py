"""``torch.nn.Module`` forms of the losses, like ``torch.nn`` beside ``torch.nn.functional``.

Each module stores keyword options of its function and calls it; there is no second
implementation. ``loss_fn(model, x, *model_args, **kwargs)`` passes per-call keyword
arguments through (they override the stored options)::

    loss_fn = fdsm_ext.nn.FDSSMLoss(eps=0.1, output="energy")
    loss = loss_fn(energy, x)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .baselines import dsm_loss, exact_sm_loss, ssm_loss
from .losses import fd_dsm_loss, fd_ssm_loss
from .noise_conditional import noise_conditional_loss

__all__ = [
    "DSMLoss",
    "ExactSMLoss",
    "FDDSMLoss",
    "FDSSMLoss",
    "NoiseConditionalLoss",
    "SSMLoss",
]


class _FunctionalLoss(nn.Module):
    """Stores keyword options of ``function`` (checked by name) and calls it in forward."""

    function: Callable[..., Tensor]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        params = inspect.signature(type(self).function).parameters
        keywords = [n for n, p in params.items() if p.default is not inspect.Parameter.empty]
        unknown = sorted(set(options) - set(keywords))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {', '.join(unknown)}; "
                f"{type(self).function.__name__} accepts {', '.join(keywords)}"
            )
        self.options = options

    def forward(self, model: Callable[..., Tensor], x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """The loss of ``model`` on ``x``; ``kwargs`` override the stored options."""
        return type(self).function(model, x, *args, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FDSSMLoss(_FunctionalLoss):
    """:func:`fdsm_ext.fd_ssm_loss` as a module: ``FDSSMLoss(eps=0.1, output="energy")``;
    call ``loss_fn(model, x, *model_args)``."""

    function = staticmethod(fd_ssm_loss)


class FDDSMLoss(_FunctionalLoss):
    """:func:`fdsm_ext.fd_dsm_loss` as a module; call ``loss_fn(model, x, sigma, *model_args)``."""

    function = staticmethod(fd_dsm_loss)


class SSMLoss(_FunctionalLoss):
    """:func:`fdsm_ext.ssm_loss` as a module; call ``loss_fn(model, x, *model_args)``."""

    function = staticmethod(ssm_loss)


class DSMLoss(_FunctionalLoss):
    """:func:`fdsm_ext.dsm_loss` as a module; call ``loss_fn(model, x, sigma, *model_args)``."""

    function = staticmethod(dsm_loss)


class ExactSMLoss(_FunctionalLoss):
    """:func:`fdsm_ext.exact_sm_loss` as a module; call ``loss_fn(model, x, *model_args)``."""

    function = staticmethod(exact_sm_loss)


class NoiseConditionalLoss(_FunctionalLoss):
    """:func:`fdsm_ext.noise_conditional_loss` as a module; the noise levels are a buffer
    (they follow ``.to(device)``). ``NoiseConditionalLoss(sigmas, method="fd_ssm", **opts)``;
    call ``loss_fn(model, x)``."""

    function = staticmethod(noise_conditional_loss)

    def __init__(self, sigmas: Sequence[float] | Tensor, **options: Any) -> None:
        super().__init__(**options)
        self.register_buffer("sigmas", torch.as_tensor(sigmas).detach().clone().reshape(-1))

    def forward(self, model: Callable[..., Tensor], x: Tensor, **kwargs: Any) -> Tensor:
        """The loss of ``model`` on ``x`` over the stored noise levels; ``kwargs`` override
        the stored options."""
        return noise_conditional_loss(model, x, self.sigmas, **{**self.options, **kwargs})
