"""fdsm_ext: finite-difference score matching with fused C++/CUDA kernels (Pang et al. 2020)."""

from importlib.metadata import version

from ._ops import has_cuda_kernels
from .baselines import dsm_loss, exact_sm_loss, ssm_loss
from .losses import fd_directional_derivative, fd_dsm_loss, fd_ssm_loss
from .noise_conditional import geometric_sigmas, noise_conditional_loss
from .sampling import annealed_langevin_dynamics, langevin_dynamics
from .stencil import Stencil, fd_stencil

__version__ = version("fdsm-ext")

__all__ = [
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
    "noise_conditional_loss",
    "ssm_loss",
]
