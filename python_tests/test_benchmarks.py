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
