"""Smoke test: the quick mode of every benchmark runs and writes its tables and plots."""

from __future__ import annotations

import json
import math

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
    "ncsn": ["| DSM |", "| FD-SSM (variance reduced) |", "| SSM-VR (autograd) |"],
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


# ---------------------------------------------------------------------------------------
# The GPU check (python -m benchmarks.gpu_check), in its CPU test mode: the same code, tiny
# sizes, into a temporary folder.


@pytest.fixture(scope="module")
def gpu_check_cpu(tmp_path_factory):
    from benchmarks import gpu_check

    out = tmp_path_factory.mktemp("gpu_check")
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    return rc, out, json.loads((out / gpu_check.RESULTS_NAME).read_text())


def _positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


def test_gpu_check_cpu_mode_writes_every_part(gpu_check_cpu):
    from benchmarks import gpu_check

    rc, out, d = gpu_check_cpu
    assert rc == 0 and d["status"] == "ok" and d["problems"] == {}
    assert d["mode"] == "quick" and d["device"] == "cpu"
    assert d["command"].startswith("python -m benchmarks.gpu_check --device cpu --quick")
    assert list(d["parts"]) == list(gpu_check.PARTS)
    assert d["wall_s"] <= d["budget_s"] == gpu_check.TOTAL_BUDGET
    # Each part's budget is a cap; the total (8 minutes) bounds the whole run.
    assert max(gpu_check.BUDGETS.values()) < gpu_check.TOTAL_BUDGET == 480
    for name, part in d["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"))
        assert 0 <= part["wall_s"] <= part["budget_s"] == gpu_check.BUDGETS[name]
    m = d["machine"]
    assert m["device"] == "cpu" and m["torch"] and m["date"] and m["git_commit"]
    assert m["has_cuda_kernels"] in (True, False) and "cpu" in m
    for name in ("fused_ops.png", "deep_ebm.png", gpu_check.LOG_NAME):
        assert (out / name).stat().st_size > 0


def test_gpu_check_build_and_tests_parts(gpu_check_cpu):
    import torch

    _, _, d = gpu_check_cpu
    build = d["parts"]["build"]
    assert build["action"] == "already built" and build["probe"]["importable"] is True
    tests = d["parts"]["tests"]
    c = tests["counts"]
    assert all(isinstance(v, int) for v in c.values())
    assert c["total"] == c["passed"] + c["failed"] + c["errors"] + c["skipped"]
    assert c["failed"] == c["errors"] == 0 and tests["failures"] == []
    # test_build_info and the CPU-side checks run; the CUDA tests skip without a GPU.
    assert c["passed"] >= 2 and "test_ops.py" in tests["command"] and "-k" in tests["command"]
    if not torch.cuda.is_available():
        assert c["skipped"] == tests["skipped_for_want_of_a_gpu"] >= 20
        assert tests["skip_reasons"] == {"needs a CUDA device": c["skipped"]}
    assert tests["summary_line"].startswith(f"{c['passed']} passed")


def test_gpu_check_directions_and_benchmarks(gpu_check_cpu):
    from benchmarks import deep_ebm, fused_ops, gpu_check

    _, _, d = gpu_check_cpu
    dirs = d["parts"]["directions"]
    assert dirs["n_entries"] == len(dirs["entries"]) == 4 * 15
    assert dirs["n_bit_identical"] == dirs["n_entries"]  # CPU against CPU
    assert dirs["promised_bit_identical_but_differ"] == []
    assert {e["expected"] for e in dirs["entries"]} == {"bit-identical", "tolerance"}
    fused = d["parts"]["fused_ops"]["summary"]
    assert list(fused["ops"]) == list(fused_ops.OPS) and list(fused["steps"]) == list(
        fused_ops.STEPS)
    for op in fused["ops"].values():
        assert op["error"] is None
        assert _positive(op["fused_us"]) and _positive(op["composed_us"])
        assert _positive(op["fused_over_composed"])
        assert math.isfinite(op["fused_mib"]) and math.isfinite(op["composed_mib"])
    for step in fused["steps"].values():
        assert _positive(step["time_ms"]) and step["error"] is None
    ebm = d["parts"]["deep_ebm"]["summary"]
    assert list(ebm["methods"]) == list(deep_ebm.METHODS)
    for method in ebm["methods"].values():
        assert _positive(method["time_ms"]) and method["memory_error"] is None
        assert math.isfinite(method["step_mib"]) and math.isfinite(method["heldout_sm"])
    assert list(ebm["ratios"]) == list(gpu_check.DEEP_EBM_RATIOS)
    for ratio in ebm["ratios"].values():
        # CPU step memory at tiny sizes can be 0 MiB: the memory ratio may be n/a there.
        assert _positive(ratio["time"]) and not math.isinf(ratio["memory"])
    assert ebm["config"]["iters"] == deep_ebm.QUICK["iters"]
    assert "## 2. Deep EBM table" in d["parts"]["deep_ebm"]["section"]["markdown"]


def test_gpu_check_page_renders_the_file(gpu_check_cpu, monkeypatch, tmp_path):
    from docs import render_results as rr

    _, out, d = gpu_check_cpu
    monkeypatch.setattr(rr, "GPU_CHECK", tmp_path / "absent.json")
    assert "**Not yet run on a GPU.**" in rr.render_gpu()[0]
    assert not rr.gpu_check_ran_on_a_gpu()
    monkeypatch.setattr(rr, "GPU_CHECK", out / "gpu_check.json")
    text = rr.render_gpu()[0]
    c = d["parts"]["tests"]["counts"]
    assert "test mode" in text and f"{c['passed']} passed, 0 failed" in text
    for title in ("Parts", "Tests that need a GPU", "The fused ops on the device against the CPU",
                  "Fused ops against composed PyTorch, on the device",
                  "Deep EBM table, on the device"):
        assert f"\n{title}\n" in text
    assert "FD-DSM (residual) / DSM" in text and "60 of 60" in text
    assert not rr.gpu_check_ran_on_a_gpu()  # a CPU run never counts as a GPU measurement


def test_gpu_check_budget_kills_an_overrunning_part(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    monkeypatch.setitem(gpu_check.BUDGETS, "fused_ops", 3)
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                         "--parts", "fused_ops"])
    d = json.loads((tmp_path / gpu_check.RESULTS_NAME).read_text())
    assert rc == 1 and d["status"] == "problems" and d["problems"] == {"fused_ops": "timed out"}
    part = d["parts"]["fused_ops"]
    assert part["status"] == "timed out" and "limit of 3 s" in part["error"]
    assert part["wall_s"] < 10
    # Past the total budget, parts are skipped and recorded as such.
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(tmp_path),
                         "--parts", "directions", "--budget-s", "1"])
    d = json.loads((tmp_path / gpu_check.RESULTS_NAME).read_text())
    assert rc == 1 and d["parts"]["directions"] == {"status": "skipped",
                                                    "error": "total budget spent"}


def test_gpu_check_reads_pytest_junit(tmp_path):
    from benchmarks import gpu_check

    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4">'
        '<testcase classname="python_tests.test_ops" name="a"/>'
        '<testcase classname="python_tests.test_ops" name="b">'
        '<failure message="AssertionError: CUDA directions differ">trace</failure></testcase>'
        '<testcase classname="python_tests.test_ops" name="c">'
        '<skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="python_tests.test_ops" name="d"><error message="boom"/>'
        '</testcase></testsuite></testsuites>')
    r = gpu_check.parse_junit(xml)
    assert r["counts"] == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1, "total": 4}
    assert r["failures"][0] == {"test": "test_ops::b", "kind": "failure",
                                "message": "AssertionError: CUDA directions differ"}
    assert r["skip_reasons"] == {"needs a CUDA device": 1}
    assert r["skipped_for_want_of_a_gpu"] == 1


def test_gpu_check_builds_only_on_a_gpu_without_kernels(monkeypatch, tmp_path):
    from benchmarks import gpu_check

    gpu = {"cuda_available": True, "gpu_capability": "9.0", "importable": True}
    calls = []

    def fake_run(cmd, limit, log, env=None):
        calls.append((cmd, env))
        return 0, "built", 1.0

    monkeypatch.setattr(gpu_check, "run_limited", fake_run)
    monkeypatch.setattr(gpu_check, "find_nvcc", lambda: "/opt/cuda-13/bin/nvcc")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    log = gpu_check.Log(tmp_path / "log")

    def build(device, probes, allow=True):
        seq = iter(probes)
        monkeypatch.setattr(gpu_check, "probe", lambda log, limit: next(seq))
        calls.clear()
        return gpu_check.part_build(device, allow, 100, log)

    res = build("cuda", [gpu | {"has_cuda_kernels": True}])
    assert res["status"] == "ok" and res["action"] == "already built" and calls == []
    res = build("cuda", [gpu | {"has_cuda_kernels": False}, gpu | {"has_cuda_kernels": True}])
    assert res["status"] == "ok" and res["action"] == "built"
    (cmd, env), = calls
    assert cmd[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps",
                       "--no-index", "-e", "."]
    assert env["FDSM_CUDA"] == "1" and env["CUDA_HOME"] == "/opt/cuda-13"
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0+PTX"
    res = build("cuda", [gpu | {"has_cuda_kernels": False}, gpu | {"has_cuda_kernels": False}])
    assert res["status"] == "error" and "no CUDA kernels" in res["error"]
    res = build("cuda", [gpu | {"has_cuda_kernels": False}], allow=False)
    assert res["status"] == "error" and "--no-build" in res["action"] and calls == []
    res = build("cpu", [{"importable": False, "has_cuda_kernels": False,
                         "import_error": "ImportError: no _C"}])
    assert res["status"] == "error" and res["error"] == "ImportError: no _C" and calls == []
    res = build("cuda", [{"cuda_available": False, "importable": True,
                          "has_cuda_kernels": True}])
    assert res["status"] == "error" and "torch sees no GPU" in res["error"]
    log.file.close()


# ---------------------------------------------------------------------------------------
# The forward-mode rows (derivatives="forward") of the dimension and deep-EBM benchmarks.

FORWARD_ROWS = {"dimension": ("fd_ssm_fwd", "fd_dsm_residual_fwd"),
                "deep_ebm": ("fd_ssm_fwd", "fd_dsm_residual_fwd")}


def _loss_and_grads(loss, model, x, seed=0):
    import torch

    torch.manual_seed(seed)  # the same directions and noise for every method
    value = loss(model, x)
    params = list(model.parameters())
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True,
                                               materialize_grads=True)


def _grad_gap(got, want) -> float:
    """||got - want|| / ||want|| over all parameter gradients together."""
    num = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want, strict=True))
    return math.sqrt(num / sum(float((w * w).sum()) for w in want))


@pytest.mark.parametrize("bench", ["dimension", "deep_ebm"])
@pytest.mark.parametrize("fwd,fd", [("fd_ssm_fwd", "fd_ssm"),
                                    ("fd_dsm_residual_fwd", "fd_dsm_residual")])
def test_forward_rows_are_the_eps_to_zero_limit_of_their_fd_rows(bench, fwd, fd):
    """Each forward-mode row is the limit of its FD row (float64, same seed): the FD
    gradients approach it as eps^2 (central differences), and at eps = 1e-3 the loss and
    gradients agree to 1e-6."""
    import torch

    from benchmarks import deep_ebm, dimension

    if bench == "dimension":
        fd = {"fd_dsm_residual": "fd_dsm"}.get(fd, fd)  # dimension's FD-DSM is residual
        model, x = dimension.MLPEnergy(6, 16).double(), torch.randn(5, 6, dtype=torch.float64)

        def loss(m, eps):
            return dimension.loss_fn(m, sigma=0.1, eps=eps)
    else:
        model = deep_ebm.seeded_energy_net(0, 8, ch=4, head_dim=8).double()
        x = torch.rand(3, 1, 8, 8, dtype=torch.float64)

        def loss(m, eps):
            return deep_ebm.loss_fn(m, sigma=0.1, eps=eps)

    got, got_g = _loss_and_grads(loss(fwd, 0.1), model, x)
    assert torch.isfinite(got)
    fd_runs = {eps: _loss_and_grads(loss(fd, eps), model, x) for eps in (0.1, 0.01, 1e-3)}
    gaps = {eps: _grad_gap(g, got_g) for eps, (_, g) in fd_runs.items()}
    assert gaps[0.1] > 1e-6  # a measurable truncation error at the benchmarks' eps
    assert gaps[0.01] / gaps[0.1] == pytest.approx(0.01, rel=0.3)
    assert gaps[1e-3] < 1e-6
    assert float(fd_runs[1e-3][0]) == pytest.approx(float(got), rel=1e-6)


def test_forward_residual_dsm_row_is_dsm():
    """Residual FD-DSM in forward mode has DSM's loss value and gradient (same noise z)."""
    import torch

    from benchmarks import deep_ebm

    model = deep_ebm.seeded_energy_net(0, 8, ch=4, head_dim=8).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    got, got_g = _loss_and_grads(deep_ebm.loss_fn("fd_dsm_residual_fwd", 0.1, 0.1), model, x)
    want, want_g = _loss_and_grads(deep_ebm.loss_fn("dsm", 0.1, 0.1), model, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, w in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10 * float(w.abs().max()))


def test_forward_rows_in_the_quick_results(quick_results):
    """The forward-mode rows are measured in the same runs as FD and the baselines, with
    ratios against the same baselines and against their FD rows."""
    from benchmarks import deep_ebm, dimension

    dim = json.loads((quick_results / "dimension.json").read_text())["data"]
    dims = [k for k in dim if k.isdigit()]
    assert dims and dim["fd_dsm_direction"] == "residual"
    for k in dims:
        for m in FORWARD_ROWS["dimension"] + ("fd_ssm", "fd_dsm", "ssm", "dsm"):
            r = dim[k][m]
            assert r["error"] is None and _positive(r["time_ms"]), (k, m, r["error"])
    md = (quick_results / "dimension.md").read_text()
    for m in FORWARD_ROWS["dimension"]:
        row = next(line for line in md.splitlines()
                   if line.startswith(f"| {dimension.LABELS[m]} |"))
        assert "error" not in row and "not run" not in row
    assert "| FD-SSM (forward mode) / FD-SSM time |" in md
    assert "| FD-DSM (residual, forward mode) / DSM time |" in md

    ebm = json.loads((quick_results / "deep_ebm.json").read_text())["data"]
    for m in FORWARD_ROWS["deep_ebm"]:
        assert m in deep_ebm.METHODS and deep_ebm.BASELINE[m] in ("ssm", "dsm")
        assert _positive(ebm["time_ms"][m]) and math.isfinite(ebm["heldout_sm"][m])
        assert len(ebm["losses"][m]) == deep_ebm.QUICK["iters"]
        assert _positive(ebm["split_ms"][m]) and m in ebm["profile"]
    assert deep_ebm.BASELINE["fd_ssm_fwd"] == "ssm"
    assert deep_ebm.BASELINE["fd_dsm_residual_fwd"] == "dsm"
    # Forward-mode residual FD-DSM against DSM's gradient: float32 rounding only.
    assert 0 <= ebm["forward_gradient_check"] < 1e-4
    for check in ebm["estimator_check"].values():
        assert math.isfinite(check["FD-SSM, forward mode (eps -> 0)"])
    md = (quick_results / "deep_ebm.md").read_text()
    for m in FORWARD_ROWS["deep_ebm"]:
        assert f"| {deep_ebm.LABELS[m]} |" in md
    assert "Forward mode against FD (time, memory): FD-SSM (forward mode) / FD-SSM " in md


# ---------------------------------------------------------------------------------------
# The compatibility matrix (python -m benchmarks.compat), quick mode.


@pytest.fixture(scope="module")
def compat_quick(tmp_path_factory):
    from benchmarks import compat

    out = tmp_path_factory.mktemp("compat")
    assert compat.main(["--quick", "--out", str(out), "--device", "cpu", "--threads", "1"]) == 0
    return out / "quick", json.loads((out / "quick" / "compat.json").read_text())


def test_compat_matrix_quick(compat_quick):
    import sys

    import torch

    from benchmarks import compat

    _, payload = compat_quick
    d = payload["data"]
    assert payload["command"] == "python -m benchmarks.compat --quick --threads 1"
    assert payload["machine"]["torch"] == torch.__version__ and payload["machine"]["git_commit"]
    assert d["methods"] == list(compat.METHODS) and d["columns"] == list(compat.COLUMNS)
    cells = {c: d["results"][c]["cells"] for c in d["columns"]}
    # The baseline is eager FD-SSM itself: ratio exactly 1, loss equal to itself.
    eager = cells["eager"]["fd_ssm"]
    assert eager["status"] == "works" and eager["ratio"] == 1.0 and eager["rel_diff"] == 0.0
    # Every cell that works ran its steps with a finite loss and finite gradients; every
    # failure names its error.
    for c, col in cells.items():
        for m, cell in col.items():
            if cell["status"] == "works":
                assert cell["grads"] == "finite" and math.isfinite(cell["loss"]), (c, m)
                assert _positive(cell["ratio"]) and _positive(cell["time_ms"]), (c, m)
            elif cell["status"] == "fails":
                assert cell["error"], (c, m)
    # First-order autograd only: every FD row trains in every CPU column, and the compiled
    # loss (aot_eager: the eager kernels) gives exactly the eager loss.
    for m in ("fd_ssm", "fd_dsm_residual", "fd_dsm_random"):
        for c in d["columns"]:
            if c != "cuda_graphs":
                assert cells[c][m]["status"] == "works", (c, m, cells[c][m].get("error"))
        assert cells["compiled_fullgraph"][m]["rel_diff"] == 0.0
        assert cells["fsdp2"][m]["agrees"] and cells["ddp"][m]["agrees"]
    # Double backward: the autograd losses fail under the fullgraph compile, the flash
    # attention kernel and FSDP2, and run eagerly.
    for m in ("ssm", "ssm_vr", "dsm"):
        assert cells["eager"][m]["status"] == "works"
        assert cells["compiled_fullgraph"][m]["status"] == "fails"
        flash = cells["sdpa_flash"][m]
        assert flash["status"] == "fails" and "flash_attention" in flash["error"]
        assert "backward" in flash["error"]
        assert cells["fsdp2"][m]["status"] == "fails"
    # Forward mode is exact and needs a jvp rule per op: the CPU flash kernel has none.
    for m in ("fd_ssm_forward", "fd_dsm_forward"):
        assert cells["eager"][m]["status"] == "works"
        assert cells["sdpa_flash"][m]["status"] == "fails"
    # bf16 autocast: FD-SSM's value is rounding noise there, and the guard says so.
    bf16 = cells["bf16_autocast"]["fd_ssm"]
    assert not bf16["agrees"] and any("FDPrecisionWarning" in w for w in bf16["warnings"])
    if not torch.cuda.is_available():
        assert {cell["status"] for cell in cells["cuda_graphs"].values()} == {"needs a GPU"}
    if sys.version_info < (3, 12):
        assert not d["taylor_mode"]["measured"] and "3.12" in d["taylor_mode"]["reason"]


def test_compat_page_and_readme_block_render(compat_quick, monkeypatch):
    from docs import render_compat

    out, payload = compat_quick
    monkeypatch.setattr(render_compat, "BENCH", out)
    text, sources = render_compat.render_compat()
    assert sources == [render_compat.SOURCE]
    d = payload["data"]
    flash_error = d["results"]["sdpa_flash"]["cells"]["ssm"]["error"]
    # The flash error is a numbered note, and the SSM row points to it in that column.
    note = next(line for line in text.splitlines() if line.endswith(f"] {flash_error}"))
    n = note.strip().split("]")[0] + "]"
    ssm_row = text.split("   * - SSM (autograd)\n")[1].split("   * - ")[0].splitlines()
    assert ssm_row[d["columns"].index("sdpa_flash")] == f"     - fails {n}"
    assert "   * - FD-SSM\n     - works, 1x\n" in text
    readme = render_compat.readme_with_compat(
        f"a\n{render_compat.COMPAT_START}\nold\n{render_compat.COMPAT_END}\nb\n")
    assert "old" not in readme and readme.startswith("a\n") and readme.endswith("\nb\n")
    fd_ssm = {c: d["results"][c]["cells"]["fd_ssm"] for c in d["columns"]}
    expected = ["works, guard warns" if cell.get("warnings") else cell["status"]
                for cell in fd_ssm.values()]
    assert "| FD-SSM | " + " | ".join(expected) + " |" in readme
    # bf16 autocast makes FD-SSM's value noise: the README cell says the guard warned.
    assert expected[d["columns"].index("bf16_autocast")] == "works, guard warns"


# ---------------------------------------------------------------------------------------
# The precision benchmark (python -m benchmarks.precision), quick mode: not in BENCHMARKS
# (it measures errors, not time), run on its own.


def test_precision_quick_mode_measures_and_renders(tmp_path):
    from benchmarks import precision
    from docs.render_precision import render_precision

    assert precision.main(["--quick", "--out", str(tmp_path), "--threads", "1"]) == 0
    b = json.loads((tmp_path / "quick" / "precision.json").read_text())
    assert b["command"] == "python -m benchmarks.precision --quick"
    assert b["machine"]["torch"] and b["machine"]["git_commit"] and b["provenance"]["convergence"]
    for kind in ("mlp", "conv"):
        for state in ("fresh", "trained"):
            rows = {(r["precision"], r["derivatives"], r["eps"]): r
                    for r in b["data"]["models"][kind][state]["rows"]}
            # float64 forward mode against float64 nested autograd with the same directions:
            # the same numbers up to float64 rounding; float32 forward mode to float32's.
            assert rows["float64", "forward", None]["rms_rel"] < 1e-10
            assert rows["float32", "forward", None]["rms_rel"] < 1e-4
            # float64 FD: truncation only, O(eps^2) at eps 0.1
            assert 0 < rows["float64", "fd", 0.1]["rms_rel"] < 1e-3
            guard = rows["float32", "fd", 0.1]
            assert guard["guard_warned"] == (guard["guard_ratio"] > 0.3)
    for r in b["data"]["guard_grid"]:
        assert r["warned"] == (r["ratio"] > 0.3), r
    text = render_precision(b)
    for part in ("Precision of FD-SSM: rounding against exact values", "MLP energy",
                 "conv energy", "The precision guard against measured errors",
                 "``benchmarks/results/full/precision.json``"):
        assert part in text
