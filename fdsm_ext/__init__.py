"""fdsm_ext: finite-difference score matching with fused C++/CUDA kernels (Pang et al. 2020)."""

from importlib import metadata as _metadata

from . import nn
from ._ops import has_cuda_kernels
from .baselines import dsm_loss, exact_sm_loss, ssm_loss
from .losses import fd_directional_derivative, fd_dsm_loss, fd_ssm_loss
from .noise_conditional import geometric_sigmas, noise_conditional_loss
from .precision import (
    EpsSuggestion,
    FDPrecisionWarning,
    suggest_eps,
    suggest_step,
    unit_roundoff,
)
from .sampling import annealed_langevin_dynamics, langevin_dynamics
from .stencil import Stencil, fd_stencil

__version__ = _metadata.version("fdsm-ext")
del _metadata

__all__ = [
    "EpsSuggestion",
    "FDPrecisionWarning",
    "Stencil",
    "annealed_langevin_dynamics",
    "dsm_loss",
    "exact_sm_loss",
    "fd_directional_derivative",
    "fd_dsm_loss",
    "fd_ssm_loss",
    "fd_stencil",
    "geometric_sigmas",
    "has_cuda_kernels",
    "langevin_dynamics",
    "nn",
    "noise_conditional_loss",
    "ssm_loss",
    "suggest_eps",
    "suggest_step",
    "unit_roundoff",
]
