"""Sample-quality numbers and pictures for the examples."""

from __future__ import annotations

import math

import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)


def median_bandwidth(reference: torch.Tensor) -> float:
    """Median heuristic: the median pairwise distance within ``reference`` (flattened)."""
    r = reference.flatten(1).double()
    d2 = _sq_dists(r, r)
    iu = torch.triu_indices(len(r), len(r), offset=1)
    return float(d2[iu[0], iu[1]].median().sqrt())


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared kernel MMD with k(a, b) = exp(-||a - b||^2 / (2 bandwidth^2))."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    gamma = 1.0 / (2 * bandwidth**2)
    kxx, kyy, kxy = (torch.exp(-gamma * _sq_dists(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean())


def mmd_report(samples: torch.Tensor, init_noise: torch.Tensor, heldout: torch.Tensor) -> dict:
    """MMD^2 of the samples and of the initial noise against held-out data, same kernel."""
    bw = median_bandwidth(heldout)
    return {
        "mmd2_samples_vs_heldout": mmd2(samples, heldout, bw),
        "mmd2_init_noise_vs_heldout": mmd2(init_noise, heldout, bw),
        "mmd_kernel_bandwidth": bw,
    }


def save_image_grid(path: str, images: torch.Tensor, *, nrow: int | None = None,
                    title: str | None = None) -> None:
    """Save (N, 1, H, W) images in [0, 1] (clipped) as a grid PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images.detach().float().cpu().clamp(0, 1)
    n, _, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 1
    grid = torch.ones(ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h,
             pad + c * (w + pad):pad + c * (w + pad) + w] = images[i, 0]
    fig = plt.figure(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + (0.4 if title else 0)))
    ax = fig.add_axes([0, 0, 1, 0.93 if title else 1])
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_curves(path: str, history: dict, *, train_label: str, eval_label: str) -> None:
    """Training loss (raw + moving average) and held-out loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if history["train"]:
        s, v = zip(*history["train"], strict=True)
        axes[0].plot(s, v, lw=0.5, alpha=0.4, label="per step")
        k = max(1, len(v) // 50)
        if k > 1:
            t = torch.tensor(v, dtype=torch.float64)
            ma = torch.nn.functional.avg_pool1d(t[None, None], k, stride=1)[0, 0]
            axes[0].plot(s[k - 1:], ma.tolist(), lw=1.5, label=f"moving average ({k})")
        axes[0].legend()
    axes[0].set(xlabel="step", ylabel="loss", title=train_label)
    if history["eval"]:
        s, v = zip(*history["eval"], strict=True)
        axes[1].plot(s, v, "o-")
    axes[1].set(xlabel="step", ylabel="loss", title=eval_label)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines and min(min(line.get_ydata()) for line in ax.lines) < 0 < max(
                max(line.get_ydata()) for line in ax.lines):
            ax.set_yscale("symlog", linthresh=1.0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
