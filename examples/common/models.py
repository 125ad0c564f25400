"""Networks for the examples.

Neither network uses batch statistics (no BatchNorm): finite-difference losses evaluate the
model on a stacked batch [x + v, x - v, ...], and batch statistics would couple the copies.

- :class:`EnergyNet`: the paper's kind of deep energy model. Residual conv blocks with
  softplus activations (smooth, so second differences of the energy are meaningful), no
  normalisation, and a quadratic head ``E(x) = 1/2 ||h(x)||^2``, which keeps the energy
  bounded below and growing at infinity. With ``sigmas`` it is noise-conditional, E(x, i):
  a learned per-level embedding scales and shifts (FiLM) the features after every
  convolution and the hidden layer of the head, and the energy is divided by sigma_i so the
  score -grad_x E scales like 1/sigma_i (the energy version of NCSN's output / sigma).
- :class:`ScoreNet`: a small U-Net score network for noise-conditional training (NCSN).
  Conditioning on the noise level by a learned embedding of the level that scales and
  shifts every GroupNorm (a FiLM / conditional-norm layer), output divided by sigma
  (as in NCSNv2) so the network predicts a unit-scale quantity at every level.

Both networks take the noise level in one of two forms (``condition``, as in
``fdsm_ext.noise_conditional_loss``): ``"label"``, the index i of a fixed ladder (a learned
table, one row per level), or ``"sigma"``, the level sigma itself (a float tensor (B,)),
embedded by :class:`SigmaEmbedding` from log sigma, so any sigma in or between the
trained levels can be used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _n_down(image_size: int, min_size: int) -> int:
    n = 0
    while image_size > min_size and image_size % 2 == 0:
        image_size //= 2
        n += 1
    return n


class SigmaEmbedding(nn.Module):
    """Embedding of a continuous noise level: Fourier features of log sigma, then an MLP.

    ``forward(sigma)`` with sigma (B,) > 0 returns (B, dim): [sin(2 pi f_k log sigma),
    cos(2 pi f_k log sigma)] for fixed frequencies f_k = 2^k / 16 (k < 8: periods from
    16 down to 1/8 in log sigma), followed by Linear-SiLU-Linear.
    """

    def __init__(self, dim: int, n_freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(n_freqs, dtype=torch.float32) / 16)
        self.mlp = nn.Sequential(nn.Linear(2 * n_freqs, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, sigma):
        phase = 2 * math.pi * sigma.to(self.freqs.dtype).log()[:, None] * self.freqs
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=1))


def _level_embedding(condition: str, n_levels: int, dim: int) -> nn.Module:
    if condition == "label":
        return nn.Embedding(n_levels, dim)
    if condition == "sigma":
        return SigmaEmbedding(dim)
    raise ValueError(f"condition must be 'label' or 'sigma', got {condition!r}")


def _sigma_of(condition: str, sigmas, c):
    """The noise level (B,) of the conditioning input c (indices or levels)."""
    return sigmas[c] if condition == "label" else c.to(sigmas.dtype)


class EnergyResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.softplus(x))
        h = self.conv2(F.softplus(h))
        return x + h


class EnergyNet(nn.Module):
    """Convolutional energy network; ``forward(x)`` returns the energy, shape (B,).

    With ``sigmas`` (a decreasing noise ladder) the network is noise-conditional:
    ``forward(x, c)`` returns E(x, sigma) / sigma, with ``c`` a LongTensor (B,) of indices
    into ``sigmas`` (``condition="label"``) or the noise levels sigma themselves, a float
    tensor (B,) (``condition="sigma"``). Without ``sigmas`` the network (and its
    initialisation) is the unconditional one.
    """

    def __init__(self, in_ch: int = 1, image_size: int = 8, ch: int = 32, head_dim: int = 128,
                 sigmas=None, condition: str = "label"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_ch, ch, 3, padding=1), EnergyResBlock(ch)]
        size, c = image_size, ch
        widths = [ch]
        for _ in range(_n_down(image_size, 7 if image_size > 16 else 4)):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), EnergyResBlock(2 * c)]
            size, c = size // 2, 2 * c
            widths.append(c)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * size * size, head_dim)
        self.head = nn.Linear(head_dim, head_dim)
        # Local quadratic term on the full-resolution features (sum of squares per pixel).
        self.local = nn.Conv2d(ch, 8, 1)
        self.register_buffer(
            "sigmas", None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float32))
        self.condition = condition
        if sigmas is not None:
            self.film_sizes = [*widths, head_dim]
            # Per-level (scale, shift) for every stage; zero init = the same network at
            # every level at the start, the levels then differentiate smoothly.
            self.film = _level_embedding(condition, len(sigmas), 2 * sum(self.film_sizes))
            last = self.film if condition == "label" else self.film.mlp[-1]
            nn.init.zeros_(last.weight)
            if condition == "sigma":
                nn.init.zeros_(last.bias)

    def forward(self, x, cond=None):
        if self.sigmas is None:
            if cond is not None:
                raise ValueError("a noise level given to an unconditional EnergyNet (no sigmas)")
            h0 = self.features[:2](x)
            h = F.softplus(self.features[2:](h0)).flatten(1)
            h = self.head(F.softplus(self.fc(h)))
        else:
            if cond is None:
                raise ValueError("a noise-conditional EnergyNet needs its noise level input")
            films = self.film(cond).split([2 * n for n in self.film_sizes], dim=1)

            def mod(h, k):
                scale, shift = films[k].chunk(2, dim=1)
                if h.dim() == 4:
                    scale, shift = scale[:, :, None, None], shift[:, :, None, None]
                return h * (1 + scale) + shift

            h = x
            for k, layer in enumerate(self.features):
                h = layer(h)
                if k % 2 == 0:  # after each convolution (the blocks' input)
                    h = mod(h, k // 2)
                if k == 1:
                    h0 = h
            h = F.softplus(h).flatten(1)
            h = self.head(F.softplus(mod(self.fc(h), len(self.film_sizes) - 1)))
        loc = self.local(F.softplus(h0)).flatten(1)
        energy = 0.5 * h.pow(2).sum(dim=1) + 0.5 * loc.pow(2).sum(dim=1)
        if self.sigmas is not None:
            energy = energy / _sigma_of(self.condition, self.sigmas, cond)
        return energy



def seeded_energy_net(seed: int, image_size: int, *, ch: int, head_dim: int,
                      device: str | torch.device = "cpu") -> EnergyNet:
    """The unconditional one-channel EnergyNet of the deep-EBM benchmark and learning
    curves, initialised after ``torch.manual_seed(seed)`` (same seed: same network)."""
    torch.manual_seed(seed)
    return EnergyNet(1, image_size, ch=ch, head_dim=head_dim).to(device)


class CondResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(math.gcd(8, in_ch), in_ch, affine=False)
        self.film1 = nn.Linear(emb_dim, 2 * in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(math.gcd(8, out_ch), out_ch, affine=False)
        self.film2 = nn.Linear(emb_dim, 2 * out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    @staticmethod
    def _film(h, norm, film, emb):
        scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)
        return F.silu(norm(h) * (1 + scale) + shift)

    def forward(self, x, emb):
        h = self.conv1(self._film(x, self.norm1, self.film1, emb))
        h = self.conv2(self._film(h, self.norm2, self.film2, emb))
        return self.skip(x) + h


class ScoreNet(nn.Module):
    """Noise-conditional score network; ``forward(x, c)`` -> score, shape of x.

    ``c`` is a LongTensor (B,) of indices into ``sigmas`` (``condition="label"``) or the
    noise levels themselves, a float tensor (B,) (``condition="sigma"``).
    """

    def __init__(self, sigmas, in_ch: int = 1, ch: int = 32, emb_dim: int = 64,
                 mult=(1, 2, 2), condition: str = "label"):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))
        self.condition = condition
        self.embed = _level_embedding(condition, len(sigmas), emb_dim)
        chs = [ch * m for m in mult]
        self.conv_in = nn.Conv2d(in_ch, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = chs[0]
        for i, co in enumerate(chs):
            self.down_blocks.append(CondResBlock(c, co, emb_dim))
            c = co
            if i < len(chs) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = CondResBlock(c, c, emb_dim)
        self.up_blocks = nn.ModuleList()
        for co in reversed(chs):
            self.up_blocks.append(CondResBlock(c + co, co, emb_dim))
            c = co
        self.norm_out = nn.GroupNorm(math.gcd(8, c), c)
        self.conv_out = nn.Conv2d(c, in_ch, 3, padding=1)

    def forward(self, x, cond):
        emb = self.embed(cond)
        h = self.conv_in(x)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for block in self.up_blocks:
            skip = skips.pop()
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        sigma = _sigma_of(self.condition, self.sigmas, cond)
        return out / sigma.to(out.dtype).view(-1, *([1] * (x.dim() - 1)))
