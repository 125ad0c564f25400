"""Compatibility matrix: where each score-matching estimator trains, and at what cost.

    python -m benchmarks.compat [--quick] [--out DIR] [--device cpu|cuda] [--threads N]

Rows are estimators, columns are ways of running a training step (zero_grad, loss, backward,
Adam step). A cell *works* when its steps ran (the checked first one, the warm-up and the
timed ones), the first loss is finite and every parameter gradient that exists is finite;
it *fails* with the first line of the error otherwise. Beside that, each cell records the
first step's loss against the same loss computed eagerly in float32 on the same model,
batch and seed (relative difference and the tolerance it is held to), for the FD rows that
eager loss's eps -> 0 limit by forward mode (``exact_loss``: how far float32 rounding moves
FD's value), the precision warnings raised by the first step, and the time per step
relative to eager FD-SSM on the same model (``ratio``), both measured in the same process
in interleaved rounds (median).

Columns (each in its own fresh process; the distributed ones in two processes, gloo):

* ``eager``: the plain step (MLP energy).
* ``compiled_model``: ``torch.compile(model)``, the loss eager.
* ``compiled_fullgraph``: the whole loss under ``torch.compile(fullgraph=True)``, the seed an
  int64 tensor (backend ``aot_eager`` in quick mode, ``inductor`` in full mode).
* ``sdpa_flash``: the examples' ViT energy (``examples.common.transformer.ViTEnergy``,
  attention by ``F.scaled_dot_product_attention``) with torch's default backend (the flash
  kernel where it applies); the reference loss uses the MATH backend.
* ``fsdp2`` / ``ddp``: ``fully_shard`` (FSDP2) / ``DistributedDataParallel``, 2 processes,
  gloo on the CPU, each on half the batch; the ratio is against eager FD-SSM on the same
  half batch in the same process.
* ``bf16_autocast``: the loss under ``torch.autocast(dtype=torch.bfloat16)``.
* ``channels_last``: a conv energy and its input in ``torch.channels_last``; the ratio is
  against eager FD-SSM on the same conv model in the default format; ``model_input_channels_last``
  records whether the model's own input arrived in that format.
* ``cuda_graphs``: the whole step captured by ``torch.cuda.graphs`` (CUDA only; "needs a GPU"
  on a machine without one).

Taylor mode (``jet-for-pytorch``) is measured only if it is importable; it is never a
dependency, and the results file records why it is absent.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import importlib.util
import math
import multiprocessing as mp
import os
import platform
import queue as _queue
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

import fdsm_ext
from fdsm_ext import _guard

from .harness import (
    Section,
    _context,
    base_parser,
    first_line,
    in_fresh_process,
    machine_info,
    md_table,
    median,
    sync,
    time_call,
    write_section,
)

METHODS = ("fd_ssm", "fd_dsm_residual", "fd_dsm_random", "ssm", "ssm_vr", "dsm",
           "fd_ssm_forward", "fd_dsm_forward")
LABELS = {
    "fd_ssm": "FD-SSM",
    "fd_dsm_residual": "FD-DSM (residual)",
    "fd_dsm_random": "FD-DSM (random)",
    "ssm": "SSM (autograd)",
    "ssm_vr": "SSM-VR (autograd)",
    "dsm": "DSM (autograd, double backward)",
    "fd_ssm_forward": "FD-SSM, derivatives=\"forward\"",
    "fd_dsm_forward": "FD-DSM (residual), derivatives=\"forward\"",
}
COLUMNS = ("eager", "compiled_model", "compiled_fullgraph", "sdpa_flash", "fsdp2", "ddp",
           "bf16_autocast", "channels_last", "cuda_graphs")
COLUMN_LABELS = {
    "eager": "eager",
    "compiled_model": "torch.compile(model)",
    "compiled_fullgraph": "loss under torch.compile(fullgraph=True)",
    "sdpa_flash": "SDPA, default (flash) backend",
    "fsdp2": "FSDP2 fully_shard, 2 processes",
    "ddp": "DDP, 2 processes",
    "bf16_autocast": "bf16 autocast",
    "channels_last": "channels_last",
    "cuda_graphs": "CUDA graphs",
}
MODEL_OF = {"sdpa_flash": "transformer", "channels_last": "conv"}  # else the MLP
DISTRIBUTED = ("fsdp2", "ddp")
SIGMA = 0.1
# Relative difference |loss - eager float32 loss| / |eager float32 loss| a cell is held to.
TOLERANCE = {"bf16_autocast": 0.1}
DEFAULT_TOLERANCE = 1e-3

FULL = dict(mlp=dict(d=784, hidden=256, batch=128), conv=dict(size=28, ch=16, batch=64),
            transformer=dict(size=28, patch=4, dim=64, heads=4, depth=2, batch=64),
            backend="inductor", warmup=2, rounds=15, reps=1, timeout=2400)
QUICK = dict(mlp=dict(d=16, hidden=32, batch=16), conv=dict(size=8, ch=4, batch=8),
             transformer=dict(size=8, patch=2, dim=16, heads=2, depth=1, batch=8),
             backend="aot_eager", warmup=2, rounds=3, reps=1, timeout=300)

# Checked with `pip download jet-for-pytorch==1.0.0 --no-deps` on 2026-12-03.
JET_PIP = ("pip: \"Ignored the following versions that require a different python version: "
           "0.0.1 Requires-Python >=3.12; 1.0.0 Requires-Python >=3.12\"")


# ---------------------------------------------------------------------------------------
# Models: energies E(x), shape (B,).


# The energies' last layers have no bias: a constant added to E changes no score, so score
# matching gives it no gradient, and DDP then stops at the next step (an unused parameter).


def mlp_energy(d: int, hidden: int) -> nn.Module:
    """E(x) = w3^T softplus(W2 softplus(W1 x + b1) + b2) on flat inputs (B, d)."""
    return nn.Sequential(nn.Linear(d, hidden), nn.Softplus(), nn.Linear(hidden, hidden),
                         nn.Softplus(), nn.Linear(hidden, 1, bias=False), nn.Flatten(0))


def conv_energy(size: int, ch: int) -> nn.Module:
    """Three softplus convolutions (the last two of stride 2) and a linear head on (B, 1, H, W)."""
    out = (size + 3) // 4
    return nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.Softplus(),
                         nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.Softplus(),
                         nn.Conv2d(ch, ch, 3, stride=2, padding=1), nn.Softplus(),
                         nn.Flatten(1), nn.Linear(ch * out * out, 1, bias=False), nn.Flatten(0))


def transformer_energy(size: int, patch: int, dim: int, heads: int, depth: int) -> nn.Module:
    """The ViT energy of the examples, attention left to torch's default backend."""
    from examples.common.transformer import ViTEnergy

    return ViTEnergy(1, size, patch=patch, dim=dim, depth=depth, heads=heads, head_dim=dim,
                     attention=None)


def make_model(kind: str, cfg: dict) -> tuple[nn.Module, Tensor]:
    """The column's model (seeded initialisation) and a batch in [0, 1]."""
    torch.manual_seed(0)
    c = cfg[kind]
    if kind == "mlp":
        model, x = mlp_energy(c["d"], c["hidden"]), torch.rand(c["batch"], c["d"])
    elif kind == "conv":
        model, x = conv_energy(c["size"], c["ch"]), torch.rand(c["batch"], 1, c["size"], c["size"])
    else:
        model = transformer_energy(c["size"], c["patch"], c["dim"], c["heads"], c["depth"])
        x = torch.rand(c["batch"], 1, c["size"], c["size"])
    return model, x


def loss_fn(method: str) -> Callable[[Callable, Tensor, Tensor], Tensor]:
    """The method's loss as ``f(model, x, seed)`` (energies; DSM noise level SIGMA)."""
    e = "energy"
    return {
        "fd_ssm": lambda m, x, s: fdsm_ext.fd_ssm_loss(m, x, output=e, seed=s),
        "fd_dsm_residual": lambda m, x, s: fdsm_ext.fd_dsm_loss(
            m, x, SIGMA, output=e, direction="residual", seed=s),
        "fd_dsm_random": lambda m, x, s: fdsm_ext.fd_dsm_loss(
            m, x, SIGMA, output=e, direction="random", seed=s),
        "ssm": lambda m, x, s: fdsm_ext.ssm_loss(m, x, output=e, seed=s),
        "ssm_vr": lambda m, x, s: fdsm_ext.ssm_loss(m, x, output=e, variance_reduction=True,
                                                    seed=s),
        "dsm": lambda m, x, s: fdsm_ext.dsm_loss(m, x, SIGMA, output=e, seed=s),
        "fd_ssm_forward": lambda m, x, s: fdsm_ext.fd_ssm_loss(m, x, output=e, seed=s,
                                                               derivatives="forward"),
        "fd_dsm_forward": lambda m, x, s: fdsm_ext.fd_dsm_loss(
            m, x, SIGMA, output=e, direction="residual", seed=s, derivatives="forward"),
    }[method]


# ---------------------------------------------------------------------------------------
# One cell: build the step, check its first call against the eager float32 loss.


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


# The eps -> 0 limit of each FD row: the same estimator and directions by forward mode.
EXACT_PEER = {
    "fd_ssm": lambda m, x, s: fdsm_ext.fd_ssm_loss(m, x, output="energy", seed=s,
                                                   derivatives="forward"),
    "fd_dsm_residual": lambda m, x, s: fdsm_ext.fd_dsm_loss(
        m, x, SIGMA, output="energy", direction="residual", seed=s, derivatives="forward"),
    "fd_dsm_random": lambda m, x, s: fdsm_ext.fd_dsm_loss(
        m, x, SIGMA, output="energy", direction="random", seed=s, derivatives="forward"),
}


def _reference_loss(method: str, column: str, model: nn.Module, x: Tensor) -> dict:
    """The eager float32 loss at seed 0 on a copy of the initial model (MATH attention for
    the SDPA column: the flash kernel has no double-backward rule), and for the FD rows its
    eps -> 0 limit (``exact_loss``), which shows how far float32 rounding moves FD's value."""
    ref_model = copy.deepcopy(model)
    fns = {"ref_loss": loss_fn(method)}
    if method in EXACT_PEER:
        fns["exact_loss"] = EXACT_PEER[method]
    out: dict = {}
    with contextlib.ExitStack() as stack:
        if column == "sdpa_flash":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        for key, fn in fns.items():
            try:
                out[key] = float(fn(ref_model, x, torch.tensor(0)).detach())
            except Exception as exc:  # noqa: BLE001 - only the main reference is required
                if key == "ref_loss":
                    raise
                out["exact_error"] = _error(exc)
    if "exact_loss" in out:
        out["ref_vs_exact"] = _rel(out["ref_loss"], out["exact_loss"])
    return out


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b != 0 else (0.0 if a == b else math.inf)


def _verdict(message: Warning | str) -> str:
    """A precision warning up to its verdict (the estimate, the ratio, noise or not)."""
    return str(message).split(" (Warns above")[0].splitlines()[0]


def _grad_state(params: list[nn.Parameter]) -> tuple[str, int]:
    """("finite" | "none" | "not finite", number of parameters without a gradient).

    A parameter the loss does not depend on gets none (the energy's last bias, for the
    losses that see only x-derivatives of the energy), so only the gradients that exist must
    be finite, and at least one must exist.
    """
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    if not local:
        return "none", len(params)
    ok = all(bool(torch.isfinite(g).all()) for g in local)
    return ("finite" if ok else "not finite"), len(params) - len(grads)


class Cell:
    """One method under one column: ``step()`` runs one training step; ``check`` its first."""

    def __init__(self, method: str, column: str, model: nn.Module, x: Tensor, cfg: dict,
                 device: str, copy_model: bool = True):
        self.method, self.column, self.device = method, column, device
        self.info: dict = {}
        fn = loss_fn(method)
        # Every cell trains its own copy of the same initial model.
        model = (copy.deepcopy(model) if copy_model else model).to(device)
        x = x.to(device)
        if column == "channels_last":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            seen: list[bool] = []
            model.register_forward_pre_hook(
                lambda mod, args: seen.append(args[0].is_contiguous(
                    memory_format=torch.channels_last)) if not seen else None)
            self._seen = seen
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=1e-4,
                                    capturable=column == "cuda_graphs")
        call_model = model
        if column == "compiled_model":
            call_model = torch.compile(model, backend=cfg["backend"])
        if column == "compiled_fullgraph":
            fn = torch.compile(fn, backend=cfg["backend"], fullgraph=True)
        self.model, self.call_model, self.fn, self.x = model, call_model, fn, x
        self.counter = 0
        self.graph = None

    def loss(self, seed: Tensor) -> Tensor:
        if self.column == "bf16_autocast":
            dev = torch.device(self.device).type
            with torch.autocast(dev, dtype=torch.bfloat16):
                return self.fn(self.call_model, self.x, seed)
        return self.fn(self.call_model, self.x, seed)

    def _eager_step(self, seed: Tensor) -> Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(seed)
        loss.backward()
        self.opt.step()
        return loss

    def check(self, refs: dict) -> None:
        """First step (seed 0): outcome, loss against the reference, gradients, warnings."""
        # The precision guard warns once per call site, and every cell calls the losses from
        # the same lines (loss_fn): forget earlier cells so that this first step is checked.
        _guard._calls.clear()
        _guard._probe_noise.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(torch.tensor(0, device=self.device))
            loss.backward()
            grads, without = _grad_state(self.params)
            self.opt.step()
        value = float(loss.detach().float())
        tol = TOLERANCE.get(self.column, DEFAULT_TOLERANCE)
        rel = _rel(value, refs["ref_loss"])
        self.info.update(refs)
        self.info.update(
            loss=value, rel_diff=rel, tol=tol, agrees=rel <= tol, grads=grads,
            params_without_grad=without,
            warnings=sorted({f"{w.category.__name__}: {_verdict(w.message)}" for w in caught
                             if issubclass(w.category, fdsm_ext.FDPrecisionWarning)}))
        if self.column == "channels_last":
            self.info["model_input_channels_last"] = bool(self._seen and self._seen[0])
        if not math.isfinite(value):
            raise FloatingPointError(f"the loss is not finite ({value})")
        if grads != "finite":
            raise FloatingPointError(f"parameter gradients {grads}")
        if self.column == "cuda_graphs":
            self._capture()

    def _capture(self) -> None:
        """Capture one whole training step in a CUDA graph (after warm-up on a side stream)."""
        self.static_seed = torch.tensor(1, device=self.device)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._eager_step(self.static_seed)
        torch.cuda.current_stream().wait_stream(s)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self.loss(self.static_seed)
            self.static_loss.backward()
            self.opt.step()
        self.graph.replay()
        torch.cuda.synchronize()
        if not math.isfinite(float(self.static_loss)):
            raise FloatingPointError("the replayed loss is not finite")

    def step(self) -> None:
        self.counter += 1
        if self.graph is not None:
            self.static_seed.fill_(self.counter)
            self.graph.replay()
        else:
            self._eager_step(torch.tensor(self.counter, device=self.device))


def _build_cell(method: str, column: str, model: nn.Module, x: Tensor, cfg: dict,
                device: str, warmup: int) -> Cell:
    cell = Cell(method, column, model, x, cfg, device)
    cell.check(_reference_loss(method, column, model, x))
    for _ in range(warmup - 1):
        cell.step()
    sync(device)
    return cell


def _time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, reps: int,
                      device: str, barrier: Callable[[], None] | None = None,
                      ) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per step of each step function, in rotating order; a step that raises is
    dropped from the remaining rounds and its error returned."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    errors: dict[str, str] = {}
    order = list(steps)
    for r in range(rounds):
        k = r % max(1, len(order))
        for name in order[k:] + order[:k]:
            for _ in range(reps):
                if name in errors:
                    break
                if barrier is not None:
                    barrier()
                try:
                    times[name].append(time_call(steps[name], device))
                except Exception as exc:  # noqa: BLE001 - a later step failed: recorded
                    errors[name] = f"at step {len(times[name]) + 2}: {_error(exc)}"
    return {k: 1e3 * median(v) for k, v in times.items() if k not in errors}, errors


def _finish(cells: dict[str, dict], times: dict[str, float], errors: dict[str, str]) -> float:
    """Times and ratios to the baseline into the cells; a step failed while timed fails."""
    for m, msg in errors.items():
        if m in cells:
            cells[m].update(status="fails", error=msg)
    if "baseline" not in times:
        raise RuntimeError("eager FD-SSM, the baseline, failed " + errors.get("baseline", ""))
    base = times["baseline"]
    for m, t in times.items():
        if m in cells:
            cells[m].update(time_ms=t, ratio=t / base)
    return base


# ---------------------------------------------------------------------------------------
# Single-process columns (one fresh process each).


def child_column(column: str, cfg: dict, device: str, threads: int | None) -> dict:
    """Every method under ``column`` and eager FD-SSM on the same model, timed interleaved."""
    if threads:
        torch.set_num_threads(threads)
    kind = MODEL_OF.get(column, "mlp")
    model, x = make_model(kind, cfg)
    if column == "cuda_graphs" and device != "cuda":
        return {"cells": {m: {"status": "needs a GPU", "error": "needs a GPU (no CUDA device)"}
                          for m in METHODS}, "model": kind}
    torch._dynamo.reset()
    cells: dict[str, dict] = {}
    steps: dict[str, Callable[[], None]] = {}
    # The baseline: eager FD-SSM on the same model, default memory format and attention.
    base_col = "eager"
    base = _build_cell("fd_ssm", base_col, model, x, cfg, device, cfg["warmup"])
    steps["baseline"] = base.step
    for m in METHODS:
        if column == "eager" and m == "fd_ssm":
            cells[m] = {"status": "works", "error": None, **base.info}
            continue
        cell = None
        try:
            cell = _build_cell(m, column, model, x, cfg, device, cfg["warmup"])
            steps[m] = cell.step
            cells[m] = {"status": "works", "error": None, **cell.info}
        except Exception as exc:  # noqa: BLE001 - the outcome is the cell's content
            cells[m] = {"status": "fails", "error": _error(exc),
                        **(cell.info if cell is not None else {})}
    times, errors = _time_interleaved(steps, cfg["rounds"], cfg["reps"], device)
    if column == "eager" and "baseline" in times:
        times["fd_ssm"] = times["baseline"]
    base = _finish(cells, times, errors)
    return {"cells": cells, "baseline_ms": base, "model": kind,
            "model_class": type(model).__module__ + "." + type(model).__name__}


# ---------------------------------------------------------------------------------------
# Distributed columns: two processes, gloo, each on half the batch.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrap(column: str, model: nn.Module) -> nn.Module:
    if column == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if any(p.requires_grad for p in layer.parameters(recurse=False)):
            fully_shard(layer)
    fully_shard(model)
    return model


def dist_worker(rank: int, world: int, port: int, column: str, cfg: dict,
                threads: int | None, out: mp.Queue) -> None:
    """One rank: each method on the wrapped model against eager FD-SSM on its half batch."""
    import datetime

    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=cfg.get("dist_timeout", 120)))
        model, x = make_model("mlp", cfg)
        x = x.chunk(world)[rank].contiguous()
        base = _build_cell("fd_ssm", "eager", model, x, cfg, "cpu", cfg["warmup"])
        steps: dict[str, Callable[[], None]] = {"baseline": base.step}
        cells: dict[str, dict] = {}
        for m in METHODS:
            cell = None
            try:
                refs = _reference_loss(m, column, model, x)
                cell = Cell(m, column, _wrap(column, copy.deepcopy(model)), x, cfg, "cpu",
                            copy_model=False)
                cell.check(refs)
                for _ in range(cfg["warmup"] - 1):
                    cell.step()
                steps[m] = cell.step
                cells[m] = {"status": "works", "error": None, **cell.info}
            except Exception as exc:  # noqa: BLE001
                cells[m] = {"status": "fails", "error": _error(exc),
                            **(cell.info if cell is not None else {})}
        # A method that failed on one rank only must not be timed on the other.
        ok = torch.tensor([m in steps for m in METHODS], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        for m, flag in zip(METHODS, ok.tolist()):
            if not flag and m in steps:
                del steps[m]
                cells[m] = {**cells[m], "status": "fails",
                            "error": "failed on the other rank"}
        times, errors = _time_interleaved(steps, cfg["rounds"], cfg["reps"], "cpu",
                                          dist.barrier)
        base = _finish(cells, times, errors)
        out.put((rank, {"cells": cells, "baseline_ms": base, "model": "mlp",
                        "world_size": world}))
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        out.put((rank, {"error": _error(exc)}))


def run_distributed(column: str, cfg: dict, threads: int | None, world: int = 2) -> dict:
    """Start ``world`` ranks (from the harness's forkserver) and return rank 0's cells."""
    ctx = _context()
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=dist_worker, args=(r, world, port, column, cfg, threads, out))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    deadline = time.monotonic() + cfg["timeout"]
    try:
        while len(results) < world:
            try:
                rank, res = out.get(timeout=max(1.0, deadline - time.monotonic()))
            except _queue.Empty:
                return {"error": f"timed out after {cfg['timeout']} s"}
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if "error" in results[0]:
        return results[0]
    return results[0]


# ---------------------------------------------------------------------------------------
# The benchmark.


def taylor_mode() -> dict:
    """Whether jet-for-pytorch is importable here (it is never installed by this project)."""
    if importlib.util.find_spec("jet") is not None:
        return {"measured": False, "importable": True,
                "reason": "jet is importable but no Taylor-mode row is implemented"}
    return {"measured": False, "importable": False,
            "reason": (f"jet-for-pytorch is not installable beside Python "
                       f"{platform.python_version()}: every release requires Python >= 3.12 "
                       f"({JET_PIP})")}


def run(quick: bool, outdir: Path, device: str, threads: int | None = None) -> Section:
    cfg = dict(QUICK if quick else FULL)
    columns: dict[str, dict] = {}
    for column in COLUMNS:
        t0 = time.perf_counter()
        print(f"[compat] {column} ...", flush=True)
        if column in DISTRIBUTED:
            res = run_distributed(column, cfg, threads)
        else:
            res = in_fresh_process(child_column, column, cfg, device, threads,
                                   timeout=cfg["timeout"])
        if "error" in res:  # the whole column's process failed
            res = {"cells": {m: {"status": "fails", "error": res["error"]} for m in METHODS},
                   "model": MODEL_OF.get(column, "mlp")}
        res["device"] = "cpu" if column in DISTRIBUTED else device
        res["wall_s"] = time.perf_counter() - t0
        columns[column] = res
        print(f"[compat] {column}: "
              + ", ".join(f"{m} {c['status']}" for m, c in res["cells"].items())
              + f" ({res['wall_s']:.0f} s)", flush=True)
    data = {"config": cfg, "methods": list(METHODS), "labels": LABELS,
            "columns": list(COLUMNS), "column_labels": COLUMN_LABELS, "results": columns,
            "taylor_mode": taylor_mode(), "sigma": SIGMA,
            "provenance": {"convergence": "not applicable: single training steps are timed, "
                                          "no model is trained"}}
    return Section("compat", "Compatibility matrix", markdown(data), [], data)


def cell_text(c: dict) -> str:
    if c["status"] == "needs a GPU":
        return "needs a GPU"
    if c["status"] != "works":
        return "fails: " + (c.get("error") or "").replace("|", "/")[:120]
    text = "works"
    if c.get("ratio") is not None:
        text += f", {c['ratio']:.2f}x"
    if not c.get("agrees", True):
        text += f" (loss differs by {100 * c['rel_diff']:.2g} %)"
    return text


def markdown(data: dict) -> str:
    head = ["method"] + [COLUMN_LABELS[c] for c in data["columns"]]
    rows = [[LABELS[m]] + [cell_text(data["results"][c]["cells"][m]) for c in data["columns"]]
            for m in data["methods"]]
    return "\n".join([
        "## Compatibility matrix\n",
        "Each cell: whether a training step works (finite loss and parameter gradients) and "
        "its time relative to eager FD-SSM on the same model, in the same process.\n",
        md_table(head, rows),
        f"\nTaylor mode: {data['taylor_mode']['reason']}.\n",
    ])


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    outdir = Path(args.out) / mode
    command = "python -m benchmarks.compat" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "")
    t0 = time.perf_counter()
    section = run(args.quick, outdir, args.device, args.threads)
    section.data["wall_s"] = time.perf_counter() - t0
    section.data["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    write_section(section, outdir, machine_info(args.device, args.threads), command)
    print(section.markdown)
    print(f"[compat] done in {section.data['wall_s']:.1f} s -> {outdir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

