"""Benchmark 3: directional derivatives of order T = 1..6.

``fd_directional_derivative(f, x, v, order=T)`` (ONE call of f on the stacked stencil batch
of K points, see ``fd_stencil``) against T nested autograd
derivatives of the same function: t -> f(x + t v) with a per-sample t (B,), differentiated T
times with ``create_graph=True``. Both are followed by a backward to the parameters of f
(the derivative used inside a training loss). f is the MLP energy of benchmark 1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import fdsm_ext

from .dimension import MLPEnergy
from .harness import Section, md_table, measure, plot_setup, ratio, run_module

FULL = dict(orders=(1, 2, 3, 4, 5, 6), d=784, batch=128, hidden=256, step=0.1, rounds=3,
            reps=3, warmup=1)
QUICK = dict(orders=(1, 2, 3), d=16, batch=8, hidden=16, step=0.1, rounds=2, reps=2, warmup=1)


def nested_autograd(f, x, v, order: int):
    """d^T/dt^T f(x + t v) at t = 0 by T nested reverse-mode derivatives in t (B,)."""
    t = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device, requires_grad=True)
    y = f(x + t[:, None] * v)
    for k in range(order):
        (y,) = torch.autograd.grad(y.sum(), t, create_graph=True)
        if k < order - 1 and not y.requires_grad:  # derivative vanished identically
            return y
    return y


def _inputs(config: dict, device: str, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(config["batch"], config["d"], generator=g, dtype=dtype).to(device)
    u = torch.randn(config["batch"], config["d"], generator=g, dtype=dtype)
    v = (config["step"] * u / u.norm(dim=1, keepdim=True)).to(device)
    return x, v


def build(method: str, config: dict, device: str):
    kind, order = method.split(":")
    order = int(order)
    model = MLPEnergy(config["d"], config["hidden"]).to(device)
    x, v = _inputs(config, device)

    def step():
        model.zero_grad(set_to_none=True)
        if kind == "fd":
            y = fdsm_ext.fd_directional_derivative(model, x, v, order=order)
        else:
            y = nested_autograd(model, x, v, order)
        y.sum().backward()

    return step


def accuracy(config: dict, order: int) -> dict:
    """Relative error of the FD derivative against float64 autograd (8 samples), at the steps
    ``fdsm_ext.suggest_step`` gives for float64 and float32, and in float32 at the timing
    runs' fixed step. ``suggest_step`` needs the length on which f varies along v; here it is
    the effective one, ``(mean |f| / mean |g^(T)|)^(1/T)`` from the exact derivative (an
    energy with a large value and a small curvature along v varies slowly)."""
    cfg = dict(config, batch=8)
    torch.manual_seed(0)
    model = MLPEnergy(cfg["d"], cfg["hidden"]).double()
    x, u = _inputs(dict(cfg, step=1.0), "cpu", torch.float64)  # u: unit directions
    exact = nested_autograd(model, x, u, order).detach()  # d^T/dt^T f(x + t u), ||u|| = 1
    scale = float((model(x).detach().abs().mean() / exact.abs().mean()) ** (1 / order))

    def rel_error(h: float, dtype: torch.dtype) -> float:
        m = MLPEnergy(cfg["d"], cfg["hidden"]).to(dtype)
        m.load_state_dict(model.state_dict())
        fd = fdsm_ext.fd_directional_derivative(m, x.to(dtype), (h * u).to(dtype),
                                                order=order).detach().double() / h**order
        return float((fd - exact).norm() / exact.norm().clamp_min(1e-300))

    h64 = fdsm_ext.suggest_step(order, dtype=torch.float64, scale=scale)
    h32 = fdsm_ext.suggest_step(order, dtype=torch.float32, scale=scale)
    with warnings.catch_warnings():  # the fixed step is meant to show the guard's case
        warnings.simplefilter("ignore", fdsm_ext.FDPrecisionWarning)
        fixed = rel_error(cfg["step"], torch.float32)
    return {"scale": scale, "step_float64": h64, "error_float64": rel_error(h64, torch.float64),
            "step_float32": h32, "error_float32": rel_error(h32, torch.float32),
            "fixed_step": cfg["step"], "error_float32_fixed_step": fixed,
            "stencil_points": len(fdsm_ext.fd_stencil(order)[0])}


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = QUICK if quick else FULL
    methods = [f"{k}:{t}" for t in cfg["orders"] for k in ("fd", "ag")]
    config = {k: cfg[k] for k in ("d", "batch", "hidden", "step")}
    print(f"[order] orders {cfg['orders']}", flush=True)
    res = measure("benchmarks.order:build", config, methods, device=device,
                  warmup=cfg["warmup"], rounds=cfg["rounds"], reps=cfg["reps"], threads=threads)
    acc = {str(t): accuracy(config, t) for t in cfg["orders"]}
    rows = []
    for t in cfg["orders"]:
        fd, ag, a = res[f"fd:{t}"], res[f"ag:{t}"], acc[str(t)]
        rows.append([str(t), str(a["stencil_points"]), fd.time_ms, ag.time_ms,
                     ratio(fd.time_ms, ag.time_ms), fd.step_mib, ag.step_mib,
                     ratio(fd.step_mib, ag.step_mib), a["scale"], a["step_float32"],
                     a["error_float32"], a["error_float32_fixed_step"], a["step_float64"],
                     a["error_float64"]])
    head = ["order T", "stencil points K", "FD time (ms)", "autograd time (ms)",
            "FD / autograd time", "FD memory (MiB)", "autograd memory (MiB)",
            "FD / autograd memory", "length scale along v", "suggested step, float32",
            "FD rel. error there",
            f"FD rel. error, float32, step {cfg['step']}", "suggested step, float64",
            "FD rel. error there"]
    errors = [f"{m}: {r.error}" for m, r in res.items() if r.error]
    md = [
        "## 3. Derivative order: one stacked FD call against nested autograd\n",
        f"f = MLP energy (d={cfg['d']}, hidden {cfg['hidden']}), batch {cfg['batch']}, "
        f"float32, ||v|| = {cfg['step']}; one step = the directional derivative of order T "
        "for every sample, then a backward of its sum to f's parameters. FD: "
        "`fd_directional_derivative(f, x, v, order=T)` (accuracy 2: error O(||v||^(T+2))), ONE "
        "call of f on K*B rows. Autograd: T nested `torch.autograd.grad(create_graph=True)` "
        "in a per-sample scalar t.\n",
        md_table(head, rows),
        ("\nErrors: " + "; ".join(errors) + "\n") if errors else "",
        "\n![order](order.png)\n",
    ]
    _plot(rows, outdir / "order.png")
    data = {m: vars(r) for m, r in res.items()}
    data["accuracy"] = acc
    return Section("order", "Derivative order", "\n".join(md), [], data)


def _plot(rows, path: Path) -> None:
    plt = plot_setup()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    orders = [int(r[0]) for r in rows]
    for ax, (i_fd, i_ag), ylabel in zip(axes, ((2, 3), (5, 6)),
                                        ("time per step (ms)", "step memory (MiB)"), strict=True):
        ax.plot(orders, [r[i_fd] for r in rows], "-o", label="FD (one stacked call)")
        ax.plot(orders, [r[i_ag] for r in rows], "--s", label="nested autograd")
        ax.set_xlabel("derivative order T")
        ax.set_ylabel(ylabel)
        ax.set_yscale("symlog" if ylabel.endswith("(MiB)") else "log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_module("order", run, argv, __doc__)


if __name__ == "__main__":
    main()
