"""Deep kernel exponential family (DKEF) on UCI red wine, trained by six score-matching methods.

    python -m examples.dkef_uci --out runs/dkef               # all methods, seeds 0 1 2
    python -m examples.dkef_uci --methods fd_ssm ssm --seeds 0 --max-epochs 50 --out runs/q

The paper's Table 1 setting (Pang et al. 2020, after Wenliang et al. 2019 and Song et al.
2019; the authors' SSM/models/dkef.py and SSM/runners/dkef_runner.py):

    log p(x) = log q0(x) + sum_m alpha_m sum_j w_j k_j(x, z_m) - log Z,   q0 = N(0, 4 I),
    k_j(x, z) = exp(-||phi_j(x) - phi_j(z)||^2 / (2 * 10^s_j)),

(model and closed-form alpha: ``examples/common/dkef.py``) with three Gaussian kernels on
the features phi_j of 3-layer softplus MLPs (width 30, linear skip),
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

from .common import checkpoint as ckpt_lib
from .common import cli, loop, report, seeding
from .common.data import DataError, load_red_wine
from .common.distributed import Dist
from .common.dkef import (
    DKEF,
    fit_alpha,
    log_normaliser,
    method_loss,
    normal_equations,
    quadratic_terms,
    solve_alpha,
    test_exact_sm,
)

METHODS = ("exact", "ssm", "ssm_vr", "fd_ssm", "dsm", "fd_dsm")
LABELS = {"exact": "exact SM", "ssm": "SSM", "ssm_vr": "SSM-VR", "fd_ssm": "FD-SSM",
          "dsm": "DSM", "fd_dsm": "FD-DSM"}
SPLIT_SEED = 2019  # the authors' shuffling seed; also seeds dequantisation and data noise


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
    idx = seeding.batch_indices(len(train), args.batch_size, step, seed, Dist())
    g = seeding.step_generator(seed, 0, step, torch.device("cpu"))
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
    return report.interleaved_timing(steps, args.timing_rounds)


def train_one(args, parser, method: str, seed: int, data: tuple[Tensor, Tensor, Tensor],
              log=print) -> dict:
    """Stage 1 (early-stopped Adam on all parameters), stage 2 (lambda), evaluation."""
    train, val, test = data
    out = run_dir(args, method, seed)
    ckpt_path = os.path.join(out, ckpt_lib.CKPT_NAME)
    kw = {"eps": args.eps, "sigma": args.sigma}
    model = make_model(train, seed, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    per_epoch = len(train) // args.batch_size
    max_steps = args.max_epochs * per_epoch
    val_fit_x = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
                      [:args.val_fit_size]]
    state = {"step": 0, "best_val": math.inf, "best_step": 0, "best_model": None,
             "history": {"train": [], "val": []}, "train_seconds": 0.0, "timed_steps": 0}
    saved = (ckpt_lib.resume_run_state(parser, out, "cpu", model, opt, args) if args.resume
             else None)
    if saved is not None:
        state = saved
        log(f"{method} seed {seed}: resumed at step {state['step']}")
    alpha: Tensor | None = None  # the latest step's fit; stored in the model at a better val
    # Out of patience, judged at each validation. A resumed run that had already run out of
    # patience stays stopped (a larger --max-epochs extends only the runs the old cap cut short).
    stopped = state["step"] - state["best_step"] >= args.patience

    def step(i: int) -> dict[str, float]:
        nonlocal alpha
        t0 = time.perf_counter()
        alpha, value = train_step(args, method, model, opt, train, i, seed)
        state["train_seconds"] += time.perf_counter() - t0
        state["timed_steps"] += 1
        state["history"]["train"].append((i + 1, value))
        state["step"] = i + 1
        return {"loss": value}

    def validate(done: int) -> None:
        nonlocal stopped
        g = seeding.step_generator(seed, 1, done, torch.device("cpu"))
        with torch.no_grad() if method in ("fd_ssm", "fd_dsm") else torch.enable_grad():
            a = fit_alpha(method, model, val_fit_x, g, directions=args.alpha_directions,
                          **kw).detach()
        with torch.enable_grad():
            v = float(method_loss(method, model, a, val, g, create_graph=False,
                                  n_projections=args.n_projections,
                                  fd_dsm_direction=args.fd_dsm_direction, **kw).detach())
        state["history"]["val"].append((done, v))
        if v < state["best_val"]:
            model.alpha.copy_(alpha.detach())
            state.update(best_val=v, best_step=done,
                         best_model=copy.deepcopy(model.state_dict()))
        stopped = done - state["best_step"] >= args.patience

    def checkpoint(done: int) -> None:
        ckpt_lib.save_run_state(ckpt_path, model, opt, state, args)

    loop.run(step, start=state["step"], stop=max_steps, until=lambda done: stopped,
             desc=f"{method} s{seed}", progress=not args.no_progress,
             hooks=[loop.Hook(args.val_every, validate, at_end=True),
                    loop.Hook(args.ckpt_every, checkpoint, at_end=True)])

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
    ckpt_lib.save_json(os.path.join(out, "metrics.json"), result)
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
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--data-file", default=None,
                   help="winequality-red.csv (default: the copy in PyPI xi-method)")
    p.add_argument("--m", type=cli.positive_int, default=200, help="inducing points")
    p.add_argument("--n-kernels", type=cli.positive_int, default=3, choices=[1, 2, 3])
    p.add_argument("--width", type=cli.positive_int, default=30)
    p.add_argument("--batch-size", type=cli.positive_int, default=200,
                   help="split in two halves: alpha fit, loss")
    p.add_argument("--lr", type=cli.positive_float, default=0.01)
    p.add_argument("--clip", type=cli.positive_float, default=1.0)
    p.add_argument("--max-epochs", type=cli.positive_int, default=500)
    p.add_argument("--patience", type=cli.positive_int, default=200,
                   help="stop after this many steps without a better validation loss")
    p.add_argument("--val-every", type=cli.positive_int, default=1,
                   help="validation loss every N steps")
    p.add_argument("--val-fit-size", type=cli.positive_int, default=1000,
                   help="training points on which alpha is fitted for the validation loss")
    p.add_argument("--final-steps", type=cli.nonneg_int, default=1000,
                   help="Adam steps of the final stage (lambda only)")
    p.add_argument("--final-lr", type=cli.positive_float, default=1e-3)
    p.add_argument("--final-draws", type=cli.positive_int, default=10,
                   help="draws of the random directions per validation batch, final stage")
    p.add_argument("--eps", type=cli.positive_float, default=0.1,
                   help="finite-difference step ||v|| (fd_ssm, fd_dsm)")
    p.add_argument("--sigma", type=cli.positive_float, default=0.1,
                   help="denoising noise (dsm, fd_dsm)")
    p.add_argument("--alpha-directions", type=cli.positive_int, default=1,
                   help="fd_ssm, fd_dsm: orthogonal directions per sample in the alpha fit "
                        "(at most d)")
    p.add_argument("--n-projections", type=cli.positive_int, default=1,
                   help="ssm, ssm_vr, fd_ssm, fd_dsm with --fd-dsm-direction random: random "
                        "directions per sample in the loss")
    p.add_argument("--fd-dsm-direction", default="residual", choices=("residual", "random"),
                   help="fd_dsm's loss: finite differences along the DSM residual (DSM's "
                        "gradient, default) or along random directions (the paper's)")
    p.add_argument("--is-samples", type=cli.positive_int, default=10**6,
                   help="importance samples for log Z")
    p.add_argument("--timing-rounds", type=cli.nonneg_int, default=30,
                   help="after training, time this many steps per method, interleaved")
    p.add_argument("--out", default="runs/dkef")
    p.add_argument("--threads", type=cli.positive_int, default=1)
    p.add_argument("--ckpt-every", type=cli.positive_int, default=100)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: summarise the finished runs in OUT (and time them)")
    p.add_argument("--no-progress", action="store_true")
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
            r = (ckpt_lib.finished_result(done, lambda r: args.report_only or r["early_stopped"]
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
            except loop.NonFiniteLoss as e:
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
    ckpt_lib.save_json(os.path.join(args.out, "metrics.json"), {
        "summary": summary, "runs": [{k: v for k, v in r.items() if k != "history"}
                                     for r in results],
        "args": vars(args),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    text = table(summary)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
