"""Annealed Langevin settings on one trained NCSN: the step size and the final denoising step.

    python -m examples.ncsn_sampler_study --run runs/ncsn28/mnist5k_fd_ssm \\
        --step-lrs 5e-6 1e-5 2e-5 4e-5 --out runs/ncsn28/sampler_fd_ssm.json

Loads ``RUN/checkpoint.pt`` (written by ``python -m examples.train_ncsn``), rebuilds its
score network and data set from the options saved in it, and draws samples from the SAME
uniform initial noise and Langevin noise for every step size ``step_lr`` (the step at the
smallest sigma; level i uses step_lr (sigma_i / sigma_L)^2), with and without the final
denoising step x <- x + sigma_L^2 s(x, L) (Tweedie's formula). For each setting it reports
the classifier metrics of ``train_ncsn`` (Frechet distance and label entropies of the
samples, of held-out images and of the initial noise, for scale) and the kernel MMD^2, and
writes them, with the run's provenance, to ``--out`` (JSON) and a sample grid per setting
next to it.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone

import torch

from .common import classifier, cli, metrics
from .common.checkpoint import CKPT_NAME, load_checkpoint, save_json
from .common.data import load_dataset
from .common.models import ScoreNet


def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a train_ncsn output folder (checkpoint.pt)")
    p.add_argument("--step-lrs", type=cli.positive_float, nargs="+",
                   default=[5e-6, 1e-5, 2e-5, 4e-5],
                   help="Langevin step sizes at the smallest sigma (paper: 2e-5)")
    p.add_argument("--n-steps-each", type=cli.positive_int, default=100,
                   help="Langevin steps per noise level (paper: 100)")
    p.add_argument("--n-samples", type=cli.positive_int, default=256)
    p.add_argument("--seed", type=int, default=0, help="initial noise and Langevin noise")
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--out", required=True, help="results JSON (grids go beside it)")
    return p


def sample(model: ScoreNet, x0: torch.Tensor, sigmas: torch.Tensor, n_steps_each: int,
           step_lr: float, denoise: bool, seed: int) -> torch.Tensor:
    from fdsm_ext import annealed_langevin_dynamics

    g = torch.Generator().manual_seed(seed)
    return annealed_langevin_dynamics(model, x0, sigmas, n_steps_each, step_lr,
                                      condition=model.condition, output="score",
                                      denoise=denoise, generator=g)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = os.path.join(args.run, CKPT_NAME)
    if not os.path.exists(ckpt):
        parser.error(f"--run: no {CKPT_NAME} in {args.run}")
    state = load_checkpoint(ckpt, "cpu")
    saved = state["args"]
    from fdsm_ext import geometric_sigmas

    sigmas = geometric_sigmas(saved["sigma_max"], saved["sigma_min"], saved["n_sigmas"])
    model = ScoreNet(sigmas, in_ch=1, ch=saved["width"], condition=saved["condition"])
    model.load_state_dict(state["model"])
    model.eval()
    _, test_x = load_dataset(saved["dataset"], saved.get("data_dir"), limit=1)
    x0 = torch.rand((args.n_samples, *test_x.shape[1:]),
                    generator=torch.Generator().manual_seed(args.seed + 99))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    stem = os.path.splitext(os.path.basename(args.out))[0]
    os.makedirs(out_dir, exist_ok=True)
    settings = []
    last = torch.full((args.n_samples,), len(sigmas) - 1, dtype=torch.long)
    last = last if model.condition == "label" else sigmas[last]
    for step_lr in args.step_lrs:
        t0 = time.perf_counter()
        raw = sample(model, x0, sigmas, args.n_steps_each, step_lr, False, args.seed)
        seconds = time.perf_counter() - t0
        # The denoising step draws no noise, so it is applied to the same trajectory: what
        # annealed_langevin_dynamics(denoise=True) returns for this seed (tested).
        with torch.no_grad():
            denoised = raw + sigmas[-1] ** 2 * model(raw, last)
        for denoise, x in ((True, denoised), (False, raw)):
            grid = f"{stem}_lr{step_lr:g}_{'denoised' if denoise else 'raw'}.png"
            metrics.save_image_grid(os.path.join(out_dir, grid), x[:100],
                                    title=f"step_lr {step_lr:g}, denoise {denoise}")
            row = {"step_lr": step_lr, "denoise": denoise, "sampling_seconds": seconds,
                   "grid": grid, "samples_finite": bool(torch.isfinite(x).all()),
                   **metrics.mmd_report(x, x0, test_x),
                   **classifier.classifier_report(saved["dataset"], saved.get("data_dir"), x,
                                                  x0, test_x)}
            settings.append(row)
            frechet = row.get("frechet_distance_samples", float("nan"))
            print(f"step_lr {step_lr:g} denoise {denoise}: Frechet {frechet:.4g}, "
                  f"{seconds:.0f} s", flush=True)
    save_json(args.out, {
        "run": args.run, "trained_steps": state["step"], "method": saved["method"],
        "dataset": saved["dataset"], "n_samples": args.n_samples,
        "n_steps_each": args.n_steps_each, "settings": settings,
        "provenance": {
            "command": "python -m examples.ncsn_sampler_study " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        },
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
