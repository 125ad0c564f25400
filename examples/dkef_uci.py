#!/usr/bin/env python
"""Deep kernel exponential family (DKEF) on UCI red wine, trained by six score-matching methods.

    python examples/dkef_uci.py --out runs/dkef               # all methods, seeds 0 1 2
    python examples/dkef_uci.py --methods fd_ssm ssm --seeds 0 --max-epochs 50 --out runs/q

The paper's Table 1 setting (Pang et al. 2020, after Wenliang et al. 2019 and Song et al.
2019; the authors' SSM/models/dkef.py and SSM/runners/dkef_runner.py):

    log p(x) = log q0(x) + sum_m alpha_m sum_j w_j k_j(x, z_m) - log Z,   q0 = N(0, 4 I),
    k_j(x, z) = exp(-||phi_j(x) - phi_j(z)||^2 / (2 * 10^s_j)),

three Gaussian kernels on the features phi_j of 3-layer softplus MLPs (width 30, linear skip),
M = 200 trainable inducing points z (initialised at training points), w = softmax(weights).
Each batch of 200 is split: the coefficients alpha are fitted in closed form on the first
half with the method's own objective, which is quadratic in alpha,

    J(alpha) = mean_n [ 1/2 ||A_n^T alpha + c_n||^2 + e_n^T alpha ] + lambda/2 ||alpha||^2
    alpha    = -(G + lambda I)^{-1} b,   G = mean A_n A_n^T,  b = mean (A_n c_n + e_n),

and the method's loss (fdsm_ext) on the second half is minimised through alpha(theta) by Adam
(lr 0.01, gradient norm clipped to 1), at most 500 epochs, early stopping after ``--patience``
steps without a better validation loss (the method's own loss on the validation set, alpha
fitted on 1000 training points). A final stage fits only lambda (1000 Adam steps, lr 1e-3,
on validation batches of 100) with alpha fitted on the whole training set. The finite-
difference methods fit alpha from function values only (no autograd), so their whole step is
derivative-free up to the one backward pass for theta.

Data as the authors' runner: each feature dequantised by uniform noise of +-(median gap
between its distinct values), shuffled (seed 2019), whitened by PCA on the whole data set
(as in the DKEF paper), test and validation sets of min(1000, N/10) at the end, then
N(0, 0.05^2) noise added to every set. Test NLL (in the whitened space, like the paper) uses
log Z by importance sampling with q0 = N(0, 4 I) as the proposal (``--is-samples``, 10^6);
its standard error is the delta-method one, sd(w) / (sqrt(N) mean(w)).

Writes OUT/runs/<method>_s<seed>/{checkpoint.pt,metrics.json}, OUT/metrics.json (all runs
and the per-method summary) and OUT/table.md. ``--resume`` continues unfinished runs from
their checkpoints (exactly: all randomness is a function of (seed, step)) and skips finished
ones. Timing: ``seconds_per_iteration`` is the mean time of a training step (alpha fit, loss,
backward, clip, Adam), measured in this one process, methods run one after another.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import jvp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import training  # noqa: E402
from common.data import DataError, load_red_wine  # noqa: E402

METHODS = ("exact", "ssm", "ssm_vr", "fd_ssm", "dsm", "fd_dsm")
LABELS = {"exact": "exact SM", "ssm": "SSM", "ssm_vr": "SSM-VR", "fd_ssm": "FD-SSM",
          "dsm": "DSM", "fd_dsm": "FD-DSM"}
SPLIT_SEED = 2019  # the authors' shuffling seed; also seeds dequantisation and data noise
Q0_STD = 2.0


# ----------------------------------------------------------------------------- data
def dequantise(data: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    """Add uniform noise of +-(median gap between distinct values) to every column."""
    out = data.copy()
    for j in range(data.shape[1]):
        gap = np.median(np.diff(np.unique(data[:, j])))
        out[:, j] += (rng.rand(len(data)) * 2 - 1) * gap
    return out


def prepare(raw: np.ndarray, noise_std: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantise, shuffle, PCA-whiten (on all data), split; returns float32 (train, val, test)."""
    rng = np.random.RandomState(SPLIT_SEED)
    data = dequantise(raw, rng)
    data = data[rng.permutation(len(data))]
    centred = data - data.mean(0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    white = centred @ (vt.T / s * np.sqrt(len(data)))
    n = len(data)
    n_test = min(1000, n // 10)
    n_val = min(1000, (n - n_test) // 10)
    splits = white[:n - n_test - n_val], white[n - n_test - n_val:n - n_test], white[n - n_test:]
    return tuple(torch.from_numpy(x + noise_std * rng.randn(*x.shape)).float() for x in splits)


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


# ----------------------------------------------------------------------------- one run
def run_dir(args, method: str, seed: int) -> str:
    return os.path.join(args.out, "runs", f"{method}_s{seed}")


def make_model(train: Tensor, seed: int, args) -> DKEF:
    """The same initial model (and inducing points) for every method of a seed."""
    torch.manual_seed(seed)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:args.m]
    return DKEF(train[idx], n_kernels=args.n_kernels, width=args.width)


def train_step(args, method: str, model: DKEF, opt, train: Tensor, step: int,
               seed: int) -> tuple[Tensor, float]:
    """One stage-1 step on batch ``step``: alpha on the first half, loss on the second half,
    backward, gradient-norm clip, Adam. Returns (alpha, loss value)."""
    half = args.batch_size // 2
    idx = training.batch_indices(len(train), args.batch_size, step, seed, training.Dist())
    g = training.step_generator(seed, 0, step, torch.device("cpu"))
    kw = {"eps": args.eps, "sigma": args.sigma}
    alpha = fit_alpha(method, model, train[idx[:half]], g, directions=args.alpha_directions,
                      **kw)
    loss = method_loss(method, model, alpha, train[idx[half:]], g,
                       n_projections=args.n_projections,
                       fd_dsm_direction=args.fd_dsm_direction, **kw)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    return alpha, float(loss.detach())


def timing_pass(args, train: Tensor) -> dict:
    """Interleaved timing of one training step per method (seed 0's initial model)."""
    steps = {}
    for method in args.methods:
        model = make_model(train, 0, args)
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        steps[method] = (lambda i, m=method, mo=model, o=opt:
                         train_step(args, m, mo, o, train, i, 0))
    return training.interleaved_timing(steps, args.timing_rounds)


def train_one(args, parser, method: str, seed: int, data: tuple[Tensor, Tensor, Tensor],
              log=print) -> dict:
    """Stage 1 (early-stopped Adam on all parameters), stage 2 (lambda), evaluation."""
    from tqdm import tqdm

    train, val, test = data
    out = run_dir(args, method, seed)
    ckpt_path = os.path.join(out, training.CKPT_NAME)
    kw = {"eps": args.eps, "sigma": args.sigma}
    model = make_model(train, seed, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    per_epoch = len(train) // args.batch_size
    max_steps = args.max_epochs * per_epoch
    val_fit_x = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
                      [:args.val_fit_size]]
    state = {"step": 0, "best_val": math.inf, "best_step": 0, "best_model": None,
             "history": {"train": [], "val": []}, "train_seconds": 0.0, "timed_steps": 0}
    saved = (training.resume_run_state(parser, out, "cpu", model, opt, args) if args.resume
             else None)
    if saved is not None:
        state = saved
        log(f"{method} seed {seed}: resumed at step {state['step']}")

    def checkpoint():
        training.save_run_state(ckpt_path, model, opt, state, args)

    def validate(step: int) -> float:
        g = training.step_generator(seed, 1, step, torch.device("cpu"))
        with torch.no_grad() if method in ("fd_ssm", "fd_dsm") else torch.enable_grad():
            alpha = fit_alpha(method, model, val_fit_x, g, directions=args.alpha_directions,
                              **kw).detach()
        with torch.enable_grad():
            return float(method_loss(method, model, alpha, val, g, create_graph=False,
                                     n_projections=args.n_projections,
                                     fd_dsm_direction=args.fd_dsm_direction, **kw).detach())

    bar = tqdm(total=max_steps, initial=state["step"], desc=f"{method} s{seed}",
               disable=args.no_progress, dynamic_ncols=True)
    # A resumed run that had already run out of patience stays stopped (a larger
    # --max-epochs extends only the runs that the old cap cut short).
    stopped = state["step"] - state["best_step"] >= args.patience
    while state["step"] < max_steps and not stopped:
        step = state["step"]
        t0 = time.perf_counter()
        alpha, value = train_step(args, method, model, opt, train, step, seed)
        state["train_seconds"] += time.perf_counter() - t0
        state["timed_steps"] += 1
        if not math.isfinite(value):
            raise FloatingPointError(f"{method} seed {seed}: training loss became {value} at "
                                     f"step {step + 1}")
        state["history"]["train"].append((step + 1, value))
        state["step"] = step + 1
        bar.update(1)
        if state["step"] % args.val_every == 0 or state["step"] == max_steps:
            v = validate(state["step"])
            state["history"]["val"].append((state["step"], v))
            if v < state["best_val"]:
                model.alpha.copy_(alpha.detach())
                state.update(best_val=v, best_step=state["step"],
                             best_model=copy.deepcopy(model.state_dict()))
            stopped = state["step"] - state["best_step"] >= args.patience
            bar.set_postfix(loss=f"{value:.3g}", val=f"{v:.3g}", best=f"{state['best_val']:.3g}")
        if state["step"] % args.ckpt_every == 0 or stopped or state["step"] == max_steps:
            checkpoint()
        if args.kill_after_step is not None and state["step"] == args.kill_after_step:
            os._exit(17)
    bar.close()

    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    lambda_before = float(10.0 ** model.log_lambda.detach())
    fit_lambda(args, model, method, seed, train, val, **kw)
    g_eval = torch.Generator().manual_seed(seed + 7)
    log_z, log_z_se = log_normaliser(model.log_density, train.shape[1], args.is_samples, g_eval)
    with torch.no_grad():
        test_ll = model.log_density(test) - log_z
    result = {
        "method": method, "seed": seed, "steps": state["step"], "best_step": state["best_step"],
        "early_stopped": state["step"] < max_steps, "best_val_loss": state["best_val"],
        "lambda_stage1": lambda_before, "lambda_final": float(10.0 ** model.log_lambda.detach()),
        "test_nll": float(-test_ll.mean()), "test_nll_is_se": log_z_se,
        "test_nll_data_se": float(test_ll.std() / math.sqrt(len(test))),
        "log_z": log_z, "test_exact_sm": test_exact_sm(model, test),
        "seconds_per_iteration": state["train_seconds"] / max(1, state["timed_steps"]),
        "history": state["history"],
    }
    training.save_json(os.path.join(out, "metrics.json"), result)
    return result


def fit_lambda(args, model: DKEF, method: str, seed: int, train: Tensor, val: Tensor, *,
               eps: float, sigma: float) -> None:
    """Final stage: alpha from the whole training set, only log_lambda trained on val batches.

    With the features fixed, the method's loss on a validation batch is exactly the quadratic
    1/2 a^T G_v a + b_v^T a + const (:func:`quadratic_terms`), so each batch's (G_v, b_v) is
    formed once (``--final-draws`` draws of the random directions / noise; exact SM has none)
    and the 1000 Adam steps only re-solve for alpha(lambda): same objective, no model calls.
    """
    g = torch.Generator().manual_seed(seed + 3)

    def terms(x):
        with torch.no_grad() if method in ("fd_ssm", "fd_dsm") else torch.enable_grad():
            G, b = normal_equations(*quadratic_terms(method, model, x, g, eps=eps, sigma=sigma,
                                                     directions=args.alpha_directions))
        return G.detach(), b.detach()

    G, b = terms(train)
    draws = 1 if method == "exact" else args.final_draws
    batches = [terms(val[idx]) for _ in range(draws)
               for idx in torch.randperm(len(val), generator=g).split(args.batch_size // 2)]
    log_lambda = model.log_lambda.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([log_lambda], lr=args.final_lr)
    for step in range(args.final_steps):
        G_v, b_v = batches[step % len(batches)]
        alpha = solve_alpha(G, b, log_lambda)
        loss = 0.5 * alpha @ G_v @ alpha + b_v @ alpha
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([log_lambda], args.clip)
        opt.step()
    with torch.no_grad():
        model.log_lambda.copy_(log_lambda)
        model.alpha.copy_(solve_alpha(G, b, log_lambda))


# ----------------------------------------------------------------------------- summary
def summarise(results: list[dict], methods: list[str]) -> dict:
    summary = {}
    for m in methods:
        rs = [r for r in results if r["method"] == m]
        if not rs:
            continue

        def stat(key, rs=rs):
            v = np.array([r[key] for r in rs], dtype=np.float64)
            return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")

        summary[m] = {"seeds": [r["seed"] for r in rs], "test_nll": stat("test_nll"),
                      "test_nll_is_se_max": max(r["test_nll_is_se"] for r in rs),
                      "test_exact_sm": stat("test_exact_sm"),
                      "seconds_per_iteration": stat("seconds_per_iteration"),
                      "steps": stat("steps"), "early_stopped": sum(r["early_stopped"] for r in rs)}
    return summary


def table(summary: dict) -> str:
    rows = ["| method | test NLL (mean ± std over seeds) | max IS s.e. | test exact SM loss | "
            "ms / iteration in training | ms / iteration, interleaved (median) | steps run | "
            "early-stopped |", "|---|---|---|---|---|---|---|---|"]
    for m, s in summary.items():
        inter = s.get("interleaved_seconds_per_iteration")
        inter = "n/a" if inter is None else f"{1000 * inter['median_s']:.1f}"
        rows.append(
            f"| {LABELS[m]} | {s['test_nll'][0]:.3f} ± {s['test_nll'][1]:.3f} | "
            f"{s['test_nll_is_se_max']:.3f} | {s['test_exact_sm'][0]:.2f} ± "
            f"{s['test_exact_sm'][1]:.2f} | {1000 * s['seconds_per_iteration'][0]:.1f} ± "
            f"{1000 * s['seconds_per_iteration'][1]:.1f} | "
            f"{inter} | "
            f"{s['steps'][0]:.0f} | {s['early_stopped']}/{len(s['seeds'])} |")
    return "\n".join(rows) + "\n"


# ----------------------------------------------------------------------------- main
def build_parser():
    p = training.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-file", default=None,
                   help="winequality-red.csv (default: the copy in PyPI xi-method)")
    p.add_argument("--m", type=training.positive_int, default=200, help="inducing points")
    p.add_argument("--n-kernels", type=training.positive_int, default=3, choices=[1, 2, 3])
    p.add_argument("--width", type=training.positive_int, default=30)
    p.add_argument("--batch-size", type=training.positive_int, default=200,
                   help="split in two halves: alpha fit, loss")
    p.add_argument("--lr", type=training.positive_float, default=0.01)
    p.add_argument("--clip", type=training.positive_float, default=1.0)
    p.add_argument("--max-epochs", type=training.positive_int, default=500)
    p.add_argument("--patience", type=training.positive_int, default=200,
                   help="stop after this many steps without a better validation loss")
    p.add_argument("--val-every", type=training.positive_int, default=1,
                   help="validation loss every N steps")
    p.add_argument("--val-fit-size", type=training.positive_int, default=1000,
                   help="training points on which alpha is fitted for the validation loss")
    p.add_argument("--final-steps", type=training.nonneg_int, default=1000,
                   help="Adam steps of the final stage (lambda only)")
    p.add_argument("--final-lr", type=training.positive_float, default=1e-3)
    p.add_argument("--final-draws", type=training.positive_int, default=10,
                   help="draws of the random directions per validation batch, final stage")
    p.add_argument("--eps", type=training.positive_float, default=0.1,
                   help="finite-difference step ||v|| (fd_ssm, fd_dsm)")
    p.add_argument("--sigma", type=training.positive_float, default=0.1,
                   help="denoising noise (dsm, fd_dsm)")
    p.add_argument("--alpha-directions", type=training.positive_int, default=1,
                   help="fd_ssm, fd_dsm: orthogonal directions per sample in the alpha fit "
                        "(at most d)")
    p.add_argument("--n-projections", type=training.positive_int, default=1,
                   help="ssm, ssm_vr, fd_ssm, fd_dsm with --fd-dsm-direction random: random "
                        "directions per sample in the loss")
    p.add_argument("--fd-dsm-direction", default="residual", choices=("residual", "random"),
                   help="fd_dsm's loss: finite differences along the DSM residual (DSM's "
                        "gradient, default) or along random directions (the paper's)")
    p.add_argument("--is-samples", type=training.positive_int, default=10**6,
                   help="importance samples for log Z")
    p.add_argument("--timing-rounds", type=training.nonneg_int, default=30,
                   help="after training, time this many steps per method, interleaved")
    p.add_argument("--out", default="runs/dkef")
    p.add_argument("--threads", type=training.positive_int, default=1)
    p.add_argument("--ckpt-every", type=training.positive_int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the finished runs in OUT (and time them)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kill-after-step", type=int, default=None, help=training.argparse.SUPPRESS)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fd_dsm_direction == "residual" and args.n_projections > 1 and "fd_dsm" in args.methods:
        parser.error("--n-projections applies to fd_dsm only with --fd-dsm-direction random")
    if args.alpha_directions > 11:
        parser.error("--alpha-directions must be at most d = 11")
    if args.batch_size < 4 or args.batch_size % 2:
        parser.error("--batch-size must be an even number >= 4")
    try:
        data = prepare(load_red_wine(args.data_file))
    except DataError as e:
        parser.error(str(e))
    if args.m > len(data[0]):
        parser.error(f"--m {args.m} exceeds the {len(data[0])} training points")
    if args.batch_size > len(data[0]):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(data[0])} training points")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    print(f"red wine: train {len(data[0])}, validation {len(data[1])}, test {len(data[2])}, "
          f"d = {data[0].shape[1]}; methods {' '.join(args.methods)}; seeds {args.seeds}")
    max_steps = args.max_epochs * (len(data[0]) // args.batch_size)
    results = []
    for seed in args.seeds:
        for method in args.methods:
            done = os.path.join(run_dir(args, method, seed), "metrics.json")
            r = (training.finished_result(done, lambda r: args.report_only or r["early_stopped"]
                                          or r["steps"] >= max_steps)
                 if args.resume or args.report_only else None)
            if r is not None:
                results.append(r)
                continue
            if args.report_only:
                print(f"{method} seed {seed}: not finished, left out of the report")
                continue
            try:
                r = train_one(args, parser, method, seed, data)
            except FloatingPointError as e:
                print(f"error: {e}; try a smaller --lr or a larger --eps", file=sys.stderr)
                return 1
            results.append(r)
            print(f"{method} seed {seed}: test NLL {r['test_nll']:.3f} (IS s.e. "
                  f"{r['test_nll_is_se']:.3f}), test exact SM {r['test_exact_sm']:.3f}, "
                  f"{1000 * r['seconds_per_iteration']:.1f} ms/iter, {r['steps']} steps")
    summary = summarise(results, args.methods)
    timing = timing_pass(args, data[0]) if args.timing_rounds else {}
    for m, t in timing.items():
        if m in summary:  # a method with no finished run has no row to time
            summary[m]["interleaved_seconds_per_iteration"] = t
    training.save_json(os.path.join(args.out, "metrics.json"), {
        "summary": summary, "runs": [{k: v for k, v in r.items() if k != "history"}
                                     for r in results],
        "args": {k: v for k, v in vars(args).items() if k != "kill_after_step"},
        "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    text = table(summary)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
