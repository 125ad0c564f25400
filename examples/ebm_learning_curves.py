"""Learning curves of a deep EBM: FD-SSM beside SSM and FD-DSM beside DSM, same init, same batches.

    python -m examples.ebm_learning_curves --out runs/curves          # Fashion-MNIST 28x28
    python -m examples.ebm_learning_curves --pairs ssm --ssm-sigma 0.1 --out runs/curves_ssm01

The network, data and losses are those of the deep-EBM benchmark (``benchmarks/deep_ebm.py``;
both take them from ``examples.common``): the unconditional ``EnergyNet(ch=8,
head_dim=64)``, batch 64, Adam, DSM at sigma 0.1, FD eps 0.1, SSM / FD-SSM on the clean
images. On clean images the SM objective has no lower
bound (the pixels sit on a lower-dimensional set; the paper's SSM column is -3e7 after 300K
iterations), so that pair's curves keep falling. ``--ssm-sigma s`` trains the SSM pair on
x + s z instead (fresh z each step, the same for both methods) and scores it on held-out
images plus fixed noise: there J_SM is bounded below by minus half the Fisher information
of the smoothed data, so the curves can flatten. ``--pairs`` picks the pairs to train;
``--resume`` with fewer pairs than the checkpoint continues only those (each method's batches
and random numbers depend on the iteration alone, so the values are those of a full run).

The methods start from the same initialisation and are trained in lockstep: iteration i of
every method (in rotating order) on the same batch and with the same random numbers (the
global torch seed is reset to a function of (seed, i) before each method's step) before
iteration i + 1, so load from other processes hits them alike. Every ``--eval-every``
iterations each model is scored on fixed held-out images: the exact score-matching loss
J_SM (Hessian trace by autograd, the same units for every method) and the DSM loss at
sigma 0.1 (fixed noise). The clock counts the training steps only.

A curve is called flat from the first evaluation after which every later value stays within
``--flat-tol`` (relative) of the last one; ``converged`` says whether that point lies in the
first 2/3 of the run with at least 5 evaluations from it on (a flat stretch long enough to
be seen).

Writes OUT/learning_curves.png, OUT/metrics.json and OUT/checkpoint.pt (atomic; ``--resume``
continues exactly).
"""

from __future__ import annotations

import os
import sys
import time

import torch

from .common import checkpoint as ckpt_lib
from .common import cli, loop, seeding
from .common.data import DataError, load_images
from .common.distributed import Dist
from .common.losses import energy_loss
from .common.models import seeded_energy_net

PAIRS = {"ssm": ("ssm", "fd_ssm"), "dsm": ("dsm", "fd_dsm", "fd_dsm_residual")}
LABELS = {"ssm": "SSM (autograd)", "fd_ssm": "FD-SSM", "dsm": "DSM (autograd)",
          "fd_dsm": "FD-DSM (random)", "fd_dsm_residual": "FD-DSM (residual)"}


def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="fashion_mnist",
                   choices=["fashion_mnist", "digits"])
    p.add_argument("--n-train", type=cli.positive_int, default=10000)
    p.add_argument("--steps", type=cli.nonneg_int, default=3000)
    p.add_argument("--batch-size", type=cli.positive_int, default=64)
    p.add_argument("--lr", type=cli.positive_float, default=1e-4)
    p.add_argument("--width", type=cli.positive_int, default=8, help="base channels")
    p.add_argument("--head-dim", type=cli.positive_int, default=64)
    p.add_argument("--sigma", type=cli.positive_float, default=0.1, help="DSM noise")
    p.add_argument("--eps", type=cli.positive_float, default=0.1, help="FD step")
    p.add_argument("--pairs", nargs="+", default=["ssm", "dsm"], choices=list(PAIRS),
                   help="which groups to train: ssm (SSM, FD-SSM) and/or dsm (DSM, FD-DSM "
                        "along random directions, FD-DSM along the residual)")
    p.add_argument("--methods", nargs="+", default=None,
                   choices=[m for pair in PAIRS.values() for m in pair],
                   help="train only these methods of the chosen groups (each method's "
                        "values do not depend on which others run beside it)")
    p.add_argument("--ssm-sigma", type=cli.nonneg_float, default=0.0,
                   help="noise added to the SSM pair's training and held-out images "
                        "(0: clean images, as the benchmark)")
    p.add_argument("--eval-every", type=cli.positive_int, default=100)
    p.add_argument("--eval-size", type=cli.positive_int, default=8,
                   help="held-out images for the exact SM loss (D Hessian-vector products)")
    p.add_argument("--dsm-eval-size", type=cli.positive_int, default=256,
                   help="held-out images for the held-out DSM loss")
    p.add_argument("--flat-tol", type=cli.positive_float, default=0.05)
    p.add_argument("--ckpt-every", type=cli.nonneg_int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/curves")
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def with_noise(loss, sigma: float):
    """``loss`` evaluated on x + sigma z, z ~ N(0, I) drawn from the global generator."""
    return lambda model, x: loss(model, x + sigma * torch.randn_like(x))


def flat_from(evals: list[tuple[int, float]], tol: float) -> int | None:
    """First step after which every held-out value is within ``tol`` (relative) of the last."""
    if not evals:
        return None
    last = evals[-1][1]
    scale = abs(last) or 1.0
    for k, (step, _) in enumerate(evals):
        if all(abs(v - last) <= tol * scale for _, v in evals[k:]):
            return step
    return None


def converged(flat: int | None, evals: list[tuple[int, float]], steps: int) -> bool:
    """Flat within the first 2/3 of the run, with at least 5 evaluations from there on."""
    return flat is not None and flat <= 2 * steps / 3 and sum(s >= flat for s, _ in evals) >= 5


def plot(path: str, hist: dict, steps: int, pairs: list[tuple[str, str]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 3, figsize=(15, 4 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        is_dsm = pair[0] in PAIRS["dsm"]
        for m in pair:
            h = hist[m]
            it, sm = zip(*h["eval_sm"], strict=True)
            secs = [h["seconds_at"][str(s)] for s in it]
            axes[row, 0].plot(it, sm, "o-", ms=3, label=LABELS[m])
            axes[row, 1].plot(secs, sm, "o-", ms=3, label=LABELS[m])
            if is_dsm:
                it2, dsm = zip(*h["eval_dsm"], strict=True)
                axes[row, 2].plot(it2, dsm, "o-", ms=3, label=LABELS[m])
            else:
                s, v = zip(*h["train"], strict=True)
                k = max(1, len(v) // 50)
                t = torch.tensor(v, dtype=torch.float64)
                ma = torch.nn.functional.avg_pool1d(t[None, None], k, stride=1)[0, 0]
                axes[row, 2].plot(s[k - 1:], ma.tolist(), label=f"{LABELS[m]} (avg {k})")
        axes[row, 0].set(xlabel="iteration", ylabel="held-out exact SM loss")
        axes[row, 1].set(xlabel="training wall-clock (s)", ylabel="held-out exact SM loss")
        axes[row, 2].set(xlabel="iteration",
                         ylabel="held-out DSM loss" if is_dsm else "training loss")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if ax.lines and min(min(ln.get_ydata()) for ln in ax.lines) < 0:
                ax.set_yscale("symlog", linthresh=1.0)
    fig.suptitle(f"deep EBM learning curves ({steps} iterations, same init and batches)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    import fdsm_ext

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        train_x, test_x, data_name = load_images(args.dataset, args.n_train,
                                                 max(args.eval_size, args.dsm_eval_size))
    except DataError as e:
        parser.error(str(e))
    if args.batch_size > len(train_x):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_x)} images")
    os.makedirs(args.out, exist_ok=True)
    pairs = [PAIRS[p] for p in dict.fromkeys(args.pairs)]
    if args.methods:
        pairs = [tuple(m for m in pair if m in args.methods) for pair in pairs]
        pairs = [pair for pair in pairs if pair]
    methods = tuple(m for pair in pairs for m in pair)
    if not methods:
        parser.error(f"--methods {' '.join(args.methods)} names no method of --pairs "
                     f"{' '.join(args.pairs)}")
    models = {m: seeded_energy_net(args.seed, train_x.shape[-1], ch=args.width,
                                   head_dim=args.head_dim) for m in methods}  # same init
    opts = {m: torch.optim.Adam(models[m].parameters(), lr=args.lr) for m in methods}
    losses = {m: energy_loss(m, args.sigma, args.eps) for m in methods}
    if args.ssm_sigma > 0:
        for m in set(PAIRS["ssm"]) & set(methods):
            losses[m] = with_noise(losses[m], args.ssm_sigma)
    hist = {m: {"train": [], "eval_sm": [], "eval_dsm": [], "seconds": 0.0,
                "seconds_at": {}} for m in methods}
    start = 0
    ckpt = os.path.join(args.out, ckpt_lib.CKPT_NAME)
    ckpt_keys = ("models", "opts", "hist", "step", "rng", "args")
    must_match = ("dataset", "n_train", "batch_size", "lr", "width", "head_dim", "sigma", "eps",
                  "seed", "eval_size", "dsm_eval_size", "ssm_sigma")
    loaded = (ckpt_lib.resume_or_none(parser, args.out, "cpu", keys=ckpt_keys)
              if args.resume else None)
    if loaded is not None:
        state, path = loaded
        ckpt_lib.check_resume_args(
            parser, {k: state["args"].get(k, parser.get_default(k)) for k in must_match}, args,
            keys=must_match)
        saved_pairs = state["args"].get("pairs", parser.get_default("pairs"))
        if not set(args.pairs) <= set(saved_pairs):
            parser.error(f"--resume: checkpoint holds --pairs {' '.join(saved_pairs)}; this run "
                         f"asks for {' '.join(args.pairs)}")
        missing = [m for m in methods if m not in state["models"]]
        if missing:
            parser.error(f"--resume: checkpoint holds no {', '.join(missing)} (it has "
                         f"{', '.join(state['models'])}); pass --methods to continue those")
        for m in methods:
            models[m].load_state_dict(state["models"][m])
            opts[m].load_state_dict(state["opts"][m])
        hist, start = {m: state["hist"][m] for m in methods}, state["step"]
        seeding.set_rng_state(state["rng"])
        print(f"resumed from {path} at step {start}")

    sm_x, dsm_x = test_x[:args.eval_size], test_x[:args.dsm_eval_size]
    gen = torch.Generator().manual_seed(seeding.mix(args.seed, 0x55A))
    noisy_sm_x = sm_x + args.ssm_sigma * torch.randn(sm_x.shape, generator=gen)

    def evaluate(done: int) -> None:
        for m in methods:
            model = models[m]
            x = noisy_sm_x if m in PAIRS["ssm"] else sm_x
            sm = float(fdsm_ext.exact_sm_loss(model, x, output="energy",
                                              chunk_size=max(1, 128 // len(sm_x))))
            torch.manual_seed(seeding.mix(args.seed, 0xE7A1))  # same noise at every eval
            dsm = float(fdsm_ext.dsm_loss(model, dsm_x, args.sigma, output="energy").detach())
            hist[m]["eval_sm"].append((done, sm))
            hist[m]["eval_dsm"].append((done, dsm))
            hist[m]["seconds_at"][str(done)] = hist[m]["seconds"]

    def checkpoint(done: int) -> None:
        state = {"models": {m: models[m].state_dict() for m in methods},
                 "opts": {m: opts[m].state_dict() for m in methods}, "hist": hist,
                 "step": done, "rng": seeding.get_rng_state(),
                 "args": ckpt_lib.plain_args(args)}
        ckpt_lib.write_checkpoint(ckpt, state)

    def step(i: int) -> dict[str, float]:
        """Iteration i of every method, in rotating order, on one batch and one noise draw."""
        x = train_x[seeding.batch_indices(len(train_x), args.batch_size, i, args.seed,
                                          Dist())]
        k = i % len(methods)
        values = {}
        for m in methods[k:] + methods[:k]:
            torch.manual_seed(seeding.mix(args.seed, 0x1055, i))  # same noise per method
            t0 = time.perf_counter()
            loss = losses[m](models[m], x)
            opts[m].zero_grad(set_to_none=True)
            loss.backward()
            opts[m].step()
            hist[m]["seconds"] += time.perf_counter() - t0
            values[m] = float(loss.detach())
            hist[m]["train"].append((i + 1, values[m]))
        return values

    if start == 0 and not hist[methods[0]]["eval_sm"]:
        evaluate(0)
    try:
        loop.run(step, start=start, stop=args.steps, desc="curves",
                 progress=not args.no_progress,
                 hooks=[loop.Hook(args.eval_every, evaluate, at_end=True),
                        loop.Hook(args.ckpt_every, checkpoint, at_end=True)])
    except loop.NonFiniteLoss as e:
        print(f"error: {e}; try a smaller --lr", file=sys.stderr)
        return 1
    if not os.path.exists(ckpt):
        checkpoint(args.steps)

    result = {"data": data_name, "n_train": len(train_x), "image_size": train_x.shape[-1],
              "steps": args.steps, "config": vars(args), "methods": {}}
    for m in methods:
        h = hist[m]
        flat = flat_from(h["eval_sm"], args.flat_tol)
        flat_dsm = flat_from(h["eval_dsm"], args.flat_tol)
        result["methods"][m] = {
            "final_heldout_exact_sm": h["eval_sm"][-1][1],
            "final_heldout_dsm": h["eval_dsm"][-1][1],
            "flat_from_iteration": flat,
            "converged": converged(flat, h["eval_sm"], args.steps),
            "flat_from_iteration_dsm": flat_dsm,
            "converged_dsm": converged(flat_dsm, h["eval_dsm"], args.steps),
            "ms_per_iteration": 1e3 * h["seconds"] / max(1, len(h["train"])),
            "train_seconds": h["seconds"],
            # The whole series, so the curves can be re-plotted from this file alone.
            "curves": {"eval_sm": h["eval_sm"], "eval_dsm": h["eval_dsm"],
                       "seconds_at": h["seconds_at"]},
        }
    ckpt_lib.save_json(os.path.join(args.out, "metrics.json"), result)
    plot(os.path.join(args.out, "learning_curves.png"), hist, args.steps, pairs)
    for m, r in result["methods"].items():
        print(f"{LABELS[m]:16s} held-out SM {r['final_heldout_exact_sm']:.4g}, DSM "
              f"{r['final_heldout_dsm']:.4g}, {r['ms_per_iteration']:.0f} ms/iter, flat from "
              f"{r['flat_from_iteration']} ({'converged' if r['converged'] else 'NOT flat'})")
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
