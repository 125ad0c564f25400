"""Score-matching losses of an unconditional energy network E(x) (``output="energy"``), by
method name: the deep-EBM learning curves and benchmark train with these."""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
ENERGY_METHODS = ("dsm", "fd_dsm", "fd_dsm_residual", "ssm", "ssm_vr", "fd_ssm")


def energy_loss(method: str, sigma: float, eps: float) -> LossFn:
    """``loss(model, x)`` of ``method`` (one of :data:`ENERGY_METHODS`): DSM at noise
    ``sigma``, FD steps of norm ``eps``; fd_dsm along random directions, fd_dsm_residual
    along the DSM residual. Random numbers come from torch's global generator."""
    import fdsm_ext

    e = {"output": "energy"}
    return {
        "dsm": lambda m, x: fdsm_ext.dsm_loss(m, x, sigma, **e),
        "fd_dsm": lambda m, x: fdsm_ext.fd_dsm_loss(m, x, sigma, eps=eps, direction="random",
                                                    **e),
        "fd_dsm_residual": lambda m, x: fdsm_ext.fd_dsm_loss(m, x, sigma, eps=eps,
                                                             direction="residual", **e),
        "ssm": lambda m, x: fdsm_ext.ssm_loss(m, x, **e),
        "ssm_vr": lambda m, x: fdsm_ext.ssm_loss(m, x, variance_reduction=True, **e),
        "fd_ssm": lambda m, x: fdsm_ext.fd_ssm_loss(m, x, eps=eps, **e),
    }[method]
