"""Tutorial: score matching on a 2-D toy density (two moons), FD-SSM beside SSM.

Part 1 trains the same energy MLP E(x) (density p(x) = exp(-E(x)) / Z) from the same
initial weights on the same mini-batches twice: with ``fd_ssm_loss`` (one forward on the
stacked batch [x, x+v, x-v], one ordinary backward) and with the autograd baseline
``ssm_loss`` (sliced score matching: a double backward through the Hessian-vector
product). Both are judged by the exact score-matching loss J_SM on held-out points
(``exact_sm_loss``, the Hessian trace by autograd) and by the held-out log-likelihood of
exp(-E) normalised on a grid (possible in 2-D only).

Part 2 trains a noise-conditional score network s(x, i) with ``noise_conditional_loss``
(FD-SSM at every noise level sigma_i) and draws samples with
``annealed_langevin_dynamics`` from uniform noise.

Run ``python docs/tutorial/two_moons.py`` (the settings of the pictures in the docs) or
call ``main(steps=..., out_dir=...)``; python_tests/test_tutorial.py runs it with few steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from torch import nn

import fdsm_ext

LIM = 3.0  # the pictures and the initial sampling noise cover [-LIM, LIM]^2
ENERGY_EPS = 0.05  # Part 1: the FD step (norm of v), below the width of the moons
# Part 2: noise levels, FD step (the norm of v: well below the smallest level, over which the
# smoothed score changes) and the Langevin step size at the smallest level.
SIGMA_MAX, SIGMA_MIN, N_LEVELS = 2.0, 0.05, 10
SCORE_EPS = 0.01
STEP_LR = 2e-4


# ----------------------------------------------------------------------------- data
def two_moons(n: int, seed: int, noise: float = 0.1) -> torch.Tensor:
    """``n`` points of scikit-learn's two moons, standardised by fixed constants."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=noise, random_state=seed)
    x = torch.as_tensor(x, dtype=torch.float32)
    # The moons' centre and spread (measured on many points): keeps the data inside LIM.
    return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])


def distance_to_moons(points: torch.Tensor) -> torch.Tensor:
    """Distance of each point to the noise-free moons (2000 points on the two arcs)."""
    curve = two_moons(2000, seed=0, noise=0.0)
    return torch.cdist(points, curve).min(dim=1).values


# ----------------------------------------------------------------------------- part 1
def energy_mlp(width: int = 128) -> nn.Module:
    """E(x): R^2 -> R, smooth (softplus) so that its score and Hessian exist everywhere."""
    return nn.Sequential(
        nn.Linear(2, width), nn.Softplus(),
        nn.Linear(width, width), nn.Softplus(),
        nn.Linear(width, 1), nn.Flatten(0),
    )


def grid(n: int = 200) -> tuple[torch.Tensor, float]:
    """Cell centres of an n x n grid over [-LIM, LIM]^2 and the cell area."""
    h = 2 * LIM / n
    axis = -LIM + h * (torch.arange(n) + 0.5)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h * h


@torch.no_grad()
def grid_density(energy: nn.Module, n: int = 200) -> torch.Tensor:
    """exp(-E) normalised on the grid: an (n, n) density (rows: y, columns: x)."""
    points, area = grid(n)
    log_p = -energy(points)
    log_p = log_p - torch.logsumexp(log_p, 0) - math.log(area)
    return log_p.exp().reshape(n, n)


@torch.no_grad()
def heldout_log_likelihood(energy: nn.Module, x: torch.Tensor, n: int = 200) -> float:
    """Mean log p(x) of held-out points, p = exp(-E) / Z with Z summed on the grid."""
    points, area = grid(n)
    log_z = torch.logsumexp(-energy(points), 0) + math.log(area)
    return float((-energy(x) - log_z).mean())


def train_energy(method: str, model: nn.Module, train: torch.Tensor, test: torch.Tensor,
                 batches: list[torch.Tensor], seed: int, eval_every: int) -> dict:
    """Adam on ``batches``; the loss noise of step s comes from a generator seeded (seed, s)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve = [(0, float(fdsm_ext.exact_sm_loss(model, test, output="energy")))]
    t0 = time.perf_counter()
    for step, idx in enumerate(batches, start=1):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        x = train[idx]
        if method == "fd_ssm":
            loss = fdsm_ext.fd_ssm_loss(model, x, eps=ENERGY_EPS, output="energy", generator=g)
        else:
            loss = fdsm_ext.ssm_loss(model, x, output="energy", generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == len(batches):
            curve.append((step, float(fdsm_ext.exact_sm_loss(model, test, output="energy"))))
    return {"curve": curve, "seconds": time.perf_counter() - t0,
            "final_exact_sm": curve[-1][1],
            "heldout_log_likelihood": heldout_log_likelihood(model, test)}


# ----------------------------------------------------------------------------- part 2
class ScoreMLP(nn.Module):
    """s(x, i) = MLP([x, log sigma_i]) / sigma_i: a noise-conditional score network.

    The network sees the level through log sigma_i (smooth in the level, unlike a learned
    embedding per level) and its output is divided by sigma_i, the scale of the true score
    of data smoothed by N(0, sigma_i^2 I).
    """

    def __init__(self, sigmas: torch.Tensor, width: int = 128):
        super().__init__()
        self.register_buffer("sigmas", sigmas)
        self.net = nn.Sequential(
            nn.Linear(3, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, width), nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[labels, None]
        return self.net(torch.cat([x, sigma.log()], 1)) / sigma


def train_score(model: ScoreMLP, train: torch.Tensor, batches: list[torch.Tensor],
                seed: int, eps: float) -> list[tuple[int, float]]:
    """FD-SSM at every noise level (``noise_conditional_loss``), Adam, the batches given."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for step, idx in enumerate(batches, start=1):
        g = torch.Generator().manual_seed(seed * 100_003 + step)
        loss = fdsm_ext.noise_conditional_loss(
            model, train[idx], model.sigmas, method="fd_ssm", output="score", eps=eps,
            generator=g,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((step, float(loss.detach())))
    return losses


# ----------------------------------------------------------------------------- pictures
def plot_densities(path: str, train: torch.Tensor, densities: dict[str, torch.Tensor],
                   titles: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(densities), figsize=(4 * (1 + len(densities)), 4.2))
    axes[0].hist2d(train[:, 0].numpy(), train[:, 1].numpy(), bins=100,
                   range=[[-LIM, LIM], [-LIM, LIM]], cmap="viridis")
    axes[0].set_title(f"data ({len(train)} points)")
    for ax, (name, dens) in zip(axes[1:], densities.items()):
        ax.imshow(dens.numpy(), origin="lower", extent=(-LIM, LIM, -LIM, LIM), cmap="viridis")
        ax.set_title(titles[name])
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_curves(path: str, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, res in results.items():
        steps, values = zip(*res["curve"])
        ax.plot(steps, values, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out exact J_SM (lower is better)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_samples(path: str, init: torch.Tensor, samples: torch.Tensor,
                 train: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    panels = [(init, "initial noise"), (samples, "annealed Langevin samples"),
              (train[: len(samples)], "data")]
    for ax, (pts, title) in zip(axes, panels):
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=3, alpha=0.6)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(-LIM, LIM)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{title} ({len(pts)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(steps: int = 3000, score_steps: int = 3000, out_dir: str = "docs/tutorial",
         seed: int = 0, batch_size: int = 256, n_samples: int = 1000,
         n_steps_each: int = 100) -> dict:
    """Run both parts; write PNGs and results.json into ``out_dir``; return the results."""
    os.makedirs(out_dir, exist_ok=True)
    train, test = two_moons(4096, seed=seed), two_moons(1024, seed=seed + 1)
    order = torch.Generator().manual_seed(seed)
    batches = [torch.randint(len(train), (batch_size,), generator=order)
               for _ in range(max(steps, score_steps))]

    # Part 1: one initialisation, copied, so both methods start from the same weights.
    torch.manual_seed(seed)
    init = energy_mlp()
    energy = {}
    results = {"settings": {"steps": steps, "score_steps": score_steps, "seed": seed,
                            "batch_size": batch_size, "energy_eps": ENERGY_EPS,
                            "score_eps": SCORE_EPS,
                            "sigma_max_min_levels": [SIGMA_MAX, SIGMA_MIN, N_LEVELS],
                            "step_lr": STEP_LR, "n_steps_each": n_steps_each,
                            "torch_threads": torch.get_num_threads()}}
    for method in ("fd_ssm", "ssm"):
        energy[method] = copy.deepcopy(init)
        results[method] = train_energy(method, energy[method], train, test, batches[:steps],
                                       seed, eval_every=max(1, steps // 40))
    results["init_heldout_log_likelihood"] = heldout_log_likelihood(init, test)
    titles = {m: f"{label}: held-out log p {results[m]['heldout_log_likelihood']:.2f}"
              for m, label in (("fd_ssm", "FD-SSM"), ("ssm", "SSM"))}
    plot_densities(os.path.join(out_dir, "two_moons_densities.png"), train,
                   {m: grid_density(e) for m, e in energy.items()}, titles)
    plot_curves(os.path.join(out_dir, "two_moons_training.png"),
                {"FD-SSM": results["fd_ssm"], "SSM (autograd)": results["ssm"]})

    # Part 2: a noise-conditional score network and annealed Langevin sampling.
    sigmas = fdsm_ext.geometric_sigmas(SIGMA_MAX, SIGMA_MIN, N_LEVELS)
    torch.manual_seed(seed)
    score = ScoreMLP(sigmas)
    t0 = time.perf_counter()
    score_losses = train_score(score, train, batches[:score_steps], seed, SCORE_EPS)
    results["score_training_seconds"] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed + 99)
    x0 = (2 * torch.rand(n_samples, 2, generator=g) - 1) * LIM
    samples = fdsm_ext.annealed_langevin_dynamics(
        score, x0, sigmas, n_steps_each=n_steps_each, step_lr=STEP_LR, output="score",
        generator=g,
    )
    results["score_final_loss"] = score_losses[-1][1] if score_losses else None
    results["mean_distance_to_moons"] = {
        "initial_noise": float(distance_to_moons(x0).mean()),
        "samples": float(distance_to_moons(samples).mean()),
        "data": float(distance_to_moons(test).mean()),
    }
    plot_samples(os.path.join(out_dir, "two_moons_langevin.png"), x0, samples, train)
    summary = {k: ({n: v for n, v in r.items() if n != "curve"} if isinstance(r, dict) else r)
               for k, r in results.items()}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000, help="energy training steps")
    p.add_argument("--score-steps", type=int, default=3000, help="score network steps")
    p.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    main(steps=a.steps, score_steps=a.score_steps, out_dir=a.out_dir)
    with open(os.path.join(a.out_dir, "results.json")) as f:
        print(f.read(), end="")
