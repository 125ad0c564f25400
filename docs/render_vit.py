"""The ViT energy page (docs/results/vit.rst), rendered from docs/results/vit_ebm_mnist5k.json
(``python -m benchmarks.transformer``) by ``python -m docs.render_results render``, which calls
:func:`render_vit` through ``RENDERERS``."""

from __future__ import annotations

from docs.render_results import RESULTS, figure, fmt, heading, load, page, provenance, table

SOURCE = "vit_ebm_mnist5k.json"
PAIRS = (("fd_ssm", "ssm_vr"), ("fd_dsm", "dsm"))


def render_vit() -> tuple[str, list[str]]:
    d = load(RESULTS / SOURCE)
    title = "A ViT energy: FD score matching through flash attention"
    if d is None:
        return page(title, [f"docs/results/{SOURCE}"],
                    [f"No results file yet (docs/results/{SOURCE}): run "
                     "``python -m benchmarks.transformer``."]), [SOURCE]
    c, runs = d["config"], d["runs"]
    body = [
        "A small ViT-style energy network (``examples/common/transformer.py``: "
        f"{c['patch']}x{c['patch']} patches, {c['depth']} pre-norm blocks of width "
        f"{c['dim']} with {c['heads']} heads, GELU, a quadratic energy head; "
        f"{d['n_parameters']:,} parameters) trained as a noise-conditional energy on "
        f"MNIST-5k (4000 training images; {c['n_sigmas']} noise levels from "
        f"{fmt(c['sigma_max'])} to {fmt(c['sigma_min'])}) with the losses of "
        "``examples/train_ebm.py``. Attention is ``F.scaled_dot_product_attention``. Its "
        "default CPU/GPU backend, the flash kernel, has no double backward, so autograd score "
        "matching cannot train the network with it (the error of ``loss.backward()``)::",
        "",
        f"    {d['flash_double_backward_error']}",
        "",
        "FD-SSM and FD-DSM need only forward passes and one ordinary backward and train "
        "through the flash kernel; the autograd baselines run on the unfused MATH backend "
        "(``--attention math`` in train_ebm), which computes the same function. Each FD "
        "method ran in lockstep with its autograd counterpart (alternating order every step) "
        "from the same initialisation, on the same batches, noise levels and noise "
        f"(batch {c['batch_size']}, Adam, learning rate {fmt(c['lr'])}, eps {fmt(c['eps'])}). "
        "FD-DSM along the residual reports DSM's loss value (its gradient is the FD "
        "approximation), so the two DSM curves can coincide to the digits shown.",
        "",
        heading("Cost per step"),
        "Median time of a training step (loss, backward, Adam) over the pair's interleaved "
        "steps, and the resident-memory increase of one step in a fresh process "
        "(``benchmarks.harness.child_memory``); ratios are FD over its autograd counterpart.",
        "",
    ]
    rows = []
    for fd, ag in PAIRS:
        if fd not in runs or ag not in runs:
            continue
        for m in (fd, ag):
            r = runs[m]
            rows.append([r["label"], r["steps"], r["ms_per_step_median"],
                         r["memory"].get("step_mib"),
                         r.get("time_ratio_fd_over_autograd"),
                         r.get("step_memory_ratio_fd_over_autograd"),
                         r["final_loss_mean_last_100"], r["convergence"]["converged"]])
    body += [table(["method", "steps", "ms / step", "step memory (MiB)", "time ratio",
                    "memory ratio", "loss (last 100 steps)", "flattened"],
                   [[x if x is not None else "" for x in row] for row in rows]),
             "Flattened: the mean loss of the last 10 % of steps differs from that of the "
             "10 % window ending 30 % before the end by less than 2 % or by less than twice "
             "its standard error.", ""]
    body += [heading("Training loss"),
             "Mean training loss over 100 steps, at about ten points of each run (the "
             "sigma^2-weighted loss of train_ebm: SSM-type losses can be negative; FD-DSM "
             "along the residual shows DSM's value).", ""]
    for fd, ag in PAIRS:
        if fd not in runs or ag not in runs:
            continue
        curves = {m: dict((int(k), v) for k, v in runs[m]["loss_curve_mean_per_100_steps"])
                  for m in (fd, ag)}
        common = sorted(set(curves[fd]) & set(curves[ag]))
        picks = common[::max(1, len(common) // 10)] if common else []
        if common and picks[-1] != common[-1]:
            picks.append(common[-1])
        body.append(table(["step", runs[fd]["label"], runs[ag]["label"]],
                          [[k, curves[fd][k], curves[ag][k]] for k in picks]))
    first = runs[next(iter(runs))]
    body += [
        heading("Samples"),
        f"Annealed Langevin dynamics as in train_ebm ({c['n_steps_each']} steps per level, "
        f"step {fmt(c['step_lr'])} at the smallest level, a final denoising step) from the "
        f"same uniform noise, {c['n_samples']} samples per model, every model sampled with "
        "the flash kernel (sampling needs first derivatives only). Scored by the MNIST-5k "
        "classifier of ``examples/common/classifier.py`` (test accuracy "
        f"{fmt(first.get('classifier_test_accuracy'))}): Fréchet distance of its features to "
        "those of the training images (lower is better), mean per-sample label entropy (low: "
        "each sample looks like one digit) and entropy of the mean label distribution (high, "
        f"up to ln 10 = {fmt(first.get('classifier_max_entropy'))}: all digits present), "
        "beside the same number of held-out images and of the initial noise.",
        "",
    ]
    keys = ("frechet_distance", "label_entropy_per_sample", "label_entropy_of_mean")
    rows = [[r["label"], *[r.get(f"{k}_samples") for k in keys],
             r["mmd2_samples_vs_heldout"],
             " to ".join(fmt(v) for v in r["sample_min_max"])] for r in runs.values()]
    rows.append(["held-out images", *[first.get(f"{k}_heldout") for k in keys], "", ""])
    rows.append(["initial noise", *[first.get(f"{k}_init_noise") for k in keys],
                 first["mmd2_init_noise_vs_heldout"], "0 to 1"])
    worse = [r["label"] for r in runs.values()
             if r.get("frechet_distance_samples", 0) > first.get("frechet_distance_init_noise",
                                                                 float("inf"))]
    if worse:
        body += ["Samples whose Fréchet distance exceeds that of the initial noise ("
                 + ", ".join(worse) + "): with these models the sampler does not reach "
                 "the data (the images lie in [0, 1]; see the pixel range, and the flattened "
                 "column above).", ""]
    body += [table(["", "Fréchet distance", "label entropy per sample",
                    "label entropy of mean", "MMD^2 to held-out", "pixel range"], rows),
             figure("docs/results/vit_samples.png",
                    "64 samples of each model, in the order of the table."),
             *([] if any(r["convergence"]["converged"] for r in runs.values()) else [
                 "No run flattened, and at this point no model's samples are recognisable "
                 "digits, FD-SSM's included (its Fréchet distance is below the noise's, not "
                 "near the held-out images'): the page compares cost, not sample quality.",
                 ""]),
             heading("Provenance"),
             provenance(d["provenance"], source=f"docs/results/{SOURCE}")]
    return page(title, [f"docs/results/{SOURCE}"], body), [SOURCE]
