"""FD-DSM along the residual: collect the runs into one results file, render its docs page.

    python docs/render_fd_dsm.py collect --code-commit SHA   # runs/ -> docs/results/fd_dsm.json
    python docs/render_fd_dsm.py render                      # the json -> docs/results/fd_dsm.rst
    python docs/render_fd_dsm.py check                       # CI: committed page == fresh render

``collect`` reads the outputs of the commands in ``COMMANDS`` (under ``runs/``) and of the
deep-EBM benchmark (``benchmarks/results/full/deep_ebm.json``), keeps what the page shows
with the machine, the commit the runs were started from, each run's date and whether it
converged, and copies the sample grids next to the page. ``render`` writes every number on
the page from that file alone (and plots the learning curves from their stored series).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DATA = RESULTS / "fd_dsm.json"
PAGE = RESULTS / "fd_dsm.rst"
CURVES_PNG = RESULTS / "fd_dsm_curves.png"
GRIDS = RESULTS / "fd_dsm_samples"

# The exact commands whose outputs ``collect`` reads (run from the repository root).
COMMANDS = {
    "learning_curves": [
        "python examples/ebm_learning_curves.py --pairs dsm --methods dsm fd_dsm_residual "
        "--steps 10000 --eval-every 250 --eval-size 4 --ckpt-every 250 --threads 1 "
        "--no-progress --out runs/curves_dsm_residual",
        "python examples/ebm_learning_curves.py --pairs dsm --methods fd_dsm --steps 10000 "
        "--eval-every 250 --eval-size 4 --ckpt-every 250 --threads 1 --no-progress "
        "--out runs/curves_dsm_random --resume",
    ],
    "samples": [
        f"python examples/train_ebm.py --dataset {ds} --method {m} --width 16 --batch-size 64 "
        "--steps 4000 --ckpt-every 250 --eval-every 0 --threads 1 --n-samples 100 "
        f"--eval-size 4 --no-progress --out runs/ebm/{ds}_{m} --resume"
        for ds in ("mnist5k", "fashion_mnist") for m in ("fd_dsm", "dsm")
    ] + [
        "python examples/train_ebm.py --dataset mnist5k --method fd_dsm --eps 0.03 --width 16 "
        "--batch-size 64 --steps 4000 --ckpt-every 250 --eval-every 0 --threads 1 "
        "--n-samples 100 --eval-size 4 --no-progress --out runs/ebm/mnist5k_fd_dsm_eps003 "
        "--resume",
    ],
    "dkef": [
        "OMP_NUM_THREADS=1 python examples/dkef_uci.py --methods dsm fd_dsm "
        "--fd-dsm-direction residual --alpha-directions 11 --seeds 0 1 2 --max-epochs 500 "
        "--no-progress --timing-rounds 30 --out runs/dkef_residual_a11 --resume",
    ],
    "nice": [
        "OMP_NUM_THREADS=1 python examples/nice_mnist.py --methods dsm fd_dsm --epochs 400 "
        "--minutes 30 --eval-every 200 --threads 1 --no-progress "
        "--out runs/nice_mnist5k_residual --resume",
    ],
    "ood": [
        "python examples/ood_detection.py --runs runs/ebm/fashion_mnist_dsm "
        "runs/ebm/fashion_mnist_fd_dsm runs/ebm/mnist5k_dsm runs/ebm/mnist5k_fd_dsm "
        "--threads 1 --no-progress --out runs/ood_residual",
    ],
    "benchmark": ["python -m benchmarks.run --only deep_ebm --threads 1"],
}
LABELS = {"dsm": "DSM (autograd)", "fd_dsm": "FD-DSM (random)",
          "fd_dsm_residual": "FD-DSM (residual)", "fd_dsm_residual_1s":
          "FD-DSM (residual, one-sided)", "model:1": "model alone, B rows",
          "model:2": "model alone, 2B rows"}
SAMPLE_RUNS = ("mnist5k_dsm", "mnist5k_fd_dsm", "mnist5k_fd_dsm_eps003", "fashion_mnist_dsm",
               "fashion_mnist_fd_dsm")
# The gap criterion of the learning curves: after the first 10 % of the run.
SKIP_FRACTION = 0.1


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def _date(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- collect
def collect(code_commit: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import machine_info

    runs = ROOT / "runs"
    out: dict = {"machine": machine_info("cpu", 1), "code_commit": code_commit,
                 "commands": COMMANDS}
    out["machine"].pop("load_average_1_5_15", None)

    curves = {}
    for name in ("curves_dsm_residual", "curves_dsm_random"):
        path = runs / name / "metrics.json"
        m = _load(path)
        if m is None:
            continue
        for method, r in m["methods"].items():
            curves[method] = dict(r, date=_date(path), steps=m["steps"], data=m["data"])
        out["curves_config"] = {k: m["config"][k] for k in (
            "dataset", "n_train", "batch_size", "lr", "width", "head_dim", "sigma", "eps",
            "eval_every", "eval_size", "dsm_eval_size", "flat_tol", "seed")}
    out["learning_curves"] = curves

    keys = ("dataset", "method", "fd_dsm_direction", "eps", "steps", "batch_size",
            "seconds_per_iteration", "sampling_seconds", "frechet_distance_samples",
            "frechet_distance_heldout", "frechet_distance_init_noise",
            "label_entropy_of_mean_samples", "label_entropy_of_mean_heldout",
            "label_entropy_per_sample_samples", "label_entropy_per_sample_heldout",
            "mmd2_samples_vs_heldout", "mmd2_init_noise_vs_heldout", "torch_threads")
    samples = []
    GRIDS.mkdir(parents=True, exist_ok=True)
    for name in SAMPLE_RUNS:
        folder = runs / "ebm" / name
        m = _load(folder / "metrics.json")
        if m is None:
            continue
        samples.append({k: m.get(k) for k in keys} | {
            "date": _date(folder / "metrics.json"),
            "converged": False,  # a fixed budget of 4000 iterations, the same for every run
            "grid": f"{name}.png"})
        shutil.copyfile(folder / "samples.png", GRIDS / f"{name}.png")
    out["samples"] = samples

    path = runs / "dkef_residual_a11" / "metrics.json"
    m = _load(path)
    if m is not None:
        out["dkef"] = {"summary": m["summary"], "date": _date(path),
                       "runs": [{k: r[k] for k in ("method", "seed", "test_nll", "steps",
                                                   "early_stopped")} for r in m["runs"]]}
    path = runs / "nice_mnist5k_residual" / "metrics.json"
    m = _load(path)
    if m is not None:
        # Converged: the validation NLL passed its minimum within the first 2/3 of the run
        # (later it rises: the score-matching objectives overfit the 4500 training images).
        out["nice"] = {"date": _date(path), "runs": [
            {k: r.get(k) for k in ("method", "lr", "steps", "epochs", "test_nll_nats",
                                   "best_val_step", "best_val_test_nll_nats", "test_exact_sm",
                                   "seconds_per_iteration", "interleaved_timing")}
            | {"converged": r["best_val_step"] <= 2 * r["steps"] / 3} for r in m["runs"]]}
    path = runs / "ood_residual" / "metrics.json"
    m = _load(path)
    if m is not None:
        out["ood"] = {"date": _date(path), "rows": [
            {k: r[k] for k in ("dataset", "method", "fd_dsm_direction", "trained_steps",
                               "auroc", "interleaved_ms_per_iter")} for r in m["rows"]]}
    bench = _load(ROOT / "benchmarks" / "results" / "full" / "deep_ebm.json")
    if bench is not None and "fd_dsm_residual" in bench["data"]["time_ms"]:
        d = bench["data"]
        out["benchmark"] = {
            "machine": bench["machine"], "config": d["config"], "time_ms": d["time_ms"],
            "split_ms": d["split_ms"], "step_mib": d["step_mib"],
            "heldout_sm": d["heldout_sm"],
            "residual_gradient_check": d["residual_gradient_check"]}
    return out


# ----------------------------------------------------------------------------- render
def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{digits - 1}e}"
    if abs(v) >= 10 ** (digits - 1):
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def table(head: list[str], rows: list[list]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [head, *rows]:
        lines.append("   * - " + fmt(row[0]))
        lines += [f"     - {fmt(c)}" for c in row[1:]]
    return "\n".join(lines) + "\n"


def code(commands: list[str]) -> str:
    return ".. code-block:: bash\n\n" + "".join(f"   {c}\n" for c in commands)


def curve_gaps(data: dict, method: str, key: str = "eval_dsm") -> tuple[float, int]:
    """Largest relative gap |method - DSM| / DSM over the evaluations after the first 10 %."""
    base = dict(map(tuple, data["learning_curves"]["dsm"]["curves"][key]))
    steps = data["learning_curves"]["dsm"]["steps"]
    gaps = [(abs(v - base[s]) / abs(base[s]), s)
            for s, v in data["learning_curves"][method]["curves"][key]
            if s > SKIP_FRACTION * steps and s in base]
    return max(gaps) if gaps else (math.nan, -1)


def render_curves(data: dict) -> str:
    lc, cfg = data["learning_curves"], data["curves_config"]
    if "dsm" not in lc:
        return ""
    rows = []
    for m, r in lc.items():
        gap = curve_gaps(data, m)[0] if m != "dsm" else None
        rows.append([LABELS[m], r["steps"], r["final_heldout_dsm"], r["final_heldout_exact_sm"],
                     "-" if gap is None else f"{100 * gap:.2f} %",
                     r["flat_from_iteration_dsm"], r["converged_dsm"], r["ms_per_iteration"],
                     r["date"]])
    steps = lc["dsm"]["steps"]
    return "\n".join([
        "Learning curves (deep EBM, Fashion-MNIST)",
        "-----------------------------------------",
        "",
        f"{lc['dsm']['data']}, {cfg['n_train']} training images; the unconditional "
        f"EnergyNet(ch={cfg['width']}, head_dim={cfg['head_dim']}) of the deep-EBM benchmark, "
        f"batch {cfg['batch_size']}, Adam lr {cfg['lr']}, DSM noise sigma {cfg['sigma']}, FD "
        f"eps {cfg['eps']}, seed {cfg['seed']}. Every method starts from the same "
        "initialisation and sees the same batches and the same noise z at every iteration "
        "(each method's values depend on the iteration alone, so methods trained in separate "
        "processes are in lockstep too). Every "
        f"{cfg['eval_every']} iterations: the DSM loss at sigma {cfg['sigma']} on "
        f"{cfg['dsm_eval_size']} held-out images with fixed noise, and the exact SM loss on "
        f"{cfg['eval_size']}. Gap: the largest ``|method - DSM| / DSM`` of the held-out DSM loss "
        f"over the evaluations after the first {100 * SKIP_FRACTION:.0f} % "
        f"({SKIP_FRACTION * steps:.0f} iterations). Flat: every later held-out DSM value within "
        f"{100 * cfg['flat_tol']:.0f} % of the last; converged: flat within the first 2/3 of "
        "the run with 5 or more evaluations after. The clock counts training steps only.",
        "",
        table(["method", "iterations", "held-out DSM loss", "held-out exact SM loss",
               "gap to DSM", "flat from", "converged", "ms / iteration", "date"], rows),
        f".. image:: {CURVES_PNG.name}",
        "   :alt: held-out DSM loss against iterations and training time",
        "",
        code(data["commands"]["learning_curves"]),
    ])


def plot_curves(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m, r in data["learning_curves"].items():
        it, dsm = zip(*r["curves"]["eval_dsm"], strict=True)
        secs = [r["curves"]["seconds_at"][str(s)] for s in it]
        axes[0].plot(it, dsm, "o-", ms=2, label=LABELS[m])
        axes[1].plot(secs, dsm, "o-", ms=2, label=LABELS[m])
        it2, sm = zip(*r["curves"]["eval_sm"], strict=True)
        axes[2].plot(it2, sm, "o-", ms=2, label=LABELS[m])
    axes[0].set(xlabel="iteration", ylabel="held-out DSM loss", yscale="log")
    axes[1].set(xlabel="training wall-clock (s)", ylabel="held-out DSM loss", yscale="log")
    axes[2].set(xlabel="iteration", ylabel="held-out exact SM loss", yscale="symlog")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_samples(data: dict) -> str:
    if not data["samples"]:
        return ""
    by_key = {(r["dataset"], r["method"]): r for r in data["samples"]}
    rows, grids = [], []
    for r in data["samples"]:
        dsm = by_key.get((r["dataset"], "dsm"))
        ratio = (r["frechet_distance_samples"] / dsm["frechet_distance_samples"]
                 if dsm and r["method"] != "dsm" else None)
        name = LABELS["fd_dsm_residual" if r["fd_dsm_direction"] == "residual" else r["method"]]
        if r["method"] != "dsm":
            name += f", eps {r['eps']:g}"
        rows.append([r["dataset"], name, r["steps"], 1e3 * r["seconds_per_iteration"],
                     f"{fmt(r['frechet_distance_samples'])} ({fmt(r['frechet_distance_heldout'])}"
                     f" / {fmt(r['frechet_distance_init_noise'])})",
                     "-" if ratio is None else ratio,
                     f"{fmt(r['label_entropy_of_mean_samples'])} "
                     f"({fmt(r['label_entropy_of_mean_heldout'])})",
                     f"{fmt(r['label_entropy_per_sample_samples'])} "
                     f"({fmt(r['label_entropy_per_sample_heldout'])})",
                     r["mmd2_samples_vs_heldout"], r["date"]])
        grids += [f".. figure:: {GRIDS.name}/{r['grid']}", "   :width: 45%", "",
                  f"   {r['dataset']}, {name}, {r['steps']} iterations", ""]
    return "\n".join([
        "Samples at 28x28",
        "----------------",
        "",
        "``examples/train_ebm.py``: the noise-conditional EnergyNet (width 16), batch 64, "
        "4000 iterations (a fixed budget, not run to convergence, the same for every "
        "method), 100 samples by annealed Langevin dynamics from uniform noise (100 steps "
        "per level, final denoising step). Metrics from the classifier of "
        "``examples/common/classifier.py`` (trained on the real training images): Fréchet "
        "distance of its penultimate features to the training images' (held-out images / "
        "the initial noise in brackets, for scale; lower is better), entropy of the mean "
        "predicted label (all classes present: high, at most 2.30) and mean per-sample "
        "entropy (confident: low), MMD^2 to held-out images. ms / iteration: the training "
        "run's own, with one other single-thread job on the machine.",
        "",
        table(["data", "method", "iterations", "ms / iteration", "Fréchet distance "
               "(held-out / noise)", "Fréchet / DSM's", "entropy of the mean label "
               "(held-out)", "per-sample entropy (held-out)", "MMD^2", "date"], rows),
        *grids,
        code(data["commands"]["samples"]),
    ])


def render_dkef(data: dict) -> str:
    if "dkef" not in data:
        return ""
    s = data["dkef"]["summary"]
    rows = []
    for m, r in s.items():
        inter = r.get("interleaved_seconds_per_iteration")
        rows.append([LABELS["fd_dsm_residual" if m == "fd_dsm" else m],
                     f"{r['test_nll'][0]:.3f} ± {r['test_nll'][1]:.3f}",
                     f"{r['test_exact_sm'][0]:.2f} ± {r['test_exact_sm'][1]:.2f}",
                     None if inter is None else 1e3 * inter["median_s"],
                     f"{r['early_stopped']}/{len(r['seeds'])}"])
    return "\n".join([
        "DKEF on red wine",
        "----------------",
        "",
        "``examples/dkef_uci.py`` (the paper's DKEF setting; ``docs/results/dkef_redwine.md`` "
        "has the other methods). FD-DSM (residual): the loss along the residual, and alpha "
        "fitted in closed form from central differences along d = 11 orthogonal directions "
        "per sample (DSM fits it from the exact Jacobian). Three seeds, same initialisation "
        "and batches per seed. Converged: runs that early-stopped (200 steps without a "
        "better validation loss) within 500 epochs.",
        "",
        table(["method", "test NLL (nats, mean ± std)", "test exact SM", "ms / iteration, "
               "interleaved", "early-stopped"], rows),
        f"Date: {data['dkef']['date']}.",
        "",
        code(data["commands"]["dkef"]),
    ])


def render_nice(data: dict) -> str:
    if "nice" not in data:
        return ""
    rows = []
    for r in data["nice"]["runs"]:
        t = r.get("interleaved_timing") or {}
        rows.append([LABELS["fd_dsm_residual" if r["method"] == "fd_dsm" else r["method"]],
                     r["lr"], r["steps"], r["best_val_test_nll_nats"], r["best_val_step"],
                     r["test_nll_nats"], r["test_exact_sm"], 1e3 * r["seconds_per_iteration"],
                     1e3 * t["median_s"] if "median_s" in t else None, r["converged"]])
    return "\n".join([
        "NICE on MNIST-5k",
        "----------------",
        "",
        "``examples/nice_mnist.py`` (the paper's NICE setting at 400 epochs; "
        "``docs/results/nice_mnist.md`` has the other methods), sigma 0.1, eps 0.1, the same "
        "initialisation and batches.",
        "",
        table(["method", "lr", "steps", "best-validation test NLL (nats)",
               "best-validation step", "final test NLL", "final test exact SM",
               "ms / iteration in training", "ms / iteration, interleaved",
               "validation minimum passed"], rows),
        f"Date: {data['nice']['date']}.",
        "",
        code(data["commands"]["nice"]),
    ])


def render_ood(data: dict) -> str:
    if "ood" not in data:
        return ""
    sets = list(data["ood"]["rows"][0]["auroc"])
    rows = []
    for r in data["ood"]["rows"]:
        key = "fd_dsm_residual" if r["fd_dsm_direction"] == "residual" else r["method"]
        rows.append([r["dataset"], LABELS[key], r["trained_steps"],
                     r["interleaved_ms_per_iter"].get(key), *[r["auroc"][s] for s in sets]])
    return "\n".join([
        "Out-of-distribution detection",
        "-----------------------------",
        "",
        "``examples/ood_detection.py`` on the models above (the authors' test: batches of 2 "
        "images scored by the distance of their mean energy to the training images'; AUROC, "
        "OOD positive; the training set's own column compares two in-distribution draws, "
        "about 0.5). ms / iteration: DSM, FD-DSM (random) and FD-DSM (residual) steps "
        "interleaved on the same batch and model.",
        "",
        table(["trained on", "method", "iterations", "ms / iteration, interleaved",
               *[f"AUROC {s}" for s in sets]], rows),
        f"Date: {data['ood']['date']}.",
        "",
        code(data["commands"]["ood"]),
    ])


def render_benchmark(data: dict) -> str:
    if "benchmark" not in data:
        return ""
    b = data["benchmark"]
    t, split, mem = b["time_ms"], b["split_ms"], b["step_mib"]
    methods = ("dsm", "fd_dsm", "fd_dsm_residual", "fd_dsm_residual_1s")
    rows = [[LABELS[m], t[m], t[m] / t["dsm"], split[m], split[m] / split["model:2"], mem[m],
             mem[m] / mem["dsm"]] for m in methods]
    check = b["residual_gradient_check"]
    grad_rows = [[eps, *[check[eps][m] for m in ("fd_dsm_residual", "fd_dsm_residual_1s",
                                                  "fd_dsm")]] for eps in check]
    cfg, machine = b["config"], b["machine"]
    return "\n".join([
        "Cost per step and gradient accuracy",
        "-----------------------------------",
        "",
        f"``python -m benchmarks.run --only deep_ebm`` (the deep-EBM benchmark: EnergyNet("
        f"ch={cfg['ch']}, head_dim={cfg['head_dim']}), 28x28 images, batch {cfg['batch']}, "
        f"{cfg['iters']} iterations in lockstep; {machine['cpu']}, {machine['torch_threads']} "
        f"thread, torch {machine['torch']}, {machine['date']}). Lockstep: the median over the "
        "training iterations; split: all steps re-timed interleaved in one fresh process, "
        "against the model's own forward + backward + Adam step on 2B stacked rows "
        "(the floor of the random form). Step memory: the increase of peak memory in a "
        "fresh process.",
        "",
        table(["method", "ms / iteration (lockstep)", "/ DSM", "ms (split)",
               "/ model on 2B rows", "step memory (MiB)", "/ DSM"], rows),
        "Relative error of the parameter gradient against DSM's (double backward, float32, "
        "same noise z) on one training batch of the trained DSM model, per eps: central "
        "residual differences (the library's ``direction=\"residual\"``), one-sided residual "
        "differences, one random direction (slicing noise, independent of eps).",
        "",
        table(["eps", LABELS["fd_dsm_residual"], LABELS["fd_dsm_residual_1s"],
               LABELS["fd_dsm"]], grad_rows),
        code(data["commands"]["benchmark"]),
    ])


def render(data: dict) -> str:
    m = data["machine"]
    parts = [
        ".. This page is generated by docs/render_fd_dsm.py from docs/results/fd_dsm.json;",
        "   edit those, not this file.",
        "",
        "FD-DSM along the residual: results",
        "==================================",
        "",
        "FD-DSM with ``direction=\"residual\"`` (DSM's gradient by first-order autograd, see "
        ":doc:`../estimators`) beside autograd DSM and the paper's FD-DSM with one random "
        f"direction. Machine: {m['cpu']}, {m['cores']} cores, one torch thread per run, "
        f"torch {m['torch']}, Python {m['python']}; the runs were started from commit "
        f"``{data['code_commit'][:12]}``. Nothing here ran on a GPU.",
        "",
        render_curves(data),
        render_samples(data),
        render_benchmark(data),
        render_dkef(data),
        render_nice(data),
        render_ood(data),
    ]
    return "\n".join(p for p in parts if p is not None).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("collect", "render", "check"))
    p.add_argument("--code-commit", default=None,
                   help="collect: the commit the runs were started from")
    args = p.parse_args(argv)
    if args.action == "collect":
        if not args.code_commit:
            p.error("collect needs --code-commit (the commit the runs were started from)")
        data = collect(args.code_commit)
        DATA.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {DATA.relative_to(ROOT)}")
        return 0
    data = json.loads(DATA.read_text())
    text = render(data)
    if args.action == "check":
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} differs from a fresh render of "
                  f"{DATA.relative_to(ROOT)}: run python docs/render_fd_dsm.py render",
                  file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)} is up to date")
        return 0
    PAGE.write_text(text)
    if data["learning_curves"]:
        plot_curves(data, CURVES_PNG)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
