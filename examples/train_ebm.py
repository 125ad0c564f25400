"""Train a deep energy-based model with finite-difference score matching, then sample from it.

    python -m examples.train_ebm --out runs/ebm                 # FD-SSM on built-in 8x8 digits
    python -m examples.train_ebm --method dsm --out runs/dsm    # a baseline, same units
    torchrun --nproc_per_node=2 -m examples.train_ebm --out runs/ebm_ddp   # data parallel
    torchrun --nproc_per_node=2 -m examples.train_ebm --fsdp --out runs/ebm_fsdp  # sharded
    python -m examples.train_ebm --condition sigma --out runs/ebm_sigma    # E(x, sigma)
    python -m examples.train_ebm --arch vit --dataset mnist5k --out runs/vit  # ViT energy

The network is a noise-conditional ENERGY E(x, i) (log-density -E(x, i) + const of the data
smoothed by N(0, sigma_i^2 I)) for a geometric ladder sigma_1 = 1 > ... > sigma_10 = 0.05
(configurable), as the paper's deep EBMs follow multi-scale denoising score matching: a
single noise level is not enough for Langevin sampling to find the digits (with
``--condition sigma`` the energy is E(x, sigma_i), conditioned on the level itself). Every
loss is
called with ``output="energy"`` (score = -grad_x E by autograd) through
``fdsm_ext.noise_conditional_loss`` (each sample draws a level, sigma_i^2 weighting):
SSM-type methods (fd_ssm, ssm, ssm_vr, exact) see x + sigma_i z, DSM-type methods (dsm,
fd_dsm) use sigma_i as their denoising noise (``--n-projections`` sets the number of random
directions per sample of the sliced methods; ``--fd-dsm-direction`` picks fd_dsm's
estimator: along the DSM residual, DSM's own gradient, by default, or along random
directions). Sampling is annealed Langevin dynamics from uniform noise (100 steps per
level, step 5e-5 * (sigma_i/sigma_min)^2; larger steps drift into a few over-weighted
modes of this model, e.g. 7-like strokes, and raise MMD^2) with a final denoising step.
Held-out quality is the exact score-matching loss J_SM (docs/math.rst, "Exact score
matching") at one fixed level (``--sigma``, default 0.1: the nearest level of the ladder)
on noise-perturbed held-out images: the same units for every method, lower is better.

Writes OUT/samples.png, OUT/curves.png, OUT/metrics.json and OUT/checkpoint.pt
(the one before it: OUT/checkpoint.prev.pt).
"""

from __future__ import annotations

import os
import sys

import torch

from .common import cli, distributed, image_training, report, seeding
from .common.models import EnergyNet
from .common.transformer import ATTENTION_BACKENDS, ViTEnergy

METHODS = ("fd_ssm", "fd_dsm", "ssm", "ssm_vr", "dsm", "exact")
# Methods whose autograd implementation differentiates the network w.r.t. its input with
# create_graph=True (double backward): DistributedDataParallel's gradient hooks do not
# support torch.autograd.grad, so these runs all-reduce gradients by hand instead.
DOUBLE_BACKWARD = ("ssm", "ssm_vr", "dsm", "exact")


def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="fd_ssm", choices=METHODS,
                   help="fd_ssm: variance-reduced FD-SSM (default)")
    p.add_argument("--eps", type=cli.positive_float, default=0.1,
                   help="finite-difference step: the norm of the direction v (fd_* methods)")
    p.add_argument("--n-projections", type=cli.positive_int, default=1,
                   help="random directions v per sample (fd_ssm, ssm, ssm_vr, and fd_dsm "
                        "with --fd-dsm-direction random)")
    p.add_argument("--fd-dsm-direction", default="residual", choices=("residual", "random"),
                   help="fd_dsm: finite differences along the DSM residual (DSM's gradient, "
                        "default) or along random directions (the paper's estimator)")
    p.add_argument("--sigma-max", type=cli.positive_float, default=1.0)
    p.add_argument("--sigma-min", type=cli.positive_float, default=0.05)
    p.add_argument("--n-sigmas", type=cli.positive_int, default=10)
    p.add_argument("--sigma", type=cli.positive_float, default=0.1,
                   help="noise level of the held-out exact SM loss (nearest level is used)")
    p.add_argument("--width", type=cli.positive_int, default=32,
                   help="base channels (--arch conv)")
    p.add_argument("--arch", default="conv", choices=("conv", "vit"),
                   help="energy network: residual conv net (default) or a small ViT "
                        "(examples/common/transformer.py)")
    p.add_argument("--attention", default=None, choices=ATTENTION_BACKENDS,
                   help="--arch vit: scaled-dot-product-attention backend (flash, default: "
                        "fused kernel, no double backward; math: unfused, twice "
                        "differentiable)")
    p.add_argument("--patch", type=cli.positive_int, default=None,
                   help="--arch vit: patch side (default: 7 if it divides the image side, "
                        "else 4, else 1)")
    p.add_argument("--condition", default="label", choices=("label", "sigma"),
                   help="what the network is conditioned on: the level index (label, default) "
                        "or the noise level sigma itself (sigma: embedding of log sigma)")
    cli.add_common_args(p, steps=4000, batch_size=128, lr=1e-3, ckpt_every=1000,
                        eval_every=500, out="runs/ebm")
    p.add_argument("--eval-size", type=cli.positive_int, default=256,
                   help="held-out images for the exact SM loss")
    p.add_argument("--n-samples", type=cli.positive_int, default=256)
    p.add_argument("--n-steps-each", type=cli.positive_int, default=100,
                   help="annealed Langevin steps per noise level")
    p.add_argument("--step-lr", type=cli.positive_float, default=5e-5,
                   help="Langevin step at the smallest sigma (scaled by (sigma_i/sigma_min)^2)")
    return p


def make_loss(method: str, sigmas: torch.Tensor, eps: float, n_projections: int = 1,
              condition: str = "label", fd_dsm_direction: str = "residual"):
    """loss_fn(net, x, generator): sigma_i^2-weighted loss of ``method`` over random levels."""
    import fdsm_ext

    if method == "exact":
        def loss_fn(net, x, g):
            labels = torch.randint(len(sigmas), (len(x),), generator=g, device=x.device)
            sig = sigmas[labels].view(-1, *([1] * (x.dim() - 1)))
            xt = x + sig * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
            cond = labels if condition == "label" else sigmas[labels]
            per = fdsm_ext.exact_sm_loss(net, xt, cond, output="energy", create_graph=True,
                                         reduction="none")
            return (sigmas[labels] ** 2 * per).mean()

        return loss_fn
    kw = {"method": method, "output": "energy", "condition": condition}
    if method in ("fd_ssm", "fd_dsm"):
        kw["eps"] = eps
    if method in ("ssm", "ssm_vr"):
        kw.update(method="ssm", variance_reduction=method == "ssm_vr")
    if method == "fd_dsm":
        kw["direction"] = fd_dsm_direction
    if method in ("fd_ssm", "ssm", "ssm_vr") or kw.get("direction") == "random":
        kw["n_projections"] = n_projections

    def loss_fn(net, x, g):
        return fdsm_ext.noise_conditional_loss(net, x, sigmas, generator=g, **kw)

    return loss_fn


def main(argv=None):
    parser = build_parser()
    args, train_x, test_x = cli.parse_and_load(parser, argv)
    if args.method == "fd_dsm" and args.fd_dsm_direction == "residual" and args.n_projections > 1:
        parser.error("--n-projections applies to fd_dsm only with --fd-dsm-direction random "
                     "(the residual direction is one deterministic direction per sample)")
    if args.arch == "conv" and (args.attention or args.patch):
        parser.error("--attention and --patch apply only to --arch vit")
    if args.arch == "vit":
        args.attention = args.attention or "flash"
        side = train_x.shape[-1]
        if args.patch is None:
            args.patch = 7 if side % 7 == 0 else 4 if side % 4 == 0 else 1
        if side % args.patch:
            parser.error(f"--patch {args.patch} does not divide the image side {side}")
        if args.method in DOUBLE_BACKWARD and args.attention == "flash":
            parser.error(f"--method {args.method} is autograd score matching, which needs "
                         "double backward (gradients of the input gradient), and the flash "
                         "attention kernel has no double backward: use --attention math or "
                         "an FD method (--method fd_ssm or fd_dsm)")
    cli.refuse_fsdp_double_backward(parser, args, DOUBLE_BACKWARD, "--method fd_ssm or fd_dsm")

    import fdsm_ext
    from fdsm_ext import geometric_sigmas

    d = distributed.setup_distributed(args.device)
    seeding.seed_everything(args.seed)
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.n_sigmas)
    if args.arch == "vit":
        model = ViTEnergy(in_ch=train_x.shape[1], image_size=train_x.shape[-1],
                          patch=args.patch, sigmas=sigmas, condition=args.condition,
                          attention=args.attention)
    else:
        model = EnergyNet(in_ch=train_x.shape[1], image_size=train_x.shape[-1], ch=args.width,
                          sigmas=sigmas, condition=args.condition)
    sigmas = sigmas.to(d.device)

    # Held-out: exact J_SM at one fixed level, on fixed noise-perturbed held-out images.
    eval_level = int((sigmas.cpu().log() - torch.log(torch.tensor(args.sigma))).abs().argmin())
    eval_sigma = float(sigmas[eval_level])
    eval_x = test_x[:args.eval_size]
    g_eval = torch.Generator().manual_seed(1234)
    eval_noisy = (eval_x + eval_sigma * torch.randn(eval_x.shape, generator=g_eval)).to(d.device)
    eval_labels = torch.full((len(eval_x),), eval_level, dtype=torch.long, device=d.device)
    eval_cond = eval_labels if args.condition == "label" else sigmas[eval_labels]

    def eval_fn(m):
        # The Hessian trace differentiates twice, which the flash kernel cannot.
        backend = getattr(m, "attention", None)
        if args.arch == "vit":
            m.attention = "math"
        try:
            with torch.enable_grad():
                # ~128 stacked rows per model call: 28x28 images at 1024 rows take GBs
                return fdsm_ext.exact_sm_loss(m, eval_noisy, eval_cond, output="energy",
                                              chunk_size=max(1, 128 // len(eval_noisy)))
        finally:
            if args.arch == "vit":
                m.attention = backend

    history, sec_per_iter = image_training.train(
        args=args, parser=parser, d=d, model=model, train_data=train_x,
        loss_fn=make_loss(args.method, sigmas, args.eps, args.n_projections, args.condition,
                          args.fd_dsm_direction),
        eval_fn=eval_fn,
        use_ddp_hooks=args.method not in DOUBLE_BACKWARD)
    max_diff = distributed.max_param_difference(model, d)
    mem = report.peak_memory_mb(d.device)
    distributed.cleanup_distributed()
    if not d.is_main:
        return 0

    image_training.sample_and_report(
        args=args, model=model, sigmas=sigmas, d=d, output="energy",
        title=f"EBM ({args.method}), annealed Langevin samples", history=history,
        train_label=f"training loss ({args.method})",
        eval_label=f"held-out exact SM loss (J_SM, sigma {eval_sigma:.3g})",
        eval_key="final_heldout_exact_sm_loss", test_x=test_x, sec_per_iter=sec_per_iter,
        mem=mem, max_diff=max_diff,
        extra={"n_projections": args.n_projections, "eval_sigma": eval_sigma,
               "fd_dsm_direction": args.fd_dsm_direction if args.method == "fd_dsm" else None,
               "condition": args.condition, "arch": args.arch,
               "attention": args.attention if args.arch == "vit" else None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
