"""Benchmark 4: torch.compile.

A training step (zero_grad, loss, backward, Adam step) of the deep-EBM energy network with
the loss function compiled by ``torch.compile`` (``fullgraph=True``: the fused ops have fake
kernels and autograd formulas, so dynamo traces the whole loss and AOTAutograd compiles the
backward) against the same step in eager mode, and against the eager SSM step. For SSM
(double backward: ``torch.autograd.grad(create_graph=True)`` inside the loss) the outcome of
compiling it, with and without ``fullgraph``, is recorded as it happens.

Quick mode uses the ``aot_eager`` backend (same tracing, no code generation) and a tiny
model so that the smoke test stays fast; full mode uses inductor.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fdsm_ext

from .harness import Section, Target, md_table, measure, plot_setup, ratio, run_module

METHODS = ("fd_ssm_eager", "fd_ssm_compiled", "ssm_eager", "ssm_compiled_fullgraph",
           "ssm_compiled", "ssm_compiled_trace_autograd")
LABELS = {
    "fd_ssm_eager": "FD-SSM, eager",
    "fd_ssm_compiled": "FD-SSM, torch.compile(fullgraph=True)",
    "ssm_eager": "SSM, eager",
    "ssm_compiled_fullgraph": "SSM, torch.compile(fullgraph=True)",
    "ssm_compiled": "SSM, torch.compile (graph breaks allowed)",
    "ssm_compiled_trace_autograd": "SSM, torch.compile(fullgraph=True), "
                                   "dynamo trace_autograd_ops=True",
}
FULL = dict(image_size=28, ch=8, head_dim=64, batch=64, backend="inductor", rounds=5, reps=2,
            warmup=2)
QUICK = dict(image_size=8, ch=4, head_dim=16, batch=8, backend="aot_eager", rounds=2, reps=2,
             warmup=2)


def build(method: str, config: dict, device: str):
    from examples.common.models import EnergyNet

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EnergyNet(1, config["image_size"], ch=config["ch"],
                      head_dim=config["head_dim"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    size = config["image_size"]
    x = torch.rand(config["batch"], 1, size, size, device=device)
    if method.startswith("fd_ssm"):
        def loss_fn(x):
            return fdsm_ext.fd_ssm_loss(model, x, output="energy")
    else:
        def loss_fn(x):
            return fdsm_ext.ssm_loss(model, x, output="energy")
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        torch._dynamo.config.trace_autograd_ops = method == "ssm_compiled_trace_autograd"
    if "compiled" in method:
        loss_fn = torch.compile(loss_fn, backend=config["backend"],
                                fullgraph=method != "ssm_compiled")

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        opt.step()

    return step


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = QUICK if quick else FULL
    config = {k: cfg[k] for k in ("image_size", "ch", "head_dim", "batch", "backend")}
    print(f"[compile] backend {cfg['backend']}", flush=True)
    res = measure("benchmarks.compile:build", config, METHODS, device=device,
                  warmup=cfg["warmup"], rounds=cfg["rounds"], reps=cfg["reps"],
                  threads=threads, timeout=1200)
    base = res["ssm_eager"].time_ms
    rows = []
    for m in METHODS:
        r = res[m]
        outcome = "runs" if not r.error else "FAILS: " + r.error.replace("|", "/")[:160]
        rows.append([LABELS[m], outcome, r.time_ms, ratio(r.time_ms, base), r.step_mib])
    head = ["step", "outcome", "time / step (ms)", "time / eager SSM", "step memory (MiB)"]
    fd_c, fd_e = res["fd_ssm_compiled"].time_ms, res["fd_ssm_eager"].time_ms
    md = [
        "## 4. torch.compile\n",
        f"EnergyNet(ch={cfg['ch']}, head_dim={cfg['head_dim']}) on {cfg['image_size']}x"
        f"{cfg['image_size']} images, batch {cfg['batch']}; step = zero_grad + loss + backward "
        f"+ Adam step, the loss function compiled with backend `{cfg['backend']}` (warm-up "
        f"steps, which include compilation, are not timed). Compiled / eager FD-SSM: "
        f"{ratio(fd_c, fd_e):.3g}.\n",
        md_table(head, rows),
        "\n![compile](compile.png)\n",
    ]
    _plot(res, outdir / "compile.png")
    note = (f"compiled / eager FD-SSM = {ratio(fd_c, fd_e):.2f} and eager FD-SSM / eager SSM "
            f"= {ratio(fd_e, base):.2f}: the step is convolution-bound, and inductor keeps the "
            "convolutions as external oneDNN kernels (it fuses only the elementwise ops)"
            if device == "cpu" and cfg["backend"] == "inductor" else
            f"compiled / eager FD-SSM = {ratio(fd_c, fd_e):.2f}, eager FD-SSM / eager SSM = "
            f"{ratio(fd_e, base):.2f}")
    targets = [Target("compiled FD-SSM step / eager SSM step", ratio(fd_c, base), "<=", 0.20,
                      note)]
    data = {m: vars(r) for m, r in res.items()} | {"config": cfg}
    return Section("compile", "torch.compile", "\n".join(md), targets, data)


def _plot(res, path: Path) -> None:
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    names = [LABELS[m] if not res[m].error else LABELS[m] + " (fails)" for m in METHODS]
    vals = [0.0 if res[m].error else res[m].time_ms for m in METHODS]
    ax.barh(names, vals, color=["C1", "C1", "C0", "C0", "C0", "C0"])
    ax.invert_yaxis()
    ax.set_xlabel("time per training step (ms)")
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_module("compile", run, argv, __doc__)


if __name__ == "__main__":
    main()
