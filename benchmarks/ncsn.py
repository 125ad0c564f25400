"""Benchmark 6: cost of one NCSN training step on 28x28 images.

The noise-conditional score network of ``examples/train_ncsn.py`` (``ScoreNet``, a small
U-Net conditioned on the noise level, 10 levels geometric from 1 to 0.01) on 28x28 inputs,
one step = ``noise_conditional_loss`` + backward + Adam step, for the three methods that
``train_ncsn`` compares: DSM (the score network's output, no derivative of the network),
FD-SSM (variance reduced, 2B stacked rows, one ordinary backward) and autograd SSM-VR
(one Jacobian-vector product by ``autograd.grad(create_graph=True)``, then a backward
through it). Times are interleaved in one fresh process; memory is measured in a fresh
process per method.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .harness import Section, md_table, measure, plot_setup, ratio, run_module

METHODS = ("dsm", "fd_ssm", "ssm_vr")
LABELS = {"dsm": "DSM", "fd_ssm": "FD-SSM (variance reduced)", "ssm_vr": "SSM-VR (autograd)"}
FULL = dict(image_size=28, width=16, batches=(64, 128), rounds=5, reps=2, warmup=2)
QUICK = dict(image_size=12, width=4, batches=(4,), rounds=2, reps=1, warmup=1)


def build(method: str, config: dict, device: str):
    """One training step of ``train_ncsn --method METHOD`` on a fixed random batch."""
    from examples.common.models import ScoreNet
    from examples.train_ncsn import make_loss
    from fdsm_ext import geometric_sigmas

    sigmas = geometric_sigmas(1.0, 0.01, 10)
    torch.manual_seed(0)
    model = ScoreNet(sigmas, in_ch=1, ch=config["width"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    size = config["image_size"]
    x = torch.rand(config["batch"], 1, size, size, device=device)
    loss_fn = make_loss(method, sigmas.to(device), 0.1)
    g = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, x, g).backward()
        opt.step()

    return step


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = QUICK if quick else FULL
    results = {}
    for batch in cfg["batches"]:
        print(f"[ncsn] batch {batch}", flush=True)
        config = dict(image_size=cfg["image_size"], width=cfg["width"], batch=batch)
        results[batch] = measure("benchmarks.ncsn:build", config, METHODS, device=device,
                                 warmup=cfg["warmup"], rounds=cfg["rounds"], reps=cfg["reps"],
                                 threads=threads)
    rows = []
    for batch, res in results.items():
        dsm = res["dsm"]
        for m in METHODS:
            r = res[m]
            if r.error:
                rows.append([batch, LABELS[m], "error: " + r.error[:60], "-", "-", "-"])
                continue
            rows.append([batch, LABELS[m], r.time_ms, ratio(r.time_ms, dsm.time_ms),
                         r.step_mib, ratio(r.step_mib, dsm.step_mib)])
    md = [
        "## 6. NCSN training step at 28x28\n",
        f"ScoreNet(width {cfg['width']}), {cfg['image_size']}x{cfg['image_size']} inputs, "
        "10 noise levels; one step = loss + backward + Adam step. Time: median over "
        f"interleaved rounds ({cfg['rounds']} rounds x {cfg['reps']} repetitions); memory: "
        "peak RSS of one step above the pre-step baseline, in a fresh process.\n",
        md_table(["batch", "method", "ms / step", "/ DSM", "step memory (MiB)", "/ DSM"],
                 rows),
        "\n![time and memory per step](ncsn.png)\n",
    ]
    _plot(results, outdir / "ncsn.png")
    data = {str(b): {m: vars(r) for m, r in res.items()} for b, res in results.items()}
    return Section("ncsn", "NCSN training step at 28x28", "\n".join(md), [], data)


def _plot(results: dict, path: Path) -> None:
    plt = plot_setup()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(results)
    for k, (batch, res) in enumerate(results.items()):
        for ax, attr in zip(axes, ("time_ms", "step_mib"), strict=True):
            values = [getattr(res[m], attr) for m in METHODS]
            ax.bar([i + k * width for i in range(len(METHODS))], values, width,
                   label=f"batch {batch}")
    for ax, ylabel in zip(axes, ("time per step (ms)", "step memory (MiB)"), strict=True):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(METHODS))],
                      [LABELS[m] for m in METHODS], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_module("ncsn", run, argv, __doc__)


if __name__ == "__main__":
    main()
