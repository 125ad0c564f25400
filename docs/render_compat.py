"""The compatibility matrix page (docs/results/compat.rst) and README.md's short table.

Both are rendered from ``benchmarks/results/full/compat.json`` (``python -m
benchmarks.compat --threads 1``) by ``python -m docs.render_results render``, which calls
:func:`render_compat` (through ``RENDERERS``) and :func:`readme_with_compat`.
"""

from __future__ import annotations

from docs.render_results import (
    BENCH,
    bench_provenance,
    fmt,
    heading,
    load,
    page,
    table,
)

SOURCE = "benchmarks/results/full/compat.json"
COMPAT_START = "<!-- results:compat:start -->"
COMPAT_END = "<!-- results:compat:end -->"
SHORT = {"eager": "eager", "compiled_model": "compile(model)",
         "compiled_fullgraph": "compile(loss, fullgraph)", "sdpa_flash": "SDPA flash",
         "fsdp2": "FSDP2", "ddp": "DDP", "bf16_autocast": "bf16 autocast",
         "channels_last": "channels_last", "cuda_graphs": "CUDA graphs"}
MODELS = {"mlp": "the MLP energy", "conv": "the conv energy", "transformer": "the ViT energy"}


def _cells(d: dict):
    """(method, column, cell) over the matrix, in row order."""
    for m in d["methods"]:
        for c in d["columns"]:
            yield m, c, d["results"][c]["cells"][m]


def _notes(d: dict) -> dict[str, int]:
    """Each distinct error message and its note number, in order of first appearance."""
    notes: dict[str, int] = {}
    for _, _, cell in _cells(d):
        if cell["status"] == "fails":
            notes.setdefault(cell["error"], len(notes) + 1)
    return notes


def _cell(cell: dict, notes: dict[str, int]) -> str:
    if cell["status"] == "needs a GPU":
        return "needs a GPU"
    if cell["status"] != "works":
        return f"fails [{notes[cell['error']]}]"
    text = f"works, {fmt(cell['ratio'])}x" if cell.get("ratio") is not None else "works"
    return text if cell.get("agrees", True) else text + " \\*"


def render_compat() -> tuple[str, list[str]]:
    b = load(BENCH / "compat.json")
    if b is None:
        return page("Compatibility matrix", [SOURCE], [
            "Not yet measured: run ``python -m benchmarks.compat --threads 1`` and commit "
            f"``{SOURCE}``.", ""]), [SOURCE]
    d = b["data"]
    cfg = d["config"]
    notes = _notes(d)
    labels, cols = d["labels"], d["columns"]
    matrix = [[labels[m], *[_cell(d["results"][c]["cells"][m], notes) for c in cols]]
              for m in d["methods"]]
    mlp, conv, vit = cfg["mlp"], cfg["conv"], cfg["transformer"]
    base_rows = [[d["column_labels"][c], MODELS[r["model"]], r["device"],
                  r.get("baseline_ms") if r.get("baseline_ms") is not None else "-"]
                 for c, r in d["results"].items()]
    loss_rows = [[labels[m], *[_agreement(d["results"][c]["cells"][m]) for c in cols]]
                 for m in d["methods"]]
    warn_rows = [[labels[m], d["column_labels"][c], "; ".join(cell["warnings"])]
                 for m, c, cell in _cells(d) if cell.get("warnings")]
    cl = {labels[m]: cell.get("model_input_channels_last") for m, c, cell in _cells(d)
          if c == "channels_last" and cell["status"] == "works"}
    cl_text = sorted({fmt(v) for v in cl.values() if v is not None})
    body = [
        "Where each estimator trains, and what a step costs: one training step (zero_grad, "
        "loss, backward, Adam step) of every estimator under every way of running it. A "
        "cell *works* when the steps ran (the checked first step and the timed ones), the "
        "loss was finite and every parameter gradient that exists was finite; otherwise it "
        "*fails*, with the first line of the error in the notes below. The number is the time "
        "per step relative to eager FD-SSM on the same model, measured in the same process "
        f"(interleaved rounds, median of {cfg['rounds']} steps each). What the matrix means "
        "for choosing an estimator: :doc:`/guides/where_estimators_work`.",
        "",
        heading("The matrix"),
        table(["method", *[SHORT[c] for c in cols]], matrix),
        "\\* the first step's loss differs from the eager float32 loss of the same method on "
        "the same model, batch and seed by more than the tolerance (table below).",
        "",
        "Notes (first line of each error):",
        "",
        ".. code-block:: text",
        "",
        *[f"   [{n}] {msg}" for msg, n in notes.items()],
        "",
        heading("Models and columns"),
        f"- The MLP energy: {mlp['d']} -> {mlp['hidden']} -> {mlp['hidden']} -> 1 (softplus, "
        f"no last bias), batch {mlp['batch']}; the columns eager, compile, FSDP2, DDP, bf16 "
        "autocast and CUDA graphs.",
        f"- The conv energy: three softplus 3x3 convolutions ({conv['ch']} channels, the "
        f"last two of stride 2) and a linear head on {conv['size']}x{conv['size']} images, "
        f"batch {conv['batch']}; the channels_last column (model and input in "
        "``torch.channels_last``, the ratio against eager FD-SSM in the default format). "
        "The model's own input arrived in channels_last: "
        f"{', '.join(cl_text) if cl_text else 'not recorded'}.",
        f"- The ViT energy (``examples.common.transformer.ViTEnergy``): {vit['size']}x"
        f"{vit['size']} images in {vit['patch']}x{vit['patch']} patches, width {vit['dim']}, "
        f"depth {vit['depth']}, {vit['heads']} heads, attention by "
        "``F.scaled_dot_product_attention`` with torch's default backend (the flash kernel), "
        f"batch {vit['batch']}.",
        f"- Compile: ``torch.compile(model)`` with the loss eager, or the whole loss under "
        f"``torch.compile(fullgraph=True)`` (the seed an int64 tensor), backend "
        f"``{cfg['backend']}``; the warm-up steps ({cfg['warmup']}, compilation included) "
        "are not timed.",
        "- FSDP2 (``fully_shard`` on every layer with parameters, then the root) and DDP: two "
        "processes, gloo, each on half the batch; the ratio is against eager FD-SSM on the "
        "same half batch in the same process.",
        f"- DSM and FD-DSM: sigma {d['sigma']}; FD-SSM and FD-DSM: eps 0.1 (the default). "
        "The forward-mode rows compute the eps -> 0 limit of the same estimator with the same "
        "random directions (``derivatives=\"forward\"``).",
        "",
        table(["column", "model", "device", "eager FD-SSM baseline (ms / step)"], base_rows),
        heading("Loss against eager float32"),
        "Relative difference of the first step's loss (seed 0) from the same method's eager "
        "float32 loss on the same model, batch and seed (the SDPA column: with the MATH "
        "backend, which can differentiate twice). Tolerance: "
        + "; ".join(f"{fmt(t)} ({', '.join(SHORT[c] for c in cs)})"
                    for t, cs in _tolerances(d).items())
        + ". FD values in float32 carry rounding noise amplified by d/eps^2 (and a freshly "
        "initialised model has a small loss), so a change of kernels alone (channels_last "
        "convolutions, say) can move them far more than it moves the exact estimators: "
        ":doc:`/guides/precision`.",
        "",
        table(["method", *[SHORT[c] for c in cols]], loss_rows),
    ]
    exact_rows = [[d["column_labels"][c], labels[m], cell["ref_loss"], cell["exact_loss"],
                   cell["ref_vs_exact"]]
                  for c in ("eager", "fsdp2", "sdpa_flash", "channels_last") if c in cols
                  for m in d["methods"]
                  for cell in [d["results"][c]["cells"][m]] if cell.get("exact_loss") is not None]
    if exact_rows:
        body += ["The FD rows' eager float32 values against their eps -> 0 limits (the same "
                 "estimator and directions by forward mode, ``derivatives=\"forward\"``), on "
                 "each model (FSDP2: half the batch): how far FD's own value is from exact on "
                 "these freshly initialised models, for comparison with the differences "
                 "above. FD-DSM along the residual has DSM's value exactly (its finite "
                 "difference enters the gradient only), so its value agrees by construction; "
                 "the DSM losses here are dominated by the noise term, about d / (2 sigma^2) "
                 "per sample.", "",
                 table(["reference of the column", "method", "eager float32", "eps -> 0 limit",
                        "relative difference"], exact_rows)]
    if warn_rows:
        body += ["Precision warnings raised by the first step (``FDPrecisionWarning``, up to "
                 "its verdict):", "", table(["method", "column", "warning"], warn_rows)]
    body += [heading("Taylor mode"),
             f"Not measured: {d['taylor_mode']['reason']}. It is never a dependency of "
             "fdsm_ext.", "",
             heading("Provenance"),
             bench_provenance(b | {"provenance": d.get("provenance", {})}, "compat")]
    return page("Compatibility matrix", [SOURCE], body), [SOURCE]


def _agreement(cell: dict) -> str:
    if cell.get("rel_diff") is None:
        return "-"
    return fmt(cell["rel_diff"]) + ("" if cell["agrees"] else " \\*")


def _tolerances(d: dict) -> dict[float, list[str]]:
    """Each tolerance and the columns held to it."""
    out: dict[float, list[str]] = {}
    for c in d["columns"]:
        tols = {cell["tol"] for cell in d["results"][c]["cells"].values() if "tol" in cell}
        for t in sorted(tols):
            out.setdefault(t, []).append(c)
    return out


def render_compat_readme() -> str | None:
    """README.md's short matrix: works / fails per estimator and column (no numbers)."""
    b = load(BENCH / "compat.json")
    if b is None:
        return None
    d = b["data"]
    head = "| estimator | " + " | ".join(SHORT[c] for c in d["columns"]) + " |"
    lines = [head, "|---|" + "---|" * len(d["columns"])]
    for m in d["methods"]:
        cells = [_readme_cell(d["results"][c]["cells"][m]) for c in d["columns"]]
        lines.append(f"| {d['labels'][m]} | " + " | ".join(cells) + " |")
    return "\n".join([
        "Where each estimator trains, measured by `python -m benchmarks.compat` (time per "
        "step, errors and machine on [compat](docs/results/compat.rst); what it means: "
        "[Where each estimator works](docs/guides/where_estimators_work.rst)). *works, "
        "guard warns*: the step ran, and the precision guard warned that rounding noise is a "
        "large part of the value (FDPrecisionWarning; the matrix uses freshly initialised "
        "models, whose loss values are small):", "",
        *lines])


def _readme_cell(cell: dict) -> str:
    if cell["status"] == "works" and cell.get("warnings"):
        return "works, guard warns"
    return cell["status"]


def readme_with_compat(text: str | None) -> str | None:
    """``text`` with the block between the compat markers re-rendered (unchanged without
    the markers or without the results file; None stays None)."""
    if text is None:
        return None
    i, j = text.find(COMPAT_START), text.find(COMPAT_END)
    block = render_compat_readme()
    if i < 0 or j < i or block is None:
        return text
    return text[:i + len(COMPAT_START)] + "\n" + block + "\n" + text[j:]
