"""A small ViT-style energy network for the image examples (``train_ebm --arch vit``).

The image is cut into p x p patches (the side must be divisible by p), each patch is mapped
linearly to a ``dim``-vector, a learned position embedding is added, and ``depth`` pre-norm
transformer blocks follow::

    h <- h + Attn(LN(h)),   Attn = softmax(Q K^T / sqrt(d_head)) V  (F.scaled_dot_product_attention)
    h <- h + MLP(LN(h)),    MLP  = Linear - GELU - Linear

GELU, LayerNorm and softmax are smooth, so second differences of the energy are meaningful
(the finite-difference losses need that, as autograd score matching needs second
derivatives). The energy head is quadratic, as in :class:`examples.common.models.EnergyNet`:
with ``u = W_2 GELU(W_1 mean_tokens(LN(h)))``, E(x) = 1/2 ||u||^2 >= 0, shape (B,).

With ``sigmas`` the network is noise-conditional, E(x, c) / sigma: the level (an index into
``sigmas``, ``condition="label"``, or the level sigma itself, ``condition="sigma"``) is
embedded and added to every token, and the energy is divided by sigma so that the score
-grad_x E scales like 1/sigma (the convention of ``EnergyNet``).

Attention backend. ``F.scaled_dot_product_attention`` dispatches to a fused kernel (on CPU
and CUDA by default the flash kernel) whose backward has no derivative of its own: autograd
score matching (SSM, DSM on an energy, exact SM), which differentiates the input gradient
again (double backward), fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The
finite-difference losses need only forwards and one ordinary backward, so they train with
the flash kernel. ``attention="math"`` pins the unfused reference implementation
(``torch.nn.attention.SDPBackend.MATH``), which is twice differentiable.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .models import _level_embedding, _sigma_of

ATTENTION_BACKENDS = ("flash", "math")
_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention_context(attention: str) -> contextlib.AbstractContextManager:
    """``sdpa_kernel`` pinned to the backend named ``attention`` ("flash" or "math")."""
    if attention not in _BACKENDS:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
    return sdpa_kernel([_BACKENDS[attention]])


class Block(nn.Module):
    """Pre-norm transformer block: h + Attn(LN h), then h + MLP(LN h)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, dim = h.shape
        q, k, v = (self.qkv(self.norm1(h)).view(b, n, 3, self.heads, dim // self.heads)
                   .permute(2, 0, 3, 1, 4))
        a = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d_head)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, dim))
        return h + self.mlp(self.norm2(h))


class ViTEnergy(nn.Module):
    """ViT energy network; ``forward(x)`` (or ``forward(x, c)`` with ``sigmas``) -> (B,).

    ``attention`` ("flash" or "math") pins the scaled-dot-product-attention backend for
    every call of the network (:func:`attention_context`); None leaves torch's choice (or an
    enclosing ``sdpa_kernel``) in force.
    """

    def __init__(self, in_ch: int = 1, image_size: int = 28, patch: int = 7, dim: int = 64,
                 depth: int = 3, heads: int = 4, mlp_ratio: int = 2, head_dim: int = 64,
                 sigmas=None, condition: str = "label", attention: str | None = "flash"):
        super().__init__()
        for name, v in (("in_ch", in_ch), ("image_size", image_size), ("patch", patch),
                        ("dim", dim), ("depth", depth), ("heads", heads),
                        ("mlp_ratio", mlp_ratio), ("head_dim", head_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ViTEnergy: {name} must be a positive integer, got {v!r}")
        if image_size % patch:
            raise ValueError(f"ViTEnergy: image_size {image_size} must be divisible by the "
                             f"patch size {patch}")
        if dim % heads:
            raise ValueError(f"ViTEnergy: dim {dim} must be divisible by heads {heads}")
        if attention is not None and attention not in _BACKENDS:
            raise ValueError(f"ViTEnergy: attention must be one of {ATTENTION_BACKENDS} or "
                             f"None, got {attention!r}")
        self.attention = attention
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)  # linear per patch
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, head_dim)
        self.head = nn.Linear(head_dim, head_dim)
        self.register_buffer(
            "sigmas", None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32))
        self.condition = condition
        if sigmas is not None:
            self.embed = _level_embedding(condition, len(sigmas), dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if (self.sigmas is None) != (cond is None):
            raise ValueError("ViTEnergy: pass a noise level c exactly when the network was "
                             "built with sigmas (noise-conditional)")
        ctx = (contextlib.nullcontext() if self.attention is None
               else attention_context(self.attention))
        with ctx:
            h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, tokens, dim)
            if cond is not None:
                h = h + self.embed(cond)[:, None, :].to(h.dtype)
            for block in self.blocks:
                h = block(h)
        u = self.head(F.gelu(self.fc(self.norm(h).mean(dim=1))))
        energy = 0.5 * u.pow(2).sum(dim=1)
        if cond is not None:
            energy = energy / _sigma_of(self.condition, self.sigmas, cond).to(energy.dtype)
        return energy
