#!/usr/bin/env python
"""Train a deep energy-based model with finite-difference score matching, then sample from it.

    python examples/train_ebm.py --out runs/ebm                 # FD-SSM on built-in 8x8 digits
    python examples/train_ebm.py --method dsm --out runs/dsm    # a baseline, same units
    torchrun --nproc_per_node=2 examples/train_ebm.py --out runs/ebm_ddp   # data parallel

The network returns an ENERGY E(x) (log-density -E(x) + const), so every loss is called with
``output="energy"``. All methods fit the same target: the density of the data smoothed by
N(0, sigma^2 I) (exact score matching is ill-posed on raw digits, whose border pixels are
always 0). SSM-type methods (fd_ssm, ssm, ssm_vr, exact) see x + sigma z; DSM-type methods
(dsm, fd_dsm) use sigma as their denoising noise. Held-out quality is the exact
score-matching loss J_SM (MATH.md) on noise-perturbed held-out images: the same units for
every method, lower is better.

Writes OUT/samples.png, OUT/curves.png, OUT/metrics.json and OUT/checkpoint.pt.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import data as data_lib  # noqa: E402
from common import metrics, training  # noqa: E402
from common.models import EnergyNet  # noqa: E402

METHODS = ("fd_ssm", "fd_dsm", "ssm", "ssm_vr", "dsm", "exact")
# Methods whose autograd implementation differentiates the network w.r.t. its input with
# create_graph=True (double backward): DistributedDataParallel's gradient hooks do not
# support torch.autograd.grad, so these runs all-reduce gradients by hand instead.
DOUBLE_BACKWARD = ("ssm", "ssm_vr", "dsm", "exact")


def build_parser():
    p = training.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="fd_ssm", choices=METHODS)
    p.add_argument("--eps", type=training.positive_float, default=0.1,
                   help="finite-difference step: the norm of the direction v (fd_* methods)")
    p.add_argument("--sigma", type=training.positive_float, default=0.3,
                   help="data noise level: the model fits the data smoothed by N(0, sigma^2)")
    p.add_argument("--width", type=training.positive_int, default=32, help="base channels")
    training.add_common_args(p, steps=2000, batch_size=128, lr=1e-3, ckpt_every=500,
                             eval_every=500, out="runs/ebm")
    p.add_argument("--eval-size", type=training.positive_int, default=256,
                   help="held-out images for the exact SM loss")
    p.add_argument("--n-samples", type=training.positive_int, default=256)
    p.add_argument("--sample-stages", type=training.positive_int, default=5,
                   help="temperature levels of annealed Langevin sampling")
    p.add_argument("--sample-steps-each", type=training.nonneg_int, default=100,
                   help="Langevin steps per temperature level")
    p.add_argument("--temp-max", type=training.positive_float, default=30.0,
                   help="initial temperature of the annealing (ends at 1)")
    p.add_argument("--step-size", type=training.positive_float, default=None,
                   help="Langevin step at temperature 1 (default: 0.2 * sigma^2)")
    return p


class Tempered(torch.nn.Module):
    """Energy E(x) / T: Langevin on it samples from p(x)^(1/T)."""

    def __init__(self, energy, temperature: float):
        super().__init__()
        self.energy, self.temperature = energy, temperature

    def forward(self, x):
        return self.energy(x) / self.temperature


def sample(model, x0, *, sigma, stages, steps_each, temp_max, step_size, generator, progress):
    """Annealed Langevin sampling from the energy, then one denoising (Tweedie) step.

    The temperature goes geometrically from temp_max to 1; at temperature T the step is
    step_size * T (so the injected noise shrinks along with the temperature).
    """
    from tqdm import tqdm

    from fdsm_ext import langevin_dynamics

    temps = torch.logspace(torch.log10(torch.tensor(temp_max)), 0, stages).tolist()
    x = x0
    for t in tqdm(temps, desc="sample", disable=not progress):
        x = langevin_dynamics(Tempered(model, t), x, steps_each, step_size * t,
                              output="energy", generator=generator)
    # Tweedie: E[x_clean | x] = x + sigma^2 * score(x) for data smoothed by N(0, sigma^2 I).
    x = x.detach().requires_grad_(True)
    (grad_e,) = torch.autograd.grad(model(x).sum(), x)
    return (x - sigma**2 * grad_e).detach()


def make_loss(method: str, sigma: float, eps: float):
    import fdsm_ext

    def loss_fn(net, x, g):
        if method in ("dsm", "fd_dsm"):
            if method == "dsm":
                return fdsm_ext.dsm_loss(net, x, sigma, output="energy", generator=g)
            return fdsm_ext.fd_dsm_loss(net, x, sigma, eps=eps, output="energy", generator=g)
        xt = x + sigma * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        if method == "fd_ssm":
            return fdsm_ext.fd_ssm_loss(net, xt, eps=eps, output="energy", generator=g)
        if method == "exact":
            return fdsm_ext.exact_sm_loss(net, xt, output="energy", create_graph=True)
        return fdsm_ext.ssm_loss(net, xt, output="energy", generator=g,
                                 variance_reduction=method == "ssm_vr")

    return loss_fn


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    training.validate_common(parser, args)
    try:
        train_x, test_x = data_lib.load_dataset(args.dataset, args.data_dir, limit=args.limit)
    except data_lib.DataError as e:
        parser.error(str(e))
    if args.batch_size > len(train_x):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_x)} training images")
    step_size = args.step_size if args.step_size is not None else 0.2 * args.sigma**2
    if args.threads:
        torch.set_num_threads(args.threads)

    import fdsm_ext

    d = training.setup_distributed(args.device)
    training.seed_everything(args.seed)
    if d.is_main:
        os.makedirs(args.out, exist_ok=True)
    model = EnergyNet(in_ch=train_x.shape[1], image_size=train_x.shape[-1], ch=args.width)

    eval_x = test_x[:args.eval_size]
    g_eval = torch.Generator().manual_seed(1234)
    eval_noisy = (eval_x + args.sigma * torch.randn(eval_x.shape, generator=g_eval)).to(d.device)

    def eval_fn(m):
        with torch.enable_grad():
            return fdsm_ext.exact_sm_loss(m, eval_noisy, output="energy")

    history, sec_per_iter = training.train(
        args=args, parser=parser, d=d, model=model, train_data=train_x,
        loss_fn=make_loss(args.method, args.sigma, args.eps), eval_fn=eval_fn,
        use_ddp_hooks=args.method not in DOUBLE_BACKWARD)
    max_diff = training.max_param_difference(model, d)
    mem = training.peak_memory_mb(d.device)
    training.cleanup_distributed()
    if not d.is_main:
        return 0

    model.eval()
    g = torch.Generator(device=d.device).manual_seed(args.seed + 99)
    x0 = torch.rand((args.n_samples, *train_x.shape[1:]), generator=g, device=d.device)
    t0 = time.perf_counter()
    samples = sample(model, x0, sigma=args.sigma, stages=args.sample_stages,
                     steps_each=args.sample_steps_each, temp_max=args.temp_max,
                     step_size=step_size, generator=g, progress=not args.no_progress)
    sample_time = time.perf_counter() - t0
    samples = samples.cpu()
    metrics.save_image_grid(os.path.join(args.out, "samples.png"), samples[:100],
                            title=f"EBM ({args.method}), annealed Langevin samples")
    metrics.save_curves(os.path.join(args.out, "curves.png"), history,
                        train_label=f"training loss ({args.method})",
                        eval_label="held-out exact SM loss (J_SM)")
    result = {
        "method": args.method, "dataset": args.dataset, "steps": args.steps,
        "batch_size": args.batch_size, "world_size": d.world_size,
        "eps": args.eps, "sigma": args.sigma,
        "final_heldout_exact_sm_loss": history["eval"][-1][1] if history["eval"] else None,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "seconds_per_iteration": sec_per_iter,
        "sampling_seconds": sample_time,
        **mem,
        **metrics.mmd_report(samples, x0.cpu(), test_x),
        "ranks_max_param_difference": max_diff,
        "torch_threads": torch.get_num_threads(),
    }
    training.save_json(os.path.join(args.out, "metrics.json"), result)
    print(f"held-out J_SM {result['final_heldout_exact_sm_loss']:.4g}, "
          f"{1000 * sec_per_iter:.1f} ms/iter, "
          f"MMD^2 samples {result['mmd2_samples_vs_heldout']:.4g} vs initial noise "
          f"{result['mmd2_init_noise_vs_heldout']:.4g}; wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
