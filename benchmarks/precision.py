"""Precision of FD-SSM: rounding against exact values, by precision, eps and model state.

    python -m benchmarks.precision [--quick] [--threads N]
        -> benchmarks/results/<full|quick>/precision.json (and .md)

Part 1, the estimators. A 784-256-256-1 softplus MLP energy and a 3-layer conv energy
(5x5 kernels, stride 2, softplus, linear head) on 28x28 images, each freshly initialised and
briefly trained (300 resp. 100 steps of sliced score matching by autograd, Adam; not
converged), are evaluated on held-out images
with :func:`fdsm_ext.fd_ssm_loss` (sphere directions), ``derivatives="fd"`` at several eps
and ``derivatives="forward"`` (the eps -> 0 limit by forward-mode AD), in float64, float32
and under bfloat16 autocast. The reference is the exact sliced score-matching value with the
SAME directions (those the float32 call draws for its seed), in float64 by nested autograd:
per sample d/eps^2 (1/2 (g.v)^2 + v^T H v), g and H the gradient and Hessian of the
log-density. Per row: the per-sample rms error relative to the mean |reference|, the error
of the batch mean (one projection) relative to the mean |reference|, the error of the mean
over ``projections`` projections (64 MLP, 16 conv) relative to its reference (the
expectation the loss estimates), and for "fd" the precision guard's ratio (its floor over
the mean |value|), whether it warned, and the ratio of the formula u*mean|L|*d/eps^2 alone.
float64 "fd" rows are the truncation error alone.

Part 2, the guard against measured errors: a fixed 8-d MLP energy with outputs near 15 (the
model of python_tests/test_precision.py), 256 samples, float32, bfloat16 autocast and float16
outputs over a grid of eps, against the same model in float64 with the same directions
(rounding only): the guard's floor, ratio, verdict, and the measured per-sample rms error and
batch-mean error relative to the typical per-sample value.

Seeds: torch.manual_seed(0) before each model, directions seed 3 (per-sample rows) and 5
(the mean over projections), training batches from Generator(0).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fdsm_ext
from fdsm_ext import _guard, _ops
from fdsm_ext._random import resolve_seed

from .harness import Section, base_parser, fmt, machine_info, md_table, write_section

FULL = dict(batch={"mlp": 128, "conv": 64}, hidden=256, channels=(32, 64, 64),
            eps=(0.03, 0.1, 0.3), projections={"mlp": 64, "conv": 16},
            train_steps={"mlp": 300, "conv": 100}, train_batch=64, lr=1e-3,
            n_train=4096, guard_samples=256,
            guard_grid={"float32": (1e-4, 1e-3, 2.5e-3, 4e-3, 1e-2, 0.1, 1.0),
                        "bfloat16 autocast": (1e-2, 0.1, 0.3, 0.5, 0.6, 1.0),
                        "float16 outputs": (1e-3, 1e-2, 0.1, 0.2, 0.3, 1.0)})
QUICK = dict(batch={"mlp": 8, "conv": 4}, hidden=16, channels=(4, 8, 8), eps=(0.1,),
             projections={"mlp": 4, "conv": 4}, train_steps={"mlp": 3, "conv": 3},
             train_batch=8, lr=1e-3, n_train=64,
             guard_samples=32,
             guard_grid={"float32": (1e-3, 0.1), "bfloat16 autocast": (0.1, 1.0),
                         "float16 outputs": (0.1,)})
PRECISIONS = ("float64", "float32", "bfloat16 autocast")
SEED_ROWS, SEED_MEAN = 3, 5


class MLPEnergy(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                                 nn.Softplus(), nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x.reshape(x.shape[0], -1))[:, 0]


class ConvEnergy(nn.Module):
    def __init__(self, side: int, channels: tuple[int, int, int]):
        super().__init__()
        a, b, c = channels
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, a, 5, 2, 2), nn.Softplus(), nn.Conv2d(a, b, 5, 2, 2), nn.Softplus(),
            nn.Conv2d(b, c, 5, 2, 2), nn.Softplus(), nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, 1, side, side)).shape[1]
        self.head = nn.Linear(n, 1)

    def forward(self, x):
        return self.head(self.features(x.reshape(-1, 1, self.side, self.side)))[:, 0]


def make_model(kind: str, side: int, cfg: dict) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return MLPEnergy(side * side, cfg["hidden"])
    return ConvEnergy(side, cfg["channels"])


def train(model: nn.Module, images: torch.Tensor, steps: int, cfg: dict) -> float:
    """Sliced score matching by autograd (variance reduced), Adam; returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), cfg["lr"])
    gen = torch.Generator().manual_seed(0)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        x = images[torch.randint(len(images), (cfg["train_batch"],), generator=gen)]
        loss = fdsm_ext.ssm_loss(model, x.flatten(1), output="energy", variance_reduction=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


def directions(x: torch.Tensor, seed: int, projections: int, eps: float) -> torch.Tensor:
    """The sphere directions v (P B, d), projection-major, that fd_ssm_loss draws for
    ``seed`` on the float32 batch x."""
    key = resolve_seed(seed, None, x.device, "precision")
    _, v = _ops.random_stencil_batch(x, key, (0.0,), projections, "sphere", eps)
    return v


def exact_sliced(model64: nn.Module, x: torch.Tensor, v: torch.Tensor, eps: float,
                 chunk: int = 16) -> torch.Tensor:
    """Per-sample d/eps^2 (1/2 (g.v)^2 + v^T H v), averaged over the projections, in float64
    by nested autograd (``chunk`` projections at a time); g, H of the log-density -E."""
    batch, d = x.shape
    projections = v.shape[0] // batch
    total = torch.zeros(batch, dtype=torch.float64)
    for start in range(0, projections, chunk):
        vv = v[start * batch:(start + chunk) * batch].double()
        xs = x.double().repeat(vv.shape[0] // batch, 1).requires_grad_(True)
        log_density = -model64(xs)
        (g,) = torch.autograd.grad(log_density.sum(), xs, create_graph=True)
        gv = (g * vv).sum(1)
        (hv,) = torch.autograd.grad(gv.sum(), xs)
        per_row = d / eps**2 * (0.5 * gv.detach() ** 2 + (hv * vv).sum(1))
        total += per_row.reshape(-1, batch).sum(0)
    return total / projections


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def as_precision(model: nn.Module, precision: str) -> nn.Module:
    return copy.deepcopy(model).double() if precision == "float64" else model


def guarded(fn, *args):
    """fn(*args) with a fresh guard; returns (result, warned, (floor, typical) or None)."""
    seen = []
    report = _guard._report

    def recording(numbers, context):
        seen.append(numbers)
        report(numbers, context)

    fdsm_ext.precision._calls.clear()
    _guard._report = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fdsm_ext.FDPrecisionWarning)
            result = fn(*args)
    finally:
        _guard._report = report
    return result, bool(caught), (seen[0] if seen else None)


def fd_call(model, x, precision, derivatives, eps, seed, projections, reduction):
    xx = x.double() if precision == "float64" else x
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16 autocast"):
        return fdsm_ext.fd_ssm_loss(model, xx, eps=eps, output="energy", seed=seed,
                                    n_projections=projections, derivatives=derivatives,
                                    reduction=reduction).detach().double()


def measure_state(model: nn.Module, x: torch.Tensor, projections: int, cfg: dict) -> dict:
    """Every (precision, derivatives, eps) row for one model state on the batch x (B, d)."""
    d = x.shape[1]
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        mean_abs_output = model(x).abs().mean().item()
    rows, refs = [], {}
    for eps in cfg["eps"]:
        for precision in PRECISIONS:
            # The reference uses the directions that the call draws: in x's dtype.
            xd = x.double() if precision == "float64" else x
            if (eps, xd.dtype) not in refs:
                refs[eps, xd.dtype] = (
                    exact_sliced(model64, x, directions(xd, SEED_ROWS, 1, eps), eps),
                    exact_sliced(model64, x, directions(xd, SEED_MEAN, projections, eps),
                                 eps).mean().item())
            ref, ref_mean = refs[eps, xd.dtype]
            scale = ref.abs().mean().item()
            m = as_precision(model, precision)
            for derivatives in ("fd", "forward"):
                if derivatives == "forward" and eps != cfg["eps"][0]:
                    continue  # the eps -> 0 limit: the same at every eps (directions scale)
                got, warned, guard = guarded(fd_call, m, x, precision, derivatives, eps,
                                             SEED_ROWS, 1, "none")
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore", fdsm_ext.FDPrecisionWarning)
                    mean = fd_call(m, x, precision, derivatives, eps, SEED_MEAN, projections,
                                   "mean").item()
                error = got - ref
                row = {"precision": precision, "derivatives": derivatives,
                       "eps": eps if derivatives == "fd" else None,
                       "rms_rel": error.pow(2).mean().sqrt().item() / scale,
                       "batch_mean_err_rel": abs(error.mean().item()) / scale,
                       "mean": mean, "ref_mean": ref_mean,
                       "mean_err_rel": abs(mean - ref_mean) / abs(ref_mean),
                       "typical": scale}
                if derivatives == "fd" and precision != "float64":
                    u = fdsm_ext.unit_roundoff(torch.bfloat16 if "bfloat16" in precision
                                               else torch.float32)
                    floor, typical = guard
                    row |= {"guard_ratio": _ratio(floor, typical), "guard_warned": warned,
                            "formula_ratio": _ratio(u * mean_abs_output * d / eps**2, typical)}
                rows.append(row)
    return {"mean_abs_output": mean_abs_output, "projections": projections, "rows": rows}


# ---------------------------------------------------------------------------------------
# Part 2: the guard against measured errors on a fixed 8-d energy (outputs near 15).

GUARD_D = 8


class GuardEnergy(nn.Module):
    """E(x) = ||x||^2 / 2 + MLP(x), the MLP's output bias 15 (python_tests/test_precision)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(GUARD_D, 64), nn.Softplus(), nn.Linear(64, 64),
                                 nn.Softplus(), nn.Linear(64, 1), nn.Flatten(0))
        with torch.no_grad():
            self.net[4].bias.fill_(15.0)

    def forward(self, x):
        return 0.5 * (x * x).sum(1) + self.net(x)


class HalfOutputs(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).half()


def guard_grid(cfg: dict) -> list[dict]:
    model = GuardEnergy()
    model64 = copy.deepcopy(model).double()
    x = torch.randn(cfg["guard_samples"], GUARD_D, generator=torch.Generator().manual_seed(1))
    rows = []
    for precision, grid in cfg["guard_grid"].items():
        m = HalfOutputs(model) if precision == "float16 outputs" else model
        for eps in grid:
            exact = fdsm_ext.fd_ssm_loss(model64, x.double(), eps=eps, output="energy", seed=3,
                                         reduction="none")

            got, warned, (floor, typical) = guarded(fd_call, m, x, precision, "fd", eps, 3, 1,
                                                    "none")
            error, scale = got - exact, exact.abs().mean().item()
            rms = error.pow(2).mean().sqrt().item()
            rows.append({"precision": precision, "eps": eps, "floor": floor,
                         "ratio": _ratio(floor, typical), "warned": warned, "rms_rel": rms / scale,
                         "bias_rel": abs(error.mean().item()) / scale,
                         "floor_over_rms": _ratio(floor, rms)})
    return rows


# ---------------------------------------------------------------------------------------


def load_images(quick: bool, n_train: int, n_heldout: int):
    """Held-out and training images (N, side*side) in [0, 1]: the deep-EBM benchmark's
    (Fashion-MNIST where installed, else MNIST-5k, else scikit-learn's 8x8 digits)."""
    from examples.common.data import load_images as load

    train_x, heldout, name = load("digits" if quick else "auto", n_train, n_heldout)
    return train_x.flatten(1), heldout.flatten(1), train_x.shape[-1], name


def run(quick: bool) -> Section:
    cfg = QUICK if quick else FULL
    n_heldout = max(cfg["batch"].values())
    train_x, heldout, side, dataset = load_images(quick, cfg["n_train"], n_heldout)
    models = {}
    for kind in ("mlp", "conv"):
        x = heldout[: cfg["batch"][kind]]
        model = make_model(kind, side, cfg)
        projections, steps = cfg["projections"][kind], cfg["train_steps"][kind]
        states = {"fresh": measure_state(model, x, projections, cfg)}
        t0 = time.perf_counter()
        last = train(model, train_x, steps, cfg)
        states["trained"] = measure_state(model, x, projections, cfg) | {
            "train_steps": steps, "train_loss": last, "train_s": time.perf_counter() - t0,
            "converged": False}
        models[kind] = states
        print(f"[precision] {kind} done", flush=True)
    grid = guard_grid(cfg)
    config = {k: v for k, v in cfg.items() if k != "guard_grid"}
    data = {"config": config | {"guard_grid": {k: list(v) for k, v in cfg["guard_grid"].items()},
                                "side": side},
            "dataset": dataset, "models": models, "guard_grid": grid}
    return Section("precision", "Precision of FD-SSM", markdown(data), [], data)


def _eps(row) -> str:
    return "limit" if row["eps"] is None else fmt(row["eps"])


def markdown(data: dict) -> str:
    lines = ["## Precision of FD-SSM against exact values", ""]
    for kind, states in data["models"].items():
        for state, s in states.items():
            lines += [f"### {kind}, {state}: mean |E| {fmt(s['mean_abs_output'])}, "
                      f"{s['projections']} projections for the mean", ""]
            rows = [[r["precision"], r["derivatives"], _eps(r), fmt(r["rms_rel"]),
                     fmt(r["batch_mean_err_rel"]), fmt(r["mean_err_rel"]),
                     fmt(r["guard_ratio"]) if "guard_ratio" in r else "",
                     ("warns" if r["guard_warned"] else "quiet") if "guard_ratio" in r else "",
                     fmt(r["formula_ratio"]) if "formula_ratio" in r else ""]
                    for r in s["rows"]]
            lines += [md_table(["precision", "derivatives", "eps", "per-sample rms error",
                                "batch-mean error", "mean over projections: error",
                                "guard ratio", "guard", "formula ratio"], rows), ""]
    lines += ["## The guard against measured errors (8-d energy, outputs near 15)", ""]
    lines.append(md_table(["precision", "eps", "floor / rms error", "ratio", "guard",
                           "per-sample rms error", "batch-mean error"],
                          [[r["precision"], fmt(r["eps"]), fmt(r["floor_over_rms"]),
                            fmt(r["ratio"]), "warns" if r["warned"] else "quiet",
                            fmt(r["rms_rel"]), fmt(r["bias_rel"])]
                           for r in data["guard_grid"]]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    if args.device != "cpu":
        p.error("--device: the precision benchmark runs on the CPU (bfloat16 autocast on cpu)")
    torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    outdir = Path(args.out) / mode
    command = "python -m benchmarks.precision" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()
    section = run(args.quick)
    section.data["wall_s"] = time.perf_counter() - t0
    write_section(section, outdir, machine_info("cpu", args.threads), command)
    path = outdir / "precision.json"
    payload = json.loads(path.read_text())
    payload["provenance"] = {"convergence": (
        "not applicable to the fresh models; the trained ones ran "
        f"{' and '.join(map(str, section.data['config']['train_steps'].values()))} steps "
        "(MLP and conv) of sliced score matching and did not converge (briefly trained on "
        "purpose)")}
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"[precision] done in {section.data['wall_s']:.1f} s -> {outdir}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
