"""Benchmark 5: the fused fdsm ops against their composed PyTorch equivalents.

B = 128 samples of shape (3, 32, 32) (d = 3072), float32, K = 3 stencil blocks (offsets
0, +1, -1: scalar FD-SSM). Every row is forward + backward (the training case) unless marked
"forward"; each timed sample runs the op ``inner`` times.

* stencil batch: fused ``random_stencil_batch`` (Philox directions, normalisation, scaling
  and the K shifted copies in one pass) against ``randn`` + ``norm`` + scale + ``cat``;
* reductions: ``fd_combine``, ``fd_ssm_scalar``, ``fd_ssm_score``, ``fd_dsm_scalar`` against
  the obvious torch expressions (``fdsm_ext.reference``, the test oracle);
* the whole ``fd_ssm_loss`` + backward of a small conv EBM: the time spent outside the
  model's own forward/backward (measured by timing the model alone on the stacked batch),
  for the library and for a plain-PyTorch FD-SSM in the style of the authors' code.
"""

from __future__ import annotations

from pathlib import Path

import torch

import fdsm_ext
from fdsm_ext import _ops, reference

from .harness import Section, md_table, measure, plot_setup, ratio, run_module

OPS = ("stencil_forward", "stencil", "stencil_given_v", "fd_combine", "fd_ssm_scalar_forward",
       "fd_ssm_scalar", "fd_ssm_score_forward", "fd_ssm_score", "fd_dsm_scalar")
OP_LABELS = {
    "stencil_forward": "stencil batch (forward)",
    "stencil": "stencil batch",
    "stencil_given_v": "stencil batch, v given (no RNG, no norm: `stencil_batch` vs `cat`)",
    "fd_combine": "fd_combine (K=3, vector outputs)",
    "fd_ssm_scalar_forward": "fd_ssm_scalar (forward)",
    "fd_ssm_scalar": "fd_ssm_scalar",
    "fd_ssm_score_forward": "fd_ssm_score (variance-reduced, forward)",
    "fd_ssm_score": "fd_ssm_score (variance-reduced)",
    "fd_dsm_scalar": "fd_dsm_scalar",
}
STEPS = ("step_library", "step_composed", "model_only")
STEP_LABELS = {
    "step_library": "fd_ssm_loss + backward (library, fused ops)",
    "step_composed": "plain-PyTorch FD-SSM + backward (randn/norm/cat, torch formula)",
    "model_only": "model alone: forward + backward on the stacked batch (3B rows)",
}
FULL = dict(batch=128, shape=(3, 32, 32), inner=20, rounds=5, reps=3, ch=8, head_dim=64,
            step_rounds=5, step_reps=2, eps=0.1)
QUICK = dict(batch=8, shape=(3, 8, 8), inner=2, rounds=2, reps=2, ch=4, head_dim=16,
             step_rounds=2, step_reps=1, eps=0.1)


def composed_stencil(x2, eps):
    g = torch.randn_like(x2)
    v = g * (eps / g.norm(dim=1, keepdim=True))
    return torch.cat([x2, x2 + v, x2 - v]), v


def _op_step(op: str, impl: str, config: dict, device: str):
    b = config["batch"]
    d = 1
    for s in config["shape"]:
        d *= s
    eps = config["eps"]
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=False):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_(grad)

    ref = impl == "composed"
    if op in ("stencil_forward", "stencil"):
        x = rnd(b, d, grad=op == "stencil")
        grad_out = rnd(3 * b, d)
        seed = _ops.draw_seed(device)

        def one():
            if ref:
                stacked, _ = composed_stencil(x, eps)
            else:
                stacked, _ = _ops.random_stencil_batch(x, seed, (0.0, 1.0, -1.0), 1, "sphere",
                                                       eps)
            if op == "stencil":
                stacked.backward(grad_out)
        return one
    if op == "stencil_given_v":
        x = rnd(b, d, grad=True)
        v = rnd(b, d) * (eps / d**0.5)
        grad_out = rnd(3 * b, d)
        if ref:
            return lambda: torch.cat([x, x + v, x - v]).backward(grad_out)
        return lambda: _ops.stencil_batch(x, v, (0.0, 1.0, -1.0)).backward(grad_out)
    if op == "fd_combine":
        y = rnd(3 * b, d, grad=True)
        w = (-2.0, 1.0, 1.0)
        fn = reference.fd_combine if ref else _ops.fd_combine
        grad_out = rnd(b, d)
        return lambda: fn(y, w).backward(grad_out)
    if op.startswith("fd_ssm_scalar"):
        f = rnd(3 * b, grad=op == "fd_ssm_scalar")
        fn = reference.fd_ssm_scalar if ref else _ops.fd_ssm_scalar
        if op.endswith("_forward"):
            return lambda: fn(f, 1, d / eps**2, -1.0)
        return lambda: fn(f, 1, d / eps**2, -1.0).sum().backward()
    if op.startswith("fd_ssm_score"):
        s = rnd(2 * b, d, grad=op == "fd_ssm_score")
        v = rnd(b, d) * (eps / d**0.5)
        fn = reference.fd_ssm_score if ref else _ops.fd_ssm_score
        if op.endswith("_forward"):
            return lambda: fn(s, v, 1, True, d / eps**2)
        return lambda: fn(s, v, 1, True, d / eps**2).sum().backward()
    if op == "fd_dsm_scalar":
        f = rnd(2 * b, grad=True)
        v, target = rnd(b, d) * (eps / d**0.5), rnd(b, d)
        if ref:
            return lambda: reference.fd_dsm_scalar(f, v, target, d / (2 * eps**2), -1.0)[0] \
                .sum().backward()
        return lambda: _ops.fd_dsm_scalar(f, v, target, d / (2 * eps**2), -1.0).sum().backward()
    raise ValueError(op)


def composed_fd_ssm_loss(model, x, eps):
    """FD-SSM for an energy model in plain PyTorch (the authors' style)."""
    b, d = x.shape[0], x[0].numel()
    stacked, _ = composed_stencil(x.reshape(b, -1), eps)
    e = model(stacked.reshape(-1, *x.shape[1:]))
    e0, ep, em = e.split(b)
    # log-density L = -E
    per = 0.125 * (em - ep) ** 2 - (ep + em - 2 * e0)
    return (d / eps**2) * per.mean()


def build(method: str, config: dict, device: str):
    if method in STEPS:
        from examples.common.models import EnergyNet

        c, h, w = config["shape"]
        model = EnergyNet(c, h, ch=config["ch"], head_dim=config["head_dim"]).to(device)
        x = torch.rand(config["batch"], c, h, w, device=device)
        stacked = torch.rand(3 * config["batch"], c, h, w, device=device)
        eps = config["eps"]

        def step():
            model.zero_grad(set_to_none=True)
            if method == "step_library":
                loss = fdsm_ext.fd_ssm_loss(model, x, eps=eps, output="energy")
            elif method == "step_composed":
                loss = composed_fd_ssm_loss(model, x, eps)
            else:
                loss = model(stacked).sum()
            loss.backward()
        return step
    impl, op = method.split(":")
    one = _op_step(op, impl, config, device)
    inner = config["inner"]

    def run_inner():
        for _ in range(inner):
            one()
    return run_inner


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = QUICK if quick else FULL
    config = {k: cfg[k] for k in ("batch", "shape", "inner", "ch", "head_dim", "eps")}
    methods = [f"{impl}:{op}" for op in OPS for impl in ("fused", "composed")]
    print("[fused_ops] ops", flush=True)
    res = measure("benchmarks.fused_ops:build", config, methods, device=device, warmup=2,
                  rounds=cfg["rounds"], reps=cfg["reps"], threads=threads)
    rows = []
    for op in OPS:
        f, c = res[f"fused:{op}"], res[f"composed:{op}"]
        n = cfg["inner"]
        rows.append([OP_LABELS[op], 1e3 * f.time_ms / n, 1e3 * c.time_ms / n,
                     ratio(f.time_ms, c.time_ms), f.step_mib, c.step_mib,
                     f.error or c.error or ""])
    print("[fused_ops] whole step", flush=True)
    steps = measure("benchmarks.fused_ops:build", config, list(STEPS), device=device, warmup=2,
                    rounds=cfg["step_rounds"], reps=cfg["step_reps"], threads=threads)
    t_model = steps["model_only"].time_ms
    step_rows = []
    for m in STEPS:
        t = steps[m].time_ms
        outside = t - t_model if m != "model_only" else float("nan")
        step_rows.append([STEP_LABELS[m], t, outside if m != "model_only" else "-",
                          100 * ratio(outside, t) if m != "model_only" else "-",
                          steps[m].step_mib])
    b, shape = cfg["batch"], "x".join(map(str, cfg["shape"]))
    md = [
        "## 5. Fused ops against composed PyTorch\n",
        f"B = {b}, x of shape ({shape}), float32, K = 3 (offsets 0, +1, -1); forward + "
        f"backward unless marked; {cfg['inner']} calls per timed sample, median of "
        f"{cfg['rounds']} x {cfg['reps']} samples. Composed = `randn` + `norm` + scale + `cat` "
        "for the stencil batch, the `fdsm_ext.reference` torch expressions for the "
        "reductions.\n",
        md_table(["op", "fused (us)", "composed (us)", "fused / composed", "fused memory (MiB)",
                  "composed memory (MiB)", "error"], rows),
        f"\nWhole step, EnergyNet(in_ch={cfg['shape'][0]}, ch={cfg['ch']}, "
        f"head_dim={cfg['head_dim']}), batch {b}: time outside the model's own forward/backward "
        "= step time - model-alone time.\n",
        md_table(["step", "time (ms)", "outside the model (ms)", "outside the model (% of step)",
                  "step memory (MiB)"], step_rows),
        "\n![fused ops](fused_ops.png)\n",
    ]
    _plot(rows, outdir / "fused_ops.png")
    data = {"ops": {m: vars(r) for m, r in res.items()},
            "steps": {m: vars(r) for m, r in steps.items()}, "config": cfg}
    return Section("fused_ops", "Fused ops", "\n".join(md), [], data)


def _plot(rows, path: Path) -> None:
    plt = plot_setup()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    labels = [r[0] for r in rows]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, label="fused")
    ax.barh([i + 0.2 for i in y], [r[2] for r in rows], height=0.4, label="composed PyTorch")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time per call (us), forward + backward unless marked")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    return run_module("fused_ops", run, argv, __doc__)


if __name__ == "__main__":
    main()
