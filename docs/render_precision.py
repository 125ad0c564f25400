"""The precision section of the benchmarks page, from benchmarks/results/full/precision.json
(``python -m benchmarks.precision``); called by :func:`docs.render_results.render_benchmarks`."""

from __future__ import annotations

from docs.render_results import bench_provenance, fmt, heading, table

LABEL = "results-precision"
MODELS = {"mlp": "MLP energy", "conv": "conv energy"}


def _guard(r: dict) -> str:
    if "guard_ratio" not in r:
        return ""
    return f"{'warns' if r['guard_warned'] else 'quiet'} ({fmt(r['guard_ratio'])})"


def _eps(r: dict) -> str:
    return "eps -> 0" if r["eps"] is None else fmt(r["eps"])


def render_precision(b: dict) -> str:
    d = b["data"]
    cfg = d["config"]
    side = cfg["side"]
    a, c, e = cfg["channels"]
    out = [
        f".. _{LABEL}:",
        "",
        heading("Precision of FD-SSM: rounding against exact values"),
        f"Two energies on {d['dataset']}, {side}x{side} images (d = {side * side}): an MLP "
        f"{side * side}-{cfg['hidden']}-{cfg['hidden']}-1 (softplus; batch "
        f"{cfg['batch']['mlp']}) and a 3-layer conv energy ({a}, {c}, {e} channels, 5x5 "
        f"kernels, stride 2, softplus, linear head; batch {cfg['batch']['conv']}), each "
        f"freshly initialised and after {cfg['train_steps']['mlp']} (MLP) and "
        f"{cfg['train_steps']['conv']} (conv) steps of sliced score matching (autograd, Adam, "
        "not converged: briefly trained on purpose). Each row is "
        ":func:`fdsm_ext.fd_ssm_loss` (sphere directions) on held-out images, with "
        "``derivatives=\"fd\"`` at each eps or ``derivatives=\"forward\"`` (the eps -> 0 "
        "limit by forward-mode AD), in float64, float32 or under bfloat16 autocast, against "
        "the exact sliced score-matching value with the same directions, in float64 by nested "
        "autograd. Errors are relative to the mean absolute exact per-sample value: the "
        "per-sample rms error and the error of the batch mean (one projection), and, relative "
        f"to its exact value, the error of the mean over {cfg['projections']['mlp']} (MLP) "
        f"and {cfg['projections']['conv']} (conv) projections, what the loss estimates in "
        "expectation (the rounding of the centre value L(x) is shared by the projections and "
        "does not average out over them). The float64 FD rows are the truncation "
        "error alone. Guard: whether :class:`fdsm_ext.FDPrecisionWarning` fired and its ratio "
        "(floor over the mean absolute value); formula ratio: that of the formula "
        "u*mean|E|*d/eps^2 alone, without the guard's rounding probe "
        "(:doc:`/guides/precision`).",
        "",
    ]
    for kind, states in d["models"].items():
        head = ["state", "precision", "derivatives", "eps", "per-sample rms error",
                "batch-mean error",
                f"error of the mean over {cfg['projections'][kind]} projections",
                "guard (ratio)", "formula ratio"]
        out += [heading(MODELS[kind], "~"),
                "Mean absolute energy on the batch: " + "; ".join(
                    f"{state} {fmt(s['mean_abs_output'])}" for state, s in states.items()) + ".",
                ""]
        rows = [[state, r["precision"], r["derivatives"], _eps(r), r["rms_rel"],
                 r["batch_mean_err_rel"], r["mean_err_rel"], _guard(r),
                 r.get("formula_ratio", "")]
                for state, s in states.items() for r in s["rows"]]
        out.append(table(head, rows))
    grid = d["guard_grid"]
    out += [
        heading("The precision guard against measured errors", "~"),
        "A fixed 8-d MLP energy with outputs near 15 (that of python_tests/test_precision.py), "
        "256 samples, against the same model in float64 with the same directions, so that the "
        "difference is rounding only. The guard's floor is the larger of the formula "
        "u*mean|E|*d/eps^2 and its rounding probe; floor / rms error near 1 means it "
        "estimates the noise well, above 1 that it is conservative. Errors are relative to "
        "the mean absolute per-sample value.",
        "",
        table(["precision", "eps", "guard", "ratio", "floor / rms error",
               "per-sample rms error", "batch-mean error"],
              [[r["precision"], r["eps"], "warns" if r["warned"] else "quiet", r["ratio"],
                r["floor_over_rms"], r["rms_rel"], r["bias_rel"]] for r in grid]),
        bench_provenance(b, "precision"),
    ]
    return "\n".join(out)
