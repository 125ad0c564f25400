"""Benchmark 1: cost of one training step (loss + backward) against the data dimension d.

MLP energy model (softplus), batch 128, d in {2, 8, 32, 128, 512, 784, 3072}: exact score
matching (autograd Hessian trace, ``exact_sm_loss(create_graph=True)``), SSM, SSM-VR, DSM
(double backward through the model), FD-SSM and FD-DSM along the residual (one model call on
the stacked batch, one ordinary backward), and the same two estimators with
``derivatives="forward"`` (their eps -> 0 limits by forward-mode AD, then one backward). The
exact trace costs O(d) model passes, everything else O(1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

import fdsm_ext

from .harness import Section, Target, md_table, measure, plot_setup, ratio, run_module

METHODS = ("exact_sm", "ssm", "ssm_vr", "dsm", "fd_ssm", "fd_dsm", "fd_ssm_fwd",
           "fd_dsm_residual_fwd")
LABELS = {
    "exact_sm": "exact SM (Hessian trace)",
    "ssm": "SSM",
    "ssm_vr": "SSM-VR",
    "dsm": "DSM",
    "fd_ssm": "FD-SSM",
    "fd_dsm": "FD-DSM (residual)",
    "fd_ssm_fwd": "FD-SSM (forward mode)",
    "fd_dsm_residual_fwd": "FD-DSM (residual, forward mode)",
}
# Ratio rows: FD against autograd, forward mode against autograd and against FD.
RATIOS = (("fd_ssm", "ssm"), ("fd_ssm", "ssm_vr"), ("fd_dsm", "dsm"), ("fd_ssm_fwd", "ssm"),
          ("fd_dsm_residual_fwd", "dsm"), ("fd_ssm_fwd", "fd_ssm"),
          ("fd_dsm_residual_fwd", "fd_dsm"), ("exact_sm", "fd_ssm"))

FULL = dict(dims=(2, 8, 32, 128, 512, 784, 3072), batch=128, hidden=256, exact_max_d=784,
            rounds=3, reps=3, exact_reps=1, warmup=1)
QUICK = dict(dims=(2, 32), batch=16, hidden=32, exact_max_d=32, rounds=2, reps=2,
             exact_reps=1, warmup=1)


class MLPEnergy(nn.Module):
    """E(x) = w^T softplus(W2 softplus(W1 x + b1) + b2) + c, shape (B,)."""

    def __init__(self, d: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.Softplus(), nn.Linear(hidden, hidden), nn.Softplus(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)


def loss_fn(method: str, sigma: float = 0.1, eps: float = 0.1):
    """(model, x) -> loss for one method; energies, every loss in J_SM units."""
    if method == "exact_sm":
        return lambda m, x: fdsm_ext.exact_sm_loss(m, x, output="energy", create_graph=True)
    if method == "ssm":
        return lambda m, x: fdsm_ext.ssm_loss(m, x, output="energy")
    if method == "ssm_vr":
        return lambda m, x: fdsm_ext.ssm_loss(m, x, output="energy", variance_reduction=True)
    if method == "dsm":
        return lambda m, x: fdsm_ext.dsm_loss(m, x, sigma, output="energy")
    if method == "fd_ssm":
        return lambda m, x: fdsm_ext.fd_ssm_loss(m, x, eps=eps, output="energy")
    if method == "fd_dsm":
        return lambda m, x: fdsm_ext.fd_dsm_loss(m, x, sigma, eps=eps, output="energy",
                                                 direction="residual")
    if method == "fd_ssm_fwd":
        return lambda m, x: fdsm_ext.fd_ssm_loss(m, x, output="energy", derivatives="forward")
    if method == "fd_dsm_residual_fwd":
        return lambda m, x: fdsm_ext.fd_dsm_loss(m, x, sigma, output="energy",
                                                 direction="residual", derivatives="forward")
    raise ValueError(f"unknown method {method!r}")


def build(method: str, config: dict, device: str):
    model = MLPEnergy(config["d"], config["hidden"]).to(device)
    x = torch.randn(config["batch"], config["d"], device=device)
    loss = loss_fn(method)

    def step():
        model.zero_grad(set_to_none=True)
        loss(model, x).backward()

    return step


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = QUICK if quick else FULL
    results: dict[int, dict] = {}
    for d in cfg["dims"]:
        methods = [m for m in METHODS if m != "exact_sm" or d <= cfg["exact_max_d"]]
        reps = {m: cfg["exact_reps"] if m == "exact_sm" else cfg["reps"] for m in methods}
        config = dict(d=d, batch=cfg["batch"], hidden=cfg["hidden"])
        print(f"[dimension] d={d}", flush=True)
        results[d] = measure("benchmarks.dimension:build", config, methods, device=device,
                             warmup=cfg["warmup"], rounds=cfg["rounds"], reps=reps,
                             threads=threads)

    def cell(d, m, attr):
        r = results[d].get(m)
        if r is None:
            return "not run"
        if r.error:
            return "error: " + r.error[:60]
        return getattr(r, attr)

    dims = list(cfg["dims"])
    time_rows = [[LABELS[m]] + [cell(d, m, "time_ms") for d in dims] for m in METHODS]
    mem_rows = [[LABELS[m]] + [cell(d, m, "step_mib") for d in dims] for m in METHODS]
    ratio_rows = []
    for num, den in RATIOS:
        row_t = [f"{LABELS[num]} / {LABELS[den]} time"]
        row_m = [f"{LABELS[num]} / {LABELS[den]} memory"]
        for d in dims:
            a, b = results[d].get(num), results[d].get(den)
            ok = a is not None and b is not None and not a.error and not b.error
            row_t.append(ratio(a.time_ms, b.time_ms) if ok else "-")
            row_m.append(ratio(a.step_mib, b.step_mib) if ok else "-")
        ratio_rows += [row_t, row_m]
    head = ["method"] + [f"d={d}" for d in dims]
    skipped = [d for d in dims if d > cfg["exact_max_d"]]
    md = [
        "## 1. Cost against dimension (MLP energy model)\n",
        f"MLP energy d -> {cfg['hidden']} -> {cfg['hidden']} -> 1 (softplus), batch "
        f"{cfg['batch']}, float32, one step = loss + backward to the parameters. Exact SM uses "
        "`exact_sm_loss(create_graph=True)` (d/chunk model calls, each with a double "
        "backward). FD-DSM steps along the DSM residual. The forward-mode rows compute the "
        "same estimators' eps -> 0 limits exactly (`derivatives=\"forward\"`: directional "
        "derivatives by forward-mode AD, then one ordinary backward)."
        + (f" Exact SM not run for d > {cfg['exact_max_d']} (its O(d) cost would dominate "
           "the run time on this machine)." if skipped else "")
        + "\n",
        "Time per step (ms, median):\n",
        md_table(head, time_rows),
        "\nStep memory (MiB above the pre-step baseline; peak RSS on CPU):\n",
        md_table(head, mem_rows),
        "\nRatios (exact SM / FD-SSM is the speed-up of FD-SSM over the Hessian trace):\n",
        md_table(head, ratio_rows),
        "\n![time and memory against d](dimension.png)\n",
    ]
    _plot(results, dims, outdir / "dimension.png")

    target_d = 784 if 784 in dims else max(d for d in dims if d <= cfg["exact_max_d"])
    ex, fd = results[target_d].get("exact_sm"), results[target_d].get("fd_ssm")
    speedup = ratio(ex.time_ms, fd.time_ms) if ex and fd and not ex.error else math.nan
    targets = [Target(f"FD-SSM speed-up over exact SM (Hessian trace), d={target_d}", speedup,
                      ">=", 100.0)]
    data = {str(d): {m: vars(r) for m, r in res.items()} for d, res in results.items()}
    data["fd_dsm_direction"] = "residual"
    return Section("dimension", "Cost against dimension", "\n".join(md), targets, data)


def _plot(results, dims, path: Path) -> None:
    plt = plot_setup()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in METHODS:
        for ax, attr in zip(axes, ("time_ms", "step_mib"), strict=True):
            pts = [(d, getattr(results[d][m], attr)) for d in dims
                   if m in results[d] and not results[d][m].error]
            pts = [(d, v) for d, v in pts if v == v and v > 0]
            if pts:
                style = ("-.^" if m.endswith("_fwd") else "-o" if m.startswith("fd")
                         else "--s")
                ax.plot(*zip(*pts, strict=True), style, label=LABELS[m])
    for ax, ylabel in zip(axes, ("time per step (ms)", "step memory (MiB)"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("dimension d")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    # O(d) guide through the exact-SM points.
    ex = [(d, results[d]["exact_sm"].time_ms) for d in dims
          if "exact_sm" in results[d] and not results[d]["exact_sm"].error]
    if len(ex) >= 2:
        d0, t0 = ex[-1]
        axes[0].plot(dims, [t0 * (d / d0) for d in dims], ":", color="gray", label="O(d) guide")
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss + backward, batch fixed")
    axes[1].set_title("memory above baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_module("dimension", run, argv, __doc__)


if __name__ == "__main__":
    main()
