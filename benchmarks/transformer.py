"""A ViT energy on MNIST-5k: FD score matching with the flash attention kernel beside autograd
score matching, which needs double backward and so the unfused MATH attention backend.

The network is ``examples.common.transformer.ViTEnergy`` (noise-conditional E(x, i) / sigma_i
on train_ebm's ladder), the losses are train_ebm's (``examples.train_ebm.make_loss``:
sigma_i^2-weighted noise-conditional losses). Methods are trained in lockstep pairs (one
process per pair; iteration i of both methods, in alternating order, before iteration i + 1)
from the same initialisation, on the same batches, levels and noise:

* ``ssm`` pair: FD-SSM (flash) and autograd SSM-VR (math);
* ``dsm`` pair: FD-DSM along the DSM residual (flash) and autograd DSM (math).

Time per step is the median over the pair's interleaved steps (loss + backward + Adam);
ratios are within a pair. Peak memory of one step is read in a fresh process per method
(``benchmarks.harness.child_memory``). After training, each model draws samples by train_ebm's
annealed Langevin dynamics, scored by the MNIST classifier of ``examples.common.classifier``
(Frechet distance, label entropies) beside held-out images and the initial noise.

    python -m benchmarks.transformer train --pair ssm --part runs/vit/ssm   # background
    python -m benchmarks.transformer train --pair dsm --part runs/vit/dsm
    python -m benchmarks.transformer collect runs/vit/ssm runs/vit/dsm \
        --out docs/results/vit_ebm_mnist5k.json --figure docs/results/vit_samples.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

PAIRS = {"ssm": ("fd_ssm", "ssm_vr"), "dsm": ("fd_dsm", "dsm")}
ATTENTION = {"fd_ssm": "flash", "fd_dsm": "flash", "ssm_vr": "math", "dsm": "math"}
LABELS = {"fd_ssm": "FD-SSM (flash)", "ssm_vr": "SSM-VR (autograd, math)",
          "fd_dsm": "FD-DSM residual (flash)", "dsm": "DSM (autograd, math)"}
CONFIG = dict(dataset="mnist5k", patch=7, dim=64, depth=3, heads=4, mlp_ratio=2, head_dim=64,
              sigma_max=1.0, sigma_min=0.05, n_sigmas=10, eps=0.1, batch_size=64, lr=5e-4,
              seed=0, n_samples=256, n_steps_each=100, step_lr=5e-5)


def build_model(cfg: dict, attention: str):
    from examples.common.transformer import ViTEnergy
    from fdsm_ext import geometric_sigmas

    sigmas = geometric_sigmas(cfg["sigma_max"], cfg["sigma_min"], cfg["n_sigmas"])
    torch.manual_seed(cfg["seed"])  # same initialisation for every method
    model = ViTEnergy(1, 28, patch=cfg["patch"], dim=cfg["dim"], depth=cfg["depth"],
                      heads=cfg["heads"], mlp_ratio=cfg["mlp_ratio"], head_dim=cfg["head_dim"],
                      sigmas=sigmas, condition="label", attention=attention)
    return model, sigmas


def make_trainer(method: str, cfg: dict):
    """``(model, sigmas, step)``; ``step(x, generator)`` is one Adam step, returns the loss."""
    from examples.train_ebm import make_loss

    model, sigmas = build_model(cfg, ATTENTION[method])
    loss_fn = make_loss(method, sigmas, cfg["eps"], 1, "label", "residual")
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def step(x, g):
        loss = loss_fn(model, x, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return model, sigmas, step


def build_step(method: str, cfg: dict, device: str):
    """Harness builder (child_memory): one training step on a fixed batch."""
    from examples.common.data import load_dataset
    from examples.common.seeding import step_generator

    train_x, _ = load_dataset(cfg["dataset"])
    x = train_x[:cfg["batch_size"]]
    _, _, step = make_trainer(method, cfg)
    return lambda: step(x, step_generator(cfg["seed"], 0, 0, torch.device("cpu")))


def convergence(losses: list[float]) -> dict:
    """Did the curve flatten? Means of the last 10 % of steps and of the 10 % window ending
    30 % before the end: converged when they differ by less than 2 % of |last mean| or by
    less than twice the standard error of that difference (noise-limited)."""
    n = len(losses)
    w = n // 10
    if w < 2:
        return {"converged": None, "note": f"{n} steps: too few to judge"}
    last, earlier = losses[-w:], losses[n - 3 * w:n - 2 * w]
    m1, m0 = statistics.fmean(last), statistics.fmean(earlier)
    se = math.sqrt(statistics.variance(last) / w + statistics.variance(earlier) / w)
    change = m1 - m0
    return {"window_steps": w, "mean_last_window": m1, "mean_window_30pct_before_end": m0,
            "change": change, "change_standard_error": se,
            "converged": abs(change) < 0.02 * abs(m1) or abs(change) < 2 * se}


def curve(losses: list[float], every: int) -> list[list[float]]:
    """[step, mean loss of the ``every`` steps ending there]: a compact learning curve."""
    return [[i + every, statistics.fmean(losses[i:i + every])]
            for i in range(0, len(losses) - every + 1, every)]


def cmd_train(args) -> int:
    from benchmarks.harness import git_commit
    from examples.common import classifier, metrics
    from examples.common.data import load_dataset
    from examples.common.distributed import Dist
    from examples.common.seeding import batch_indices, step_generator
    from fdsm_ext import annealed_langevin_dynamics

    torch.set_num_threads(args.threads)
    cfg = dict(CONFIG, steps=args.steps, n_samples=args.n_samples,
               n_steps_each=args.n_steps_each)
    os.makedirs(args.part, exist_ok=True)
    methods = PAIRS[args.pair]
    train_x, test_x = load_dataset(cfg["dataset"])
    trainers = {m: make_trainer(m, cfg) for m in methods}
    losses: dict[str, list[float]] = {m: [] for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    d = Dist()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    commit = git_commit()  # the code the run starts from (the tree may change while it runs)
    t_start = time.perf_counter()
    done = 0
    for i in range(args.steps):
        x = train_x[batch_indices(len(train_x), cfg["batch_size"], i, cfg["seed"], d)]
        order = methods if i % 2 == 0 else methods[::-1]
        for m in order:
            g = step_generator(cfg["seed"], 0, i, torch.device("cpu"))
            t0 = time.perf_counter()
            value = trainers[m][2](x, g)
            times[m].append(time.perf_counter() - t0)
            if not math.isfinite(value):
                print(f"{m}: non-finite loss at step {i + 1}", file=sys.stderr)
                return 1
            losses[m].append(value)
        done = i + 1
        if done % 100 == 0:
            print(f"step {done}: " + ", ".join(f"{m} {statistics.fmean(losses[m][-100:]):.4g}"
                                               for m in methods), flush=True)
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes} reached at step {done}", flush=True)
            break
    train_seconds = time.perf_counter() - t_start

    part = {"pair": args.pair, "methods": list(methods), "config": cfg, "steps_done": done,
            "max_minutes": args.max_minutes, "threads": args.threads, "started": started,
            "git_commit": commit,
            "train_wall_seconds": train_seconds, "runs": {}}
    for m in methods:
        model, sigmas, _ = trainers[m]
        torch.save(model.state_dict(), os.path.join(args.part, f"{m}.pt"))
        # Sampling needs only first derivatives: every model samples with the flash kernel.
        model.attention = "flash"
        model.eval()
        g = torch.Generator().manual_seed(cfg["seed"] + 99)
        x0 = torch.rand((cfg["n_samples"], *test_x.shape[1:]), generator=g)
        t0 = time.perf_counter()
        samples = annealed_langevin_dynamics(model, x0, sigmas, cfg["n_steps_each"],
                                             cfg["step_lr"], condition="label",
                                             output="energy", denoise=True, generator=g,
                                             progress=False).detach()
        sample_seconds = time.perf_counter() - t0
        torch.save(samples, os.path.join(args.part, f"{m}_samples.pt"))
        ts = sorted(times[m][1:])  # the first step pays one-off allocations
        part["runs"][m] = {
            "label": LABELS[m], "attention": ATTENTION[m],
            "ms_per_step_median": 1000 * statistics.median(ts),
            "ms_per_step_quartiles": [1000 * ts[len(ts) // 4], 1000 * ts[3 * len(ts) // 4]],
            "final_loss_mean_last_100": statistics.fmean(losses[m][-100:]),
            "loss_curve_mean_per_100_steps": curve(losses[m], 100),
            "convergence": convergence(losses[m]),
            "sampling_seconds": sample_seconds,
            "samples_finite": bool(torch.isfinite(samples).all()),
            **metrics.mmd_report(samples, x0, test_x),
            **classifier.classifier_report(cfg["dataset"], None, samples, x0, test_x),
        }
        print(f"{m}: sampled in {sample_seconds:.0f} s, Frechet distance "
              f"{part['runs'][m].get('frechet_distance_samples', float('nan')):.4g}", flush=True)
    a, b = methods
    part["time_ratio_fd_over_autograd"] = (part["runs"][a]["ms_per_step_median"]
                                           / part["runs"][b]["ms_per_step_median"])
    with open(os.path.join(args.part, "part.json"), "w") as f:
        json.dump(part, f, indent=1)
    return 0


def cmd_collect(args) -> int:
    from benchmarks.harness import child_memory, in_fresh_process, machine_info

    parts = []
    for p in args.parts:
        with open(os.path.join(p, "part.json")) as f:
            parts.append(json.load(f))
    runs, samples = {}, {}
    for part in parts:
        for m, r in part["runs"].items():
            mem = in_fresh_process(child_memory, "benchmarks.transformer:build_step",
                                   part["config"], m, "cpu", args.threads, timeout=600)
            runs[m] = dict(r, steps=part["steps_done"], pair=part["pair"], memory=mem)
            samples[m] = torch.load(os.path.join(args.parts[parts.index(part)],
                                                 f"{m}_samples.pt"))
            runs[m]["sample_min_max"] = [float(samples[m].min()), float(samples[m].max())]
    for part in parts:
        a, b = part["methods"]
        runs[a]["step_memory_ratio_fd_over_autograd"] = (
            runs[a]["memory"]["step_mib"] / runs[b]["memory"]["step_mib"])
        runs[a]["time_ratio_fd_over_autograd"] = part["time_ratio_fd_over_autograd"]
    info = machine_info("cpu", args.threads)
    commits = [p["git_commit"] for p in parts]
    model, _ = build_model(parts[0]["config"], "flash")
    cfg = parts[0]["config"]
    out = {
        "description": "ViT energy (examples.common.transformer.ViTEnergy) trained on MNIST-5k "
                       "with FD score matching (flash attention) beside autograd score "
                       "matching (MATH attention; flash has no double backward)",
        "config": cfg,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "flash_double_backward_error": flash_double_backward_error(cfg),
        "runs": runs,
        "provenance": {
            "commands": [
                f"python -m benchmarks.transformer train --pair {p['pair']} --steps "
                f"{p['config']['steps']}"
                + (f" --max-minutes {p['max_minutes']}" if p.get("max_minutes") else "")
                + f" --threads {p.get('threads', 1)} --part {path}"
                for p, path in zip(parts, args.parts, strict=True)]
            + ["python -m benchmarks.transformer collect " + " ".join(args.parts)
               + f" --out {args.out} --figure {args.figure}"],
            "note": "The two pairs ran at the same time, one process each, one torch thread "
                    "each, on a machine shared with other jobs: times are comparable within "
                    "a pair (interleaved steps), less so across pairs."
                    + "".join(f" The {p['pair']} run's {', '.join(p['added_after_run'])} "
                              "were written into its part.json after it ran (from its launch "
                              "command; that version of the script did not store them)."
                              for p in parts if p.get("added_after_run")),
            "convergence": "; ".join(
                f"{LABELS[m]}: " + {True: "flattened", False: "still changing",
                                    None: "too few steps"}[r["convergence"]["converged"]]
                + f" after {r['steps']} steps" for m, r in runs.items()),
            **info,
            # the runs' start and code, not the collection's (recorded as collected_*)
            "collected_date": info["date"], "collected_git_commit": info["git_commit"],
            "date": min(p["started"] for p in parts),
            "code_commit": commits[0] if len(set(commits)) == 1 else commits,
        },
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    save_figure(args.figure, samples)
    print(f"wrote {args.out} and {args.figure}")
    return 0


def flash_double_backward_error(cfg: dict) -> str:
    """The error autograd DSM raises on the ViT with the flash kernel (first line)."""
    from examples.train_ebm import make_loss

    model, sigmas = build_model(cfg, "flash")
    x = torch.rand(2, 1, 28, 28)
    try:
        make_loss("dsm", sigmas, cfg["eps"])(model, x, torch.Generator().manual_seed(0)).backward()
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return "no error"


def save_figure(path: str, samples: dict) -> None:
    """64 samples of each method side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.3))
    for ax, (m, s) in zip(axes, samples.items(), strict=True):
        s = s[:64].clamp(0, 1)[:, 0]
        grid = torch.ones(8 * 29 + 1, 8 * 29 + 1)
        for k in range(len(s)):
            r, c = divmod(k, 8)
            grid[1 + 29 * r:29 * (r + 1), 1 + 29 * c:29 * (c + 1)] = s[k]
        ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(LABELS[m], fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one pair in lockstep, then sample and score")
    t.add_argument("--pair", choices=tuple(PAIRS), required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop training (both methods at the same step) after this long")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--n-samples", type=int, default=CONFIG["n_samples"])
    t.add_argument("--n-steps-each", type=int, default=CONFIG["n_steps_each"],
                   help="annealed Langevin steps per noise level")
    t.add_argument("--part", required=True, help="folder for this pair's results")
    c = sub.add_parser("collect", help="memory per method, then the results JSON and figure")
    c.add_argument("parts", nargs="+")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", default="docs/results/vit_ebm_mnist5k.json")
    c.add_argument("--figure", default="docs/results/vit_samples.png")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_collect(args)


if __name__ == "__main__":
    sys.exit(main())
