"""Precision study: FD-SSM under bfloat16 autocast and at tiny eps, and the guard's verdicts.

    python -m benchmarks.precision [--quick]   -> benchmarks/results/precision.md

An 8-d energy MLP (softplus, width 64, output bias initialised to 15: score matching is
blind to the constant, and it gives the energies of order 10-100 that make rounding bite)
is trained in float32 with FD-SSM (eps 0.1, Adam 1e-3, batch 256) on a 4-component Gaussian
mixture. On 1000 held-out points it reports the exact J_SM (Hessian trace, float32) and, for
each precision and eps, the mean +- std of the FD-SSM loss over ``draws`` direction seeds,
whether :class:`fdsm_ext.FDPrecisionWarning` fires (and its estimated ratio), and
:func:`fdsm_ext.suggest_eps`'s eps with the loss there. Seeds: torch.manual_seed(0) for the
model, Generator(0) for training data, Generator(1) for held-out data, Generator(100 + k)
for draw k. Also fd_directional_derivative of order 3 (float32, ||v|| = 0.01 and 0.1)
against nested autograd in float64.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fdsm_ext
from fdsm_ext import precision

from .order import nested_autograd

D = 8
OUT = Path(__file__).parent / "results" / "precision.md"


class Energy(nn.Module):
    """Softplus MLP energy; ``fp32_head`` runs the last layer outside autocast in float32."""

    def __init__(self, fp32_head: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(D, 64), nn.Softplus(), nn.Linear(64, 64),
                                  nn.Softplus())
        self.head = nn.Linear(64, 1)
        self.fp32_head = fp32_head
        with torch.no_grad():
            self.head.bias.fill_(15.0)

    def forward(self, x):
        h = self.body(x)
        if self.fp32_head:
            with torch.autocast(x.device.type, enabled=False):
                return self.head(h.float())[:, 0]
        return self.head(h)[:, 0]


def mixture(n: int, gen: torch.Generator) -> torch.Tensor:
    centers = 2 * torch.randn(4, D, generator=torch.Generator().manual_seed(0))
    return centers[torch.randint(4, (n,), generator=gen)] + 0.7 * torch.randn(n, D, generator=gen)


def _ratio(message) -> str:
    return re.search(r"ratio ([\w.]+)", str(message)).group(1)


def fd_draws(model, x, eps, autocast, draws):
    """FD-SSM values over ``draws`` seeds and the guard's warning (None or its percent)."""
    values, verdict = [], None
    for k in range(draws):
        precision._calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fdsm_ext.FDPrecisionWarning)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fdsm_ext.fd_ssm_loss(model, x, eps=eps, output="energy",
                                            generator=torch.Generator().manual_seed(100 + k))
        values.append(loss.item())
        if caught and verdict is None:
            verdict = _ratio(caught[0].message)
    v = torch.tensor(values)
    return v.mean().item(), v.std().item(), verdict


def run(quick: bool) -> str:
    torch.manual_seed(0)
    steps, draws = (200, 5) if quick else (1500, 50)
    model = Energy()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = fdsm_ext.fd_ssm_loss(model, mixture(256, gen), eps=0.1, output="energy")
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    head = Energy(fp32_head=True)
    head.load_state_dict(model.state_dict())
    x = mixture(1000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        energies = model(x)
    exact = float(fdsm_ext.exact_sm_loss(model, x, output="energy"))

    lines = [
        "# Precision of FD-SSM: bfloat16 autocast and tiny eps (CPU)",
        "",
        f"Command: `python -m benchmarks.precision{' --quick' if quick else ''}`; torch "
        f"{torch.__version__}. Model trained {steps} steps in float32 ({train_s:.0f} s); "
        f"held-out energies {energies.min():.1f} to {energies.max():.1f}; exact J_SM "
        f"{exact:.3f}. Each cell: mean +- std of the batch-mean loss over {draws} direction "
        "seeds; 'guard': the FDPrecisionWarning's ratio of the estimated rounding floor to "
        "the typical per-sample value (blank: no warning, ratio <= 0.3).",
        "",
        "| precision | eps | FD-SSM loss | guard |",
        "|---|---|---|---|",
    ]
    configs = [("float32", model, False, e) for e in (0.05, 0.1, 0.3)]
    configs += [("bfloat16 autocast", model, True, e) for e in (0.05, 0.1, 0.3, 0.6, 1.0)]
    configs += [("bfloat16 autocast, float32 last layer", head, True, e)
                for e in (0.05, 0.1, 0.3, 0.6)]
    configs += [("float32", model, False, e) for e in (1e-3, 1e-4, 1e-5)]
    for name, m, autocast, eps in configs:
        mean, std, verdict = fd_draws(m, x, eps, autocast, draws)
        guard = f"warns: {verdict}" if verdict else ""
        lines.append(f"| {name} | {eps:g} | {mean:.3f} +- {std:.3f} | {guard} |")
        print(lines[-1], flush=True)

    lines += ["", "## suggest_eps", "",
              "| precision | suggested eps | A (bias A eps^2) | B (floor B/eps^2) | "
              "FD-SSM loss at that eps | guard |", "|---|---|---|---|---|---|"]
    for name, m, autocast in [("float32", model, False), ("bfloat16 autocast", model, True),
                              ("bfloat16 autocast, float32 last layer", head, True)]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            s = fdsm_ext.suggest_eps(m, x, output="energy")
        mean, std, verdict = fd_draws(m, x, s.eps, autocast, draws)
        guard = f"warns: {verdict}" if verdict else ""
        lines.append(f"| {name} | {s.eps:.3g} | {s.truncation:.3g} | {s.rounding:.3g} | "
                     f"{mean:.3f} +- {std:.3f} | {guard} |")
        print(lines[-1], flush=True)

    lines += ["", "## fd_directional_derivative, order 3, float32 (exact: nested autograd in "
              "float64)", "", "| norm of v | relative error | guard |", "|---|---|---|"]
    f64 = Energy().double()
    f64.load_state_dict(model.state_dict())
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    direction = direction / direction.norm(dim=1, keepdim=True)
    for h in (0.1, 0.01):
        v = h * direction
        reference = nested_autograd(f64, x.double(), v.double(), 3).detach()
        precision._calls.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fdsm_ext.FDPrecisionWarning)
            approx = fdsm_ext.fd_directional_derivative(model, x, v, order=3).detach()
        err = ((approx.double() - reference).norm() / reference.norm()).item()
        guard = f"warns: {_ratio(caught[0].message)}" if caught else ""
        lines.append(f"| {h:g} | {err:.3g} | {guard} |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    text = run(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
