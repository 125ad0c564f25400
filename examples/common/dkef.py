"""The deep kernel exponential family (DKEF) of ``examples.dkef_uci``: the model, the
closed-form fit of its coefficients alpha under every score-matching method, the methods'
losses (fdsm_ext) and log Z by importance sampling.

    log p(x) = log q0(x) + sum_m alpha_m sum_j w_j k_j(x, z_m) - log Z,   q0 = N(0, 4 I),
    k_j(x, z) = exp(-||phi_j(x) - phi_j(z)||^2 / (2 * 10^s_j)),

Gaussian kernels on the features phi_j of softplus MLPs (linear skip), trainable inducing
points z, w = softmax(weights). Every method's objective is quadratic in alpha,

    J(alpha) = mean_n [ 1/2 ||A_n^T alpha + c_n||^2 + e_n^T alpha ] + lambda/2 ||alpha||^2
    alpha    = -(G + lambda I)^{-1} b,   G = mean A_n A_n^T,  b = mean (A_n c_n + e_n),

(:func:`quadratic_terms` gives A, c, e); the finite-difference methods form them from
function values only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import jvp

Q0_STD = 2.0


# ----------------------------------------------------------------------------- model
class FeatureNet(nn.Module):
    """phi(x) = W3 softplus(W2 softplus(W1 x + b1) + b2) + b3 + S x  (S: skip, no bias)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, width), nn.Softplus(), nn.Linear(width, width),
                                 nn.Softplus(), nn.Linear(width, width))
        self.skip = nn.Linear(d, width, bias=False)
        for m in self.modules():  # the authors' init: N(0, 1/fan_out) weights and biases
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.weight.shape[0] ** -0.5)
                if m.bias is not None:
                    nn.init.normal_(m.bias, std=m.bias.shape[0] ** -0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + self.skip(x)


class DKEF(nn.Module):
    """log p~(x) = log q0(x) + f(x)^T alpha, f_m(x) = sum_j w_j k_j(x, z_m) (see module doc)."""

    def __init__(self, init_z: Tensor, n_kernels: int = 3, width: int = 30,
                 log_bandwidths: tuple[float, ...] = (0.0, 0.5185, 1.0)):
        super().__init__()
        d = init_z.shape[1]
        self.nets = nn.ModuleList(FeatureNet(d, width) for _ in range(n_kernels))
        self.log_bandwidth = nn.Parameter(torch.tensor(log_bandwidths[:n_kernels]))
        self.kernel_logits = nn.Parameter(torch.zeros(n_kernels))
        self.z = nn.Parameter(init_z.clone())
        self.log_lambda = nn.Parameter(torch.tensor(-2.0))  # log10 of the ridge weight
        self.register_buffer("alpha", torch.zeros(len(init_z)))

    def features(self, x: Tensor) -> Tensor:
        """f(x), shape (n, M)."""
        weights = torch.softmax(self.kernel_logits, 0)
        out = 0.0
        for net, log_bw, w in zip(self.nets, self.log_bandwidth, weights):
            px, pz = net(x), net(self.z)
            # ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b: one matrix product, no (n, M, width)
            # tensor. Its float32 rounding (~1e-7 |phi|^2) stays far below the eps = 0.1
            # second differences of the finite-difference losses.
            sq = px.pow(2).sum(1, keepdim=True) + pz.pow(2).sum(1) - 2 * px @ pz.T
            out = out + w * torch.exp(-sq.clamp_min(0) / (2 * 10.0**log_bw))
        return out

    @staticmethod
    def log_q0(x: Tensor) -> Tensor:
        return -0.5 * x.pow(2).sum(1) / Q0_STD**2

    def log_density(self, x: Tensor, alpha: Tensor | None = None) -> Tensor:
        """Unnormalised log-density, shape (n,); ``alpha`` defaults to the stored one."""
        return self.log_q0(x) + self.features(x) @ (self.alpha if alpha is None else alpha)


# ----------------------------------------------------------------------------- closed-form alpha
def _jet(f, x: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(u^T grad f, u^T Hess f u) per row of x, for every output of f: two nested jvps."""
    (_, fu), (_, fuu) = jvp(lambda y: jvp(f, (y,), (u,)), (x,), (u,))
    return fu, fuu


def _basis_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """x repeated d times (block i = x) and the unit vectors e_i (block i = e_i), (d n, d)."""
    n, d = x.shape
    return x.repeat(d, 1), torch.eye(d, dtype=x.dtype).repeat_interleave(n, 0)


def _jacobian(f, x: Tensor) -> tuple[Tensor, Tensor]:
    """(J, laplacian): J (n, M, d) = df/dx, laplacian (n, M) = sum_i d^2 f / dx_i^2.

    All d directions in one nested jvp on the stacked batch of d n rows.
    """
    n, d = x.shape
    fu, fuu = _jet(f, *_basis_batch(x))
    return fu.reshape(d, n, -1).permute(1, 2, 0), fuu.reshape(d, n, -1).sum(0)


def _jacobian_first(f, x: Tensor) -> Tensor:
    """J (n, M, d) by one forward-mode pass on the stacked batch (no second derivatives)."""
    n, d = x.shape
    fu = jvp(f, *((t,) for t in _basis_batch(x)))[1]
    return fu.reshape(d, n, -1).permute(1, 2, 0)


def sphere(x: Tensor, eps: float, g: torch.Generator) -> Tensor:
    v = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return eps * v / v.norm(dim=1, keepdim=True)


def orthogonal_directions(n: int, d: int, k: int, eps: float, g: torch.Generator,
                          dtype: torch.dtype) -> Tensor:
    """(k n, d): for each of n samples, k orthogonal directions of norm eps, uniformly
    rotated (Haar); row block j holds direction j of every sample."""
    q, r = torch.linalg.qr(torch.randn(n, d, k, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2))[:, None, :]
    return eps * q.permute(2, 0, 1).reshape(k * n, d)


def quadratic_terms(method: str, model: DKEF, x: Tensor, g: torch.Generator, *,
                    eps: float, sigma: float, directions: int = 1,
                    noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(A, c, e) with the method's loss = mean_n 1/2 ||A_n^T alpha + c_n||^2 + e_n^T alpha + C.

    A: (n, M, k), c: (n, k), e: (n, M). With s = d/eps^2 and D1 h = h(x+v) - h(x-v),
    D2 h = h(x+v) + h(x-v) - 2 h(x) (q0 = log q0, f = features):
      exact   A = J_f,            c = grad q0,                 e = lap f
      ssm     A = J_f u,          c = u^T grad q0,             e = u^T H_f u   (u Rademacher)
      ssm_vr  A = J_f,            c = grad q0,                 e = u^T H_f u
      dsm     A = J_f(x~),        c = grad q0(x~) + z/sigma,   e = 0           (x~ = x + sigma z)
      fd_ssm  A = sqrt(s)/2 D1 f, c = sqrt(s)/2 D1 q0,         e = s D2 f      (||v|| = eps)
      fd_dsm  A = sqrt(s)/2 D1 f, c = sqrt(s) (D1 q0/2 + v^T z/sigma), e = 0  (at x~)
    ``directions`` > 1 (FD methods): that many orthogonal directions per sample, one row each
    (the mean over rows then averages over directions; d directions make the sliced
    estimate of the Jacobian terms exact up to O(eps^2)). ``noise``: the z of dsm or the
    u of ssm / ssm_vr (n, d) to use instead of drawing them from ``g``.
    """
    n, d = x.shape
    f = model.features
    zeros = torch.zeros(n, model.z.shape[0], dtype=x.dtype)
    if method in ("dsm", "fd_dsm"):
        z = torch.randn(x.shape, generator=g, dtype=x.dtype) if noise is None else noise
        x = x + sigma * z
    grad_q0 = -x / Q0_STD**2
    if method == "exact":
        jac, lap = _jacobian(f, x)
        return jac, grad_q0, lap
    if method in ("ssm", "ssm_vr"):
        u = torch.randn(x.shape, generator=g, dtype=x.dtype).sign() if noise is None else noise
        fu, fuu = _jet(f, x, u)
        if method == "ssm":
            return fu[:, :, None], (u * grad_q0).sum(1, keepdim=True), fuu
        return _jacobian_first(f, x), grad_q0, fuu
    if method == "dsm":
        return _jacobian_first(f, x), grad_q0 + z / sigma, zeros
    if directions > 1:
        v = orthogonal_directions(n, d, directions, eps, g, x.dtype)
        x = x.repeat(directions, 1)
        if method == "fd_dsm":
            z = z.repeat(directions, 1)
        n = x.shape[0]
    else:
        v = sphere(x, eps, g)
    stacked = torch.cat([x + v, x - v, x]) if method == "fd_ssm" else torch.cat([x + v, x - v])
    fs, q0s = f(stacked).split(n), model.log_q0(stacked).split(n)
    root = math.sqrt(d) / eps
    A = (root / 2 * (fs[0] - fs[1]))[:, :, None]
    d1_q0 = (q0s[0] - q0s[1])[:, None]
    if method == "fd_ssm":
        return A, root / 2 * d1_q0, root**2 * (fs[0] + fs[1] - 2 * fs[2])
    return A, root * (d1_q0 / 2 + (v * z).sum(1, keepdim=True) / sigma), zeros


def normal_equations(A: Tensor, c: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """G = mean_n A_n A_n^T (M, M) and b = mean_n (A_n c_n + e_n) (M,)."""
    n = A.shape[0]
    G = torch.einsum("nmk,nlk->ml", A, A) / n
    b = (torch.einsum("nmk,nk->m", A, c) + e.sum(0)) / n
    return G, b


def solve_alpha(G: Tensor, b: Tensor, log_lambda: Tensor) -> Tensor:
    """argmin 1/2 a^T G a + b^T a + lambda/2 ||a||^2 = -(G + lambda I)^{-1} b, lambda = 10^ll."""
    eye = torch.eye(len(b), dtype=G.dtype)
    return torch.linalg.solve(G + 10.0**log_lambda * eye, -b)


def fit_alpha(method: str, model: DKEF, x: Tensor, g: torch.Generator, *, eps: float,
              sigma: float, directions: int = 1) -> Tensor:
    G, b = normal_equations(*quadratic_terms(method, model, x, g, eps=eps, sigma=sigma,
                                             directions=directions))
    return solve_alpha(G, b, model.log_lambda)


# ----------------------------------------------------------------------------- losses
def method_loss(method: str, model: DKEF, alpha: Tensor, x: Tensor,
                g: torch.Generator | None, *, eps: float, sigma: float,
                create_graph: bool = True, seed: int | None = None,
                n_projections: int = 1, fd_dsm_direction: str = "residual") -> Tensor:
    """The method's score-matching loss (fdsm_ext) of log p~(.; alpha) on x; its random
    draws come from ``g``, or from ``seed`` (fdsm_ext's ``seed=``); ``n_projections``
    directions per sample for ssm, ssm_vr, fd_ssm and fd_dsm along random directions
    (``fd_dsm_direction``: "residual", DSM's gradient, or "random")."""
    import fdsm_ext

    def logp(y):
        return model.log_density(y, alpha)

    kw = {"output": "log_density", "generator": g, "seed": seed}
    if method == "exact":
        return fdsm_ext.exact_sm_loss(logp, x, output="log_density", create_graph=create_graph)
    if method == "dsm":
        return fdsm_ext.dsm_loss(logp, x, sigma, **kw)
    kw["n_projections"] = n_projections
    if method in ("ssm", "ssm_vr"):
        return fdsm_ext.ssm_loss(logp, x, variance_reduction=method == "ssm_vr", **kw)
    if method == "fd_ssm":
        return fdsm_ext.fd_ssm_loss(logp, x, eps=eps, **kw)
    if fd_dsm_direction == "residual":
        kw.pop("n_projections")
    return fdsm_ext.fd_dsm_loss(logp, x, sigma, eps=eps, direction=fd_dsm_direction, **kw)


def test_exact_sm(model: DKEF, x: Tensor) -> float:
    import fdsm_ext

    return float(fdsm_ext.exact_sm_loss(model.log_density, x, output="log_density"))


# ----------------------------------------------------------------------------- likelihood
@torch.no_grad()
def log_normaliser(log_density, d: int, n_samples: int, g: torch.Generator, *,
                   proposal_std: float = Q0_STD, chunk: int = 4000) -> tuple[float, float]:
    """(log Z, its standard error) by importance sampling from N(0, proposal_std^2 I):

        Z ~= mean_i w_i,  w_i = p~(x_i) / q(x_i),  se(log Z) ~= sd(w) / (sqrt(N) mean(w)).
    """
    log_w = []
    log_q_const = -0.5 * d * math.log(2 * math.pi * proposal_std**2)
    for start in range(0, n_samples, chunk):
        x = proposal_std * torch.randn(min(chunk, n_samples - start), d, generator=g)
        log_q = log_q_const - 0.5 * x.pow(2).sum(1) / proposal_std**2
        log_w.append((log_density(x) - log_q).double())
    log_w = torch.cat(log_w)
    top = log_w.max()
    w = torch.exp(log_w - top)
    mean = w.mean()
    se = float(w.std() / (math.sqrt(n_samples) * mean))
    return float(mean.log() + top), se
