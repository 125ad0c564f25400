"""NCSN at 28x28 (issue 21): collect the training runs into docs/results/ncsn28.json, plot
their held-out curves, and render the section of docs/results/ncsn.rst.

    python -m docs.render_ncsn28 collect --runs RUNS --code-commit SHA [--sampler JSON]

RUNS holds one ``python -m examples.train_ncsn`` output folder per run, named
``DATASET_METHOD`` (metrics.json, checkpoint.pt, samples.png); ``--sampler`` is the JSON of
``python -m examples.ncsn_sampler_study`` on one of them. The page is rendered by
``python -m docs.render_results render`` like every other results page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from docs.render_results import (
    BENCH,
    NOT_RECORDED,
    RESULTS,
    ROOT,
    code,
    figure,
    fmt,
    heading,
    load,
    provenance,
    rel,
    table,
)

DATA = RESULTS / "ncsn28.json"
GRIDS = RESULTS / "ncsn28"
CURVES_PNG = GRIDS / "curves.png"
METHODS = ("dsm", "fd_ssm", "ssm_vr")
LABELS = {"dsm": "DSM", "fd_ssm": "FD-SSM (variance reduced)", "ssm_vr": "SSM-VR (autograd)"}
# A run has flattened when its best held-out loss over the last quarter of its evaluations
# improves on the best before by less than this fraction.
FLAT_TOL = 0.01
KEYS = ("dataset", "method", "eps", "steps", "batch_size", "sigmas", "n_steps_each", "step_lr",
        "final_heldout_dsm_loss", "sampling_seconds", "frechet_distance_samples",
        "frechet_distance_heldout", "frechet_distance_init_noise",
        "label_entropy_per_sample_samples", "label_entropy_per_sample_heldout",
        "label_entropy_per_sample_init_noise", "label_entropy_of_mean_samples",
        "label_entropy_of_mean_heldout", "label_entropy_of_mean_init_noise",
        "classifier_n_images", "mmd2_samples_vs_heldout", "mmd2_init_noise_vs_heldout")


def flattened(evals: list[list[float]]) -> tuple[bool, float]:
    """(flat, relative improvement of the last quarter's best over the best before)."""
    values = [v for _, v in evals]
    k = max(1, len(values) // 4)
    before, last = min(values[:-k]), min(values[-k:])
    gain = (before - last) / abs(before)
    return gain < FLAT_TOL, gain


def collect(runs: Path, code_commit: str, sampler: Path | None, command: list[str],
            note: str | None = None) -> dict:
    from benchmarks.harness import machine_info
    from examples.common.data import load_dataset

    machine = machine_info("cpu", 1)
    machine.pop("load_average_1_5_15", None)
    GRIDS.mkdir(parents=True, exist_ok=True)
    out: dict = {"runs": [], "flat_tol": FLAT_TOL}
    for folder in sorted(p for p in runs.iterdir() if (p / "metrics.json").exists()):
        m = json.loads((folder / "metrics.json").read_text())
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        history = state["history"]
        flat, gain = flattened(history["eval"])
        grid = f"{folder.name}.png"
        shutil.copyfile(folder / "samples.png", GRIDS / grid)
        args = state["args"]
        n_heldout = len(load_dataset(args["dataset"], args.get("data_dir"),
                                     test_limit=args.get("test_limit"))[1])
        out["runs"].append({k: m.get(k) for k in KEYS} | {
            "run": folder.name, "grid": grid, "converged": flat, "last_quarter_gain": gain,
            "heldout_images": n_heldout,
            "eval_curve": history["eval"], "train_curve": history["train"][::10],
            "width": args["width"], "lr": args["lr"], "seed": args["seed"]})
    if sampler is not None:
        out["sampler_study"] = json.loads(sampler.read_text())
    out["provenance"] = {
        "machine": machine, "code_commit": code_commit, "results_commit": None,
        "date": machine["date"],
        "convergence": f"per run in the table (held-out loss flat within {FLAT_TOL:.0%} over "
                       "the last quarter of the evaluations, or not)",
        "commands": command,
    }
    if note:
        out["provenance"]["note"] = note
    return out


def plot_curves(data: dict, path: Path) -> None:
    """Held-out DSM loss against iterations and against the benchmark's time per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench = load(BENCH / "ncsn.json")
    datasets = sorted({r["dataset"] for r in data["runs"]})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)),
                             squeeze=False)
    for row, ds in zip(axes, datasets, strict=True):
        for r in (r for r in data["runs"] if r["dataset"] == ds):
            it, loss = zip(*r["eval_curve"], strict=True)
            row[0].plot(it, loss, "o-", ms=2, label=LABELS[r["method"]])
            timed = bench["data"].get(str(r["batch_size"]))  # batch sizes it measured
            if timed is not None:
                ms = timed[r["method"]]["time_ms"]
                row[1].plot([i * ms / 1e3 / 60 for i in it], loss, "o-", ms=2,
                            label=LABELS[r["method"]])
        row[0].set(xlabel="iteration", ylabel=f"held-out DSM loss ({ds})", yscale="log")
        row[1].set(xlabel="iterations x benchmarked time per step (min)", yscale="log")
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render(data: dict | None) -> str:
    """The 28x28 section of docs/results/ncsn.rst."""
    if data is None:
        return "\n".join([
            heading("Training runs at 28x28"),
            "Not measured yet. The commands: ``python -m examples.train_ncsn --method METHOD "
            "--dataset mnist5k --width 16 --batch-size 64`` for each method, then "
            "``python -m examples.ncsn_sampler_study --run RUN`` for the sampler settings.",
        ])
    rows = []
    for r in data["runs"]:
        rows.append([r["dataset"], LABELS[r["method"]], r["steps"],
                     fmt(r["final_heldout_dsm_loss"]),
                     "yes" if r["converged"] else f"no ({fmt(100 * r['last_quarter_gain'])} %)",
                     fmt(r["frechet_distance_samples"]),
                     fmt(r["label_entropy_per_sample_samples"]),
                     fmt(r["label_entropy_of_mean_samples"]),
                     fmt(r["mmd2_samples_vs_heldout"])])
    scale = []
    for ds in sorted({r["dataset"] for r in data["runs"]}):
        r = next(r for r in data["runs"] if r["dataset"] == ds)
        for what in ("heldout", "init_noise"):
            scale.append([ds, {"heldout": "held-out images", "init_noise": "initial noise"}[what],
                          fmt(r[f"frechet_distance_{what}"]),
                          fmt(r[f"label_entropy_per_sample_{what}"]),
                          fmt(r[f"label_entropy_of_mean_{what}"])])
    first = data["runs"][0]
    heldout = "; ".join(f"{ds}, {n}" for ds, n in sorted(
        {(r["dataset"], r.get("heldout_images", NOT_RECORDED)) for r in data["runs"]}))
    grids = [figure(f"docs/results/ncsn28/{r['grid']}",
                    f"{r['dataset']}, {LABELS[r['method']]}, {r['steps']} iterations.",
                    width="45%") for r in data["runs"]]
    out = [
        heading("Training runs at 28x28"),
        f"The same ``ScoreNet`` (width {first['width']}), initialisation (seed {first['seed']}) "
        f"and batches for every method: batch {first['batch_size']}, Adam lr {first['lr']}, "
        f"{len(first['sigmas'])} noise levels geometric from {fmt(first['sigmas'][0])} to "
        f"{fmt(first['sigmas'][-1])} (the paper's ladder; the paper's batch is 128, CIFAR-10 "
        f"on a GPU), annealed Langevin dynamics with {first['n_steps_each']} steps per level and "
        f"step_lr {first['step_lr']:g} (the paper's) from uniform noise, then the final "
        "denoising step. Held-out DSM loss: the sigma^2-weighted denoising loss over all "
        "levels on fixed held-out images, noise and levels, a measure the three methods share "
        f"(held-out images: {heldout}). "
        "Sample metrics: the classifier's Frechet distance and label entropies (per sample: "
        "low is confident; of the mean: high is diverse, the maximum is ln 10 = 2.30) of "
        f"{first['classifier_n_images']} samples; MMD^2 against held-out images. Flattened: "
        f"the best held-out loss of the last quarter of the evaluations improves on the best "
        f"before by less than {data['flat_tol']:.0%} (otherwise the improvement is given).",
        "",
        table(["data", "method", "iterations", "held-out DSM loss", "flattened",
               "Frechet distance", "label entropy per sample", "label entropy of the mean",
               "MMD^2"], rows),
        "For scale, the same metrics of held-out images and of the initial uniform noise:",
        "",
        table(["data", "images", "Frechet distance", "label entropy per sample",
               "label entropy of the mean"], scale),
        figure(rel(CURVES_PNG), "Held-out DSM loss against iterations, and against iterations "
               "times the benchmarked time per step (interleaved, on this page above): the "
               "runs themselves shared the CPU, so their own clocks are not comparable."),
        *grids,
    ]
    if "sampler_study" in data:
        out.append(render_sampler(data["sampler_study"]))
    out.append(provenance(data["provenance"], source=rel(DATA)))
    return "\n".join(out)


def render_sampler(s: dict) -> str:
    rows = [[fmt(r["step_lr"]), "yes" if r["denoise"] else "no",
             fmt(r["frechet_distance_samples"]), fmt(r["label_entropy_per_sample_samples"]),
             fmt(r["label_entropy_of_mean_samples"]), fmt(r["mmd2_samples_vs_heldout"])]
            for r in s["settings"]]
    return "\n".join([
        heading("Sampler settings", "~"),
        f"One trained model ({LABELS[s['method']]}, {s['dataset']}, {s['trained_steps']} "
        f"iterations), {s['n_samples']} samples with {s['n_steps_each']} steps per level, from "
        "the same initial noise and Langevin noise in every row: the step size at the smallest "
        "sigma (step_lr; level i uses step_lr (sigma_i / sigma_L)^2) and the final denoising "
        "step x + sigma_L^2 s(x, L).",
        "",
        table(["step_lr", "denoised", "Frechet distance", "label entropy per sample",
               "label entropy of the mean", "MMD^2"], rows),
        code([s["provenance"]["command"]]),
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("collect",))
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--code-commit", required=True)
    p.add_argument("--sampler", type=Path, default=None)
    p.add_argument("--commands", nargs="+", required=True,
                   help="the commands that made the runs (recorded in the results file)")
    p.add_argument("--note", default=None, help="how the runs were made, if not plain")
    args = p.parse_args(argv)
    data = collect(args.runs, args.code_commit, args.sampler, args.commands, args.note)
    DATA.write_text(json.dumps(data, indent=1) + "\n")
    plot_curves(data, CURVES_PNG)
    print(f"wrote {DATA.relative_to(ROOT)} and {CURVES_PNG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
