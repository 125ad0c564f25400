"""Shared benchmark harness: fresh processes, interleaved timing, peak memory, reports.

How a configuration is measured
-------------------------------
* Every configuration runs in a FRESH process (forked from a forkserver that has only
  imported torch and fdsm_ext, so no tensor was ever allocated in it):
  - one *timing* process builds every method of the configuration, warms each up, then
    times them in interleaved rounds (the method order rotates every round), so a burst of
    load from other processes hits all methods alike and the ratios stay meaningful;
  - one *memory* process per method runs a warm-up step (first-call allocations such as
    thread pools and kernel caches are not the step's memory), then one measured step, and
    reports its peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was
    allocated before the step; on the CPU the peak resident set size above the resident size
    before the step, read in the child: the kernel's VmHWM after resetting it
    (/proc/self/clear_refs), which is ``ru_maxrss`` for that step, or ``ru_maxrss`` itself
    where the reset is unsupported (then the warm-up step is included). glibc is told to
    return large freed blocks to the OS at once (``malloc_release_large``), so that the RSS
    follows the live tensors. Peak and increase are
    both recorded; ratios use the increase ("step memory"), since the ~0.3-0.5 GiB of the
    imported libraries is the same for every method.
* Times are the median over all timed steps; ratios are ratios of medians.

A benchmark module provides ``build(method, config, device) -> step`` where ``step()`` runs
one measured step (e.g. loss + backward); the harness only ever passes the dotted path
``"benchmarks.dimension:build"`` to the children.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import gc
import importlib
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"

_CTX: Any = None


# ---------------------------------------------------------------------------------------
# Devices, timing primitives, memory.


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_release_large() -> bool:
    """Make glibc return every large freed block to the OS at once (memory children only).

    By default glibc raises its mmap threshold after large frees and then keeps freed tensors
    in the heap, so a step that follows a warm-up step would reuse them without touching new
    pages and its peak RSS would read low. A fixed 128 KiB threshold (which also turns the
    dynamic adjustment off) and a small trim threshold make RSS follow the live tensors.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(
            libc.mallopt(m_trim_threshold, 128 * 1024)
        )
    except (OSError, AttributeError):
        return False


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported.

    ``ru_maxrss`` can never go down, so after a warm-up step the steady-state peak of the
    next step is read from VmHWM after writing 5 to /proc/self/clear_refs (Linux >= 4.0).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else ""


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def resolve(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds for one call of fn, synchronising the device around it."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------
# Fresh processes.


def _context():
    """A forkserver that has imported torch + fdsm_ext: children start in ~0.1 s, clean."""
    global _CTX
    if _CTX is None:
        if sys.platform.startswith("linux"):
            _CTX = mp.get_context("forkserver")
            # torch.optim imports torch._dynamo (~3 s): pay it once, in the server.
            _CTX.set_forkserver_preload(["benchmarks.harness", "fdsm_ext", "torch._dynamo"])
        else:  # pragma: no cover - macOS / Windows
            _CTX = mp.get_context("spawn")
    return _CTX


def in_fresh_process(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run ``fn(*args)`` (a module-level function) in a new process and return its result.

    Errors in the child (exceptions, a crash, a timeout) are returned as
    ``{"error": message}`` rather than raised, so that one failing method does not stop a
    benchmark.
    """
    ex = cf.ProcessPoolExecutor(max_workers=1, mp_context=_context())
    try:
        return ex.submit(fn, *args).result(timeout=timeout)
    except cf.TimeoutError:
        for proc in list(getattr(ex, "_processes", {}).values()):
            proc.kill()
        return {"error": f"timed out after {timeout:.0f} s"}
    except cf.process.BrokenProcessPool as exc:
        return {"error": f"child process died ({exc}); out of memory?"}
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(exc).__name__}: {first_line(exc)}"}
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _child_setup(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already started in this process
            pass
    torch.manual_seed(0)


def child_time(
    builder: str,
    config: dict,
    methods: Sequence[str],
    device: str,
    warmup: int,
    rounds: int,
    reps: dict[str, int],
    threads: int | None = None,
) -> dict:
    """Timing process: build all methods, warm up, then time them in interleaved rounds."""
    _child_setup(threads)
    build = resolve(builder)
    steps: dict[str, Callable[[], Any]] = {}
    errors: dict[str, str] = {}
    for m in methods:
        try:
            torch.manual_seed(0)
            step = build(m, config, device)
            for _ in range(warmup):
                step()
            sync(device)
            steps[m] = step
        except Exception as exc:  # noqa: BLE001
            errors[m] = f"{type(exc).__name__}: {first_line(exc)}"
    times: dict[str, list[float]] = {m: [] for m in steps}
    order = list(steps)
    for r in range(rounds):
        k = r % max(1, len(order))
        for m in order[k:] + order[:k]:
            for _ in range(reps.get(m, 1)):
                times[m].append(time_call(steps[m], device))
    return {"times": times, "errors": errors}


def child_memory(
    builder: str, config: dict, method: str, device: str, threads: int | None = None
) -> dict:
    """Memory process for one method: warm-up step, then the peak of one step above baseline."""
    _child_setup(threads)
    cuda = torch.device(device).type == "cuda"
    if not cuda:
        malloc_release_large()
    step = resolve(builder)(method, config, device)
    step()  # first-call allocations (thread pools, kernel caches) are not the step's memory
    sync(device)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        source = "torch.cuda.max_memory_allocated"
    else:
        source = "VmHWM after reset" if reset_peak_rss() else "ru_maxrss"
        base = current_rss_bytes()
    step()
    sync(device)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = hwm_rss_bytes() if source == "VmHWM after reset" else peak_rss_bytes()
    return {"peak_mib": peak / 2**20, "step_mib": (peak - base) / 2**20, "source": source}


@dataclass
class Measurement:
    method: str
    time_ms: float = math.nan
    n_times: int = 0
    peak_mib: float = math.nan
    step_mib: float = math.nan
    error: str | None = None


def measure(
    builder: str,
    config: dict,
    methods: Sequence[str],
    *,
    device: str,
    warmup: int = 1,
    rounds: int = 3,
    reps: int | dict[str, int] = 1,
    memory: bool = True,
    timeout: float = 600.0,
    threads: int | None = None,
) -> dict[str, Measurement]:
    """Time (interleaved, one fresh process) and measure memory (one fresh process each)."""
    reps_map = reps if isinstance(reps, dict) else {m: reps for m in methods}
    reps_map = {m: reps_map.get(m, 1) for m in methods}
    out = {m: Measurement(m) for m in methods}
    res = in_fresh_process(
        child_time, builder, config, list(methods), device, warmup, rounds, reps_map, threads,
        timeout=timeout,
    )
    if "error" in res:
        for m in methods:
            out[m].error = res["error"]
        return out
    for m, msg in res["errors"].items():
        out[m].error = msg
    for m, ts in res["times"].items():
        out[m].time_ms = 1e3 * median(ts)
        out[m].n_times = len(ts)
    if memory:
        for m in methods:
            if out[m].error:
                continue
            mem = in_fresh_process(child_memory, builder, config, m, device, threads,
                                   timeout=timeout)
            if "error" in mem:
                out[m].error = "memory: " + mem["error"]
            else:
                out[m].peak_mib = mem["peak_mib"]
                out[m].step_mib = mem["step_mib"]
    return out


# ---------------------------------------------------------------------------------------
# Machine description, formatting, targets, reports.


def git_commit() -> str:
    """HEAD of the repository, with "+dirty" when tracked files differ from it."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("diff", "--quiet", "HEAD").returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def machine_info(device: str, threads: int | None = None) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import fdsm_ext

        cuda_kernels = fdsm_ext.has_cuda_kernels()
    except Exception as exc:  # noqa: BLE001
        cuda_kernels = f"fdsm_ext not importable: {exc}"
    import hashlib

    models_py = REPO_ROOT / "examples" / "common" / "models.py"
    models_sha = (hashlib.sha256(models_py.read_bytes()).hexdigest()[:12]
                  if models_py.exists() else "missing")
    try:
        from fdsm_ext import _C

        ext_sha = hashlib.sha256(Path(_C.__file__).read_bytes()).hexdigest()[:12]
    except Exception:  # noqa: BLE001
        ext_sha = "unavailable"
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "examples_models_py_sha256": models_sha,
        "fdsm_ext_C_sha256": ext_sha,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "has_cuda_kernels": cuda_kernels,
        "load_average_1_5_15": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.{digits - 1}e}"
    if ax >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


@dataclass
class Target:
    name: str
    measured: float
    op: str  # "<=" or ">="
    required: float
    note: str = ""

    @property
    def passed(self) -> bool:
        if self.measured is None or math.isnan(self.measured):
            return False
        return self.measured <= self.required if self.op == "<=" else self.measured >= self.required

    def line(self) -> str:
        status = "PASS" if self.passed else "MISS"
        return (f"{self.name}: measured {fmt(self.measured)} "
                f"(required {self.op} {self.required}) {status}"
                + (f"  [{self.note}]" if self.note and not self.passed else ""))


@dataclass
class Section:
    name: str
    title: str
    markdown: str
    targets: list[Target] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def write_section(section: Section, outdir: Path, machine: dict, command: str) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{section.name}.md").write_text(section.markdown.rstrip() + "\n")
    payload = {
        "name": section.name,
        "title": section.title,
        "machine": machine,
        "command": command,
        "targets": [asdict(t) | {"passed": t.passed} for t in section.targets],
        "data": section.data,
    }
    (outdir / f"{section.name}.json").write_text(json.dumps(payload, indent=1, default=str))
    for t in section.targets:
        print("TARGET " + t.line())


def write_readme(outdir: Path, mode: str) -> Path:
    """Compose README.md from every section written into ``outdir`` (in benchmark order)."""
    from . import BENCHMARKS

    parts = [f"# fdsm_ext benchmarks ({mode} mode)\n"]
    targets: list[str] = []
    body: list[str] = []
    machines: list[str] = []
    for name in BENCHMARKS:
        js = outdir / f"{name}.json"
        md = outdir / f"{name}.md"
        if not (js.exists() and md.exists()):
            continue
        try:  # a file cut short by a killed run, or edited by hand: left out, with a warning
            payload = json.loads(js.read_text())
            m = payload["machine"]
            m["date"], m["cpu"], m["cores"], payload["command"], payload["targets"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            print(f"warning: {js} left out of the README: not a results file of this harness "
                  f"({type(e).__name__}: {e}); re-run python -m benchmarks.{name}",
                  file=sys.stderr)
            continue
        machines.append(
            f"| {name} | {m['date']} | {m['cpu']}, {m['cores']} cores | `{payload['command']}` | "
            f"{' / '.join(f'{x:.2f}' for x in m['load_average_1_5_15'])} | "
            f"{m.get('examples_models_py_sha256', '?')} | {m.get('fdsm_ext_C_sha256', '?')} |"
        )
        for t in payload["targets"]:
            status = "PASS" if t["passed"] else "MISS"
            targets.append(
                f"| {t['name']} | {fmt(t['measured'])} | {t['op']} {t['required']} | {status} | "
                f"{(t.get('note') or '') if not t['passed'] else ''} |"
            )
        body.append(md.read_text())
        last_machine = m
    if not body:
        raise FileNotFoundError(f"no benchmark results in {outdir}")
    # Benchmarks re-run alone (--only) may come from another machine: each row names its CPU.
    m = last_machine
    parts.append(
        f"Machine of the last row below (each row names its own CPU): "
        f"{m['cpu']}, {m['cores']} cores (torch uses {m['torch_threads']} threads), "
        f"torch {m['torch']}, Python {m['python']}, device `{m['device']}`"
        + (f" ({m['gpu']})" if "gpu" in m else "")
        + f", fdsm_ext CUDA kernels: {m['has_cuda_kernels']}.\n"
    )
    parts.append(
        "Each configuration runs in a fresh process; methods are timed in interleaved "
        "rounds (median of all timed steps); memory is the peak of one step (after a warm-up "
        "step) above the pre-step baseline (peak RSS read in the child on CPU, "
        "`torch.cuda.max_memory_allocated` on GPU), one fresh process per method. The load "
        "average shows how busy the machine was (other jobs share it).\n"
    )
    parts.append("| benchmark | run at | CPU | command | load avg (1/5/15 min) | "
                 "examples/common/models.py sha256 | fdsm_ext._C sha256 |\n"
                 "|---|---|---|---|---|---|---|")
    parts.append("\n".join(machines) + "\n")
    if targets:
        parts.append("## Targets\n")
        parts.append("| target | measured | required | status | note |\n|---|---|---|---|---|")
        parts.append("\n".join(targets) + "\n")
    parts.extend(body)
    path = outdir / "README.md"
    path.write_text("\n".join(parts))
    return path


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes (--quick, --out, --device, --threads)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS_ROOT,
                   help="results root; files go to OUT/<quick|full>/")
    p.add_argument("--device", type=device_arg, default=default_device(),
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=positive_int_arg, default=default_threads(),
                   help="torch threads in the children (default: 1 on machines with <= 2 "
                   "cores, where OpenMP barriers under load from other processes make "
                   "multi-threaded timings erratic; else torch's default)")
    return p


def device_arg(value: str) -> str:
    """--device: cpu, or cuda when torch sees a GPU (checked here, not in the children)."""
    if value not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; choose cpu or cuda")
    if value == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("cuda requested but torch.cuda.is_available() is "
                                         "False; use --device cpu")
    return value


def positive_int_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return n


def check_json_files(p: argparse.ArgumentParser, option: str, paths: Sequence) -> None:
    """An argument error (one line) when a file given to ``option`` exists but is not JSON;
    checked before the benchmark runs rather than after it (missing files are allowed)."""
    for path in paths:
        if not Path(path).exists():
            continue
        try:
            json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            p.error(f"{option} {path}: not a readable JSON file ({type(e).__name__}: {e})")


def default_threads() -> int:
    return 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()


def run_module(name: str, run: Callable[..., Section], argv: Sequence[str] | None = None,
               description: str = "") -> Section:
    """Entry point shared by the benchmark modules (``python -m benchmarks.NAME``)."""
    args = base_parser(description or name).parse_args(argv)
    return run_and_write(name, run, args)


def run_and_write(name: str, run: Callable[..., Section], args: argparse.Namespace,
                  **kwargs: Any) -> Section:
    """``run(quick, outdir, device, threads, **kwargs)``, then its files and the README."""
    mode = "quick" if args.quick else "full"
    outdir = Path(args.out) / mode
    outdir.mkdir(parents=True, exist_ok=True)
    command = f"python -m benchmarks.{name}" + (" --quick" if args.quick else "")
    t0 = time.perf_counter()
    section = run(quick=args.quick, outdir=outdir, device=args.device, threads=args.threads,
                  **kwargs)
    section.data["wall_s"] = time.perf_counter() - t0
    write_section(section, outdir, machine_info(args.device, args.threads), command)
    write_readme(outdir, mode)
    print(f"[{name}] done in {section.data['wall_s']:.1f} s -> {outdir}", flush=True)
    return section


def plot_setup():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
