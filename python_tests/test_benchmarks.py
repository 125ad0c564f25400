"""Smoke test: the quick mode of every benchmark runs and writes its tables and plots."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks import run as bench_run  # noqa: E402

EXPECTED_ROWS = {
    "dimension": ["exact SM (Hessian trace)", "| SSM |", "SSM-VR", "DSM", "FD-SSM", "FD-DSM"],
    "deep_ebm": ["| DSM |", "| FD-DSM (random) |", "FD-DSM (random, sequential evaluations)",
                 "| FD-DSM (residual) |", "| FD-DSM (residual, one-sided) |", "| SSM |",
                 "SSM-VR", "| FD-SSM |", "FD-SSM (sequential evaluations)",
                 "model alone, 3B rows", "FD-SSM, eps=0.1", "FD-DSM gradients against DSM's"],
    "order": ["| 1 |", "| 2 |", "| 3 |"],
    "compile": ["FD-SSM, eager", "FD-SSM, torch.compile(fullgraph=True)", "SSM, eager",
                "SSM, torch.compile(fullgraph=True)"],
    "fused_ops": ["stencil batch", "v given", "fd_combine", "fd_ssm_scalar", "fd_ssm_score",
                  "fd_dsm_scalar", "fd_ssm_loss + backward", "model alone"],
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert bench_run.main(["--quick", "--out", str(out), "--device", "cpu"]) == 0
    return out / "quick"


def test_readme_has_machine_targets_and_every_section(quick_results):
    readme = (quick_results / "README.md").read_text()
    assert "Machine of the last row below" in readme and "CUDA kernels" in readme
    cpu = json.loads((quick_results / "deep_ebm.json").read_text())["machine"]["cpu"]
    assert "| CPU |" in readme and "| deep_ebm | " in readme and f"| {cpu}, " in readme
    assert "## Targets" in readme
    for title in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert title in readme


@pytest.mark.parametrize("name", BENCHMARKS)
def test_section_tables_and_png(quick_results, name):
    md = (quick_results / f"{name}.md").read_text()
    for row in EXPECTED_ROWS[name]:
        assert row in md, f"{name}: row {row!r} missing"
    png = quick_results / f"{name}.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads((quick_results / f"{name}.json").read_text())
    assert payload["machine"]["torch"]
    for target in payload["targets"]:
        assert target["op"] in ("<=", ">=") and "passed" in target


def test_fd_rows_measured(quick_results):
    """The FD methods themselves must run (baselines may legitimately fail under compile)."""
    md = (quick_results / "dimension.md").read_text()
    fd_row = next(line for line in md.splitlines() if line.startswith("| FD-SSM |"))
    assert "error" not in fd_row and "| - |" not in fd_row


def test_converged_gap_from_a_learning_curve_run():
    from benchmarks import deep_ebm

    run = {"config": {"steps": 9000},
           "methods": {"dsm": {"final_heldout_exact_sm": -200.0, "flat_from_iteration": 2500,
                               "converged": True},
                       "fd_dsm": {"final_heldout_exact_sm": -180.0, "flat_from_iteration": 7000,
                                  "converged": False}}}
    gap, note = deep_ebm._curve_gap({"dsm": run}, "dsm")
    assert gap == pytest.approx(0.1)
    assert note == ("9000 iterations, DSM flat from 2500, "
                    "FD-DSM (random) flat from 7000 (not converged)")
    gap, note = deep_ebm._curve_gap({}, "ssm")
    assert gap != gap and "missing" in note
