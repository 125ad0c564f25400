#!/usr/bin/env python
"""Train a noise-conditional score network (NCSN) with finite-difference score matching.

    python examples/train_ncsn.py --out runs/ncsn               # FD-SSM on built-in 8x8 digits
    python examples/train_ncsn.py --method dsm --out runs/ncsn_dsm
    torchrun --nproc_per_node=2 examples/train_ncsn.py --out runs/ncsn_ddp

The network s(x, i) estimates the score of the data smoothed by N(0, sigma_i^2 I) for a
geometric ladder sigma_1 = 1 > ... > sigma_10 = 0.01 (paper setting; configurable). Training
uses ``fdsm_ext.noise_conditional_loss`` (each sample draws a level, sigma^2 weighting);
sampling is annealed Langevin dynamics (paper: 100 steps per level, step_lr 2e-5) from
uniform noise, with a final denoising step.

Writes OUT/samples.png, OUT/curves.png, OUT/metrics.json and OUT/checkpoint.pt.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import metrics, training  # noqa: E402
from common.models import ScoreNet  # noqa: E402

METHODS = ("fd_ssm", "ssm_vr", "dsm")


def build_parser():
    p = training.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="fd_ssm", choices=METHODS,
                   help="fd_ssm: variance-reduced FD-SSM (default); ssm_vr: autograd SSM-VR; "
                        "dsm: denoising score matching")
    p.add_argument("--eps", type=training.positive_float, default=0.1,
                   help="finite-difference step (fd_ssm)")
    p.add_argument("--sigma-max", type=training.positive_float, default=1.0)
    p.add_argument("--sigma-min", type=training.positive_float, default=0.01)
    p.add_argument("--n-sigmas", type=training.positive_int, default=10)
    p.add_argument("--width", type=training.positive_int, default=16, help="base channels")
    training.add_common_args(p, steps=1200, batch_size=128, lr=1e-3, ckpt_every=400,
                             eval_every=200, out="runs/ncsn")
    p.add_argument("--n-samples", type=training.positive_int, default=256)
    p.add_argument("--n-steps-each", type=training.positive_int, default=100,
                   help="annealed Langevin steps per noise level")
    p.add_argument("--step-lr", type=training.positive_float, default=2e-5,
                   help="Langevin step at the smallest sigma (scaled by (sigma_i/sigma_min)^2)")
    return p


def make_loss(method: str, sigmas: torch.Tensor, eps: float):
    from fdsm_ext import noise_conditional_loss

    # output="score": FD-SSM then stacks only [x+v, x-v] (2B rows), no centre block.
    if method == "fd_ssm":
        kw = {"method": "fd_ssm", "eps": eps, "variance_reduction": True, "output": "score"}
    elif method == "ssm_vr":
        kw = {"method": "ssm", "variance_reduction": True, "output": "score"}
    else:
        kw = {"method": "dsm", "output": "score"}

    def loss_fn(net, x, g):
        return noise_conditional_loss(net, x, sigmas, generator=g, **kw)

    return loss_fn


def main(argv=None):
    parser = build_parser()
    args, train_x, test_x = training.parse_and_load(parser, argv)

    from fdsm_ext import annealed_langevin_dynamics, geometric_sigmas, noise_conditional_loss

    d = training.setup_distributed(args.device)
    training.seed_everything(args.seed)
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
    sigmas = geometric_sigmas(args.sigma_max, args.sigma_min, args.n_sigmas)
    model = ScoreNet(sigmas, in_ch=train_x.shape[1], ch=args.width)
    sigmas = sigmas.to(d.device)

    # Held-out: the sigma^2-weighted denoising loss over all levels, with fixed noise and
    # levels (cheap, no derivatives of the network; equals J_SM up to a constant).
    eval_x = test_x.to(d.device)
    eval_labels = torch.arange(len(eval_x), device=d.device) % len(sigmas)

    def eval_fn(m):
        g = torch.Generator(device=d.device).manual_seed(1234)
        with torch.no_grad():
            return noise_conditional_loss(m, eval_x, sigmas, method="dsm", labels=eval_labels,
                                          generator=g)

    history, sec_per_iter = training.train(
        args=args, parser=parser, d=d, model=model, train_data=train_x,
        loss_fn=make_loss(args.method, sigmas, args.eps), eval_fn=eval_fn,
        use_ddp_hooks=args.method != "ssm_vr")
    max_diff = training.max_param_difference(model, d)
    mem = training.peak_memory_mb(d.device)
    training.cleanup_distributed()
    if not d.is_main:
        return 0

    model.eval()
    g = torch.Generator(device=d.device).manual_seed(args.seed + 99)
    x0 = torch.rand((args.n_samples, *train_x.shape[1:]), generator=g, device=d.device)
    t0 = time.perf_counter()
    samples = annealed_langevin_dynamics(model, x0, sigmas, args.n_steps_each, args.step_lr,
                                         output="score", denoise=True, generator=g,
                                         progress=not args.no_progress)
    sample_time = time.perf_counter() - t0
    samples = samples.detach().cpu()
    metrics.save_image_grid(os.path.join(args.out, "samples.png"), samples[:100],
                            title=f"NCSN ({args.method}), annealed Langevin samples")
    metrics.save_curves(os.path.join(args.out, "curves.png"), history,
                        train_label=f"training loss ({args.method}, sigma^2-weighted)",
                        eval_label="held-out denoising loss (all levels)")
    final_eval = history["eval"][-1][1] if history["eval"] else None
    result = {
        "method": args.method, "dataset": args.dataset, "steps": args.steps,
        "batch_size": args.batch_size, "world_size": d.world_size, "eps": args.eps,
        "sigmas": sigmas.tolist(), "n_steps_each": args.n_steps_each, "step_lr": args.step_lr,
        "final_heldout_dsm_loss": final_eval,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "seconds_per_iteration": sec_per_iter,
        "sampling_seconds": sample_time,
        **mem,
        **metrics.mmd_report(samples, x0.cpu(), test_x),
        "samples_finite": bool(torch.isfinite(samples).all()),
        "ranks_max_param_difference": max_diff,
        "torch_threads": torch.get_num_threads(),
    }
    training.save_json(os.path.join(args.out, "metrics.json"), result)
    fmt = (lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}")  # noqa: E731
    print(f"held-out DSM {fmt(final_eval)}, {1000 * sec_per_iter:.1f} ms/iter, MMD^2 samples "
          f"{fmt(result['mmd2_samples_vs_heldout'])} vs initial noise "
          f"{fmt(result['mmd2_init_noise_vs_heldout'])}; wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
