"""Train a noise-conditional score network (NCSN) with finite-difference score matching.

    python -m examples.train_ncsn --out runs/ncsn               # FD-SSM on built-in 8x8 digits
    python -m examples.train_ncsn --method dsm --out runs/ncsn_dsm
    python -m examples.train_ncsn --condition sigma --out runs/ncsn_sigma   # s(x, sigma)
    torchrun --nproc_per_node=2 -m examples.train_ncsn --out runs/ncsn_ddp
    torchrun --nproc_per_node=2 -m examples.train_ncsn --fsdp --out runs/ncsn_fsdp

The network s(x, i) estimates the score of the data smoothed by N(0, sigma_i^2 I) for a
geometric ladder sigma_1 = 1 > ... > sigma_10 = 0.01 (paper setting; configurable); with
``--condition sigma`` it is s(x, sigma_i), conditioned on the level itself. Training
uses ``fdsm_ext.noise_conditional_loss`` (each sample draws a level, sigma^2 weighting);
sampling is annealed Langevin dynamics (paper: 100 steps per level, step_lr 2e-5) from
uniform noise, with a final denoising step.

Writes OUT/samples.png, OUT/curves.png, OUT/metrics.json and OUT/checkpoint.pt
(the one before it: OUT/checkpoint.prev.pt).
"""

from __future__ import annotations

import os
import sys

import torch

from .common import cli, distributed, image_training, report, seeding
from .common.models import ScoreNet

METHODS = ("fd_ssm", "ssm_vr", "dsm")


def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="fd_ssm", choices=METHODS,
                   help="fd_ssm: variance-reduced FD-SSM (default); ssm_vr: autograd SSM-VR; "
                        "dsm: denoising score matching")
    p.add_argument("--eps", type=cli.positive_float, default=0.1,
                   help="finite-difference step (fd_ssm)")
    p.add_argument("--sigma-max", type=cli.positive_float, default=1.0)
    p.add_argument("--sigma-min", type=cli.positive_float, default=0.01)
    p.add_argument("--n-sigmas", type=cli.positive_int, default=10)
    p.add_argument("--width", type=cli.positive_int, default=16, help="base channels")
    p.add_argument("--condition", default="label", choices=("label", "sigma"),
                   help="what the network is conditioned on: the level index (label, default) "
                        "or the noise level sigma itself (sigma: embedding of log sigma)")
    cli.add_common_args(p, steps=1200, batch_size=128, lr=1e-3, ckpt_every=400,
                        eval_every=200, out="runs/ncsn")
    p.add_argument("--n-samples", type=cli.positive_int, default=256)
    p.add_argument("--n-steps-each", type=cli.positive_int, default=100,
                   help="annealed Langevin steps per noise level")
    p.add_argument("--step-lr", type=cli.positive_float, default=2e-5,
                   help="Langevin step at the smallest sigma (scaled by (sigma_i/sigma_min)^2)")
    return p


def make_loss(method: str, sigmas: torch.Tensor, eps: float, condition: str = "label"):
    from fdsm_ext import noise_conditional_loss

    # output="score": FD-SSM then stacks only [x+v, x-v] (2B rows), no centre block.
    if method == "fd_ssm":
        kw = {"method": "fd_ssm", "eps": eps, "variance_reduction": True, "output": "score"}
    elif method == "ssm_vr":
        kw = {"method": "ssm", "variance_reduction": True, "output": "score"}
    else:
        kw = {"method": "dsm", "output": "score"}

    def loss_fn(net, x, g):
        return noise_conditional_loss(net, x, sigmas, condition=condition, generator=g, **kw)

    return loss_fn


def main(argv=None):
    parser = build_parser()
    args, train_x, test_x = cli.parse_and_load(parser, argv)
    cli.refuse_fsdp_double_backward(parser, args, ("ssm_vr",), "--method fd_ssm or dsm")

    from fdsm_ext import geometric_sigmas, noise_conditional_loss

    d = distributed.setup_distributed(args.device)
    seeding.seed_everything(args.seed)
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.n_sigmas)
    model = ScoreNet(sigmas, in_ch=train_x.shape[1], ch=args.width, condition=args.condition)
    sigmas = sigmas.to(d.device)

    # Held-out: the sigma^2-weighted denoising loss over all levels, with fixed noise and
    # levels (cheap, no derivatives of the network; equals J_SM up to a constant).
    eval_x = test_x.to(d.device)
    eval_labels = torch.arange(len(eval_x), device=d.device) % len(sigmas)

    def eval_fn(m):
        g = torch.Generator(device=d.device).manual_seed(1234)
        with torch.no_grad():
            return noise_conditional_loss(m, eval_x, sigmas, method="dsm", labels=eval_labels,
                                          condition=args.condition, generator=g)

    history, sec_per_iter = image_training.train(
        args=args, parser=parser, d=d, model=model, train_data=train_x,
        loss_fn=make_loss(args.method, sigmas, args.eps, args.condition), eval_fn=eval_fn,
        use_ddp_hooks=args.method != "ssm_vr")
    max_diff = distributed.max_param_difference(model, d)
    mem = report.peak_memory_mb(d.device)
    distributed.cleanup_distributed()
    if not d.is_main:
        return 0

    image_training.sample_and_report(
        args=args, model=model, sigmas=sigmas, d=d, output="score",
        title=f"NCSN ({args.method}), annealed Langevin samples", history=history,
        train_label=f"training loss ({args.method}, sigma^2-weighted)",
        eval_label="held-out denoising loss (all levels)", eval_key="final_heldout_dsm_loss",
        test_x=test_x, sec_per_iter=sec_per_iter, mem=mem, max_diff=max_diff,
        extra={"condition": args.condition})
    return 0


if __name__ == "__main__":
    sys.exit(main())
