"""Checkpoints and result files, written atomically, and resuming from them.

Files are written to a temporary file in the same folder, fsynced, then os.replace'd. The
previous checkpoint is kept as checkpoint.prev.pt (rotated before the new one takes its
place), so ``--resume`` falls back to it, with a message, when checkpoint.pt is damaged or
missing; a damaged file is moved aside to checkpoint.pt.damaged.

Checkpoints load with ``torch.load(path, weights_only=True)``: reading one never runs code.
They hold only tensors and plain Python values (dicts, lists, tuples, str, int, float, bool,
None): state dicts, the step, histories, the RNG states as tensors
(:func:`.seeding.get_rng_state`) and the options as plain values (:func:`plain_args`). A file
that refers to any other Python object (a checkpoint written before this format, whose NumPy
RNG state was a pickled array, or a file planted in the run folder) is refused with
:class:`UnsafeCheckpointError`, and --resume does not fall back past it.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from typing import IO, Any

import torch

from .seeding import get_rng_state

CKPT_NAME = "checkpoint.pt"
PREV_CKPT_NAME = "checkpoint.prev.pt"
# The checkpoint of train_ebm / train_ncsn (:func:`save_checkpoint`).
CKPT_KEYS = ("model", "optimizer", "step", "history", "rng", "args")
# The checkpoint of the scripts that keep their own loop state (:func:`save_run_state`).
STATE_CKPT_KEYS = ("model", "optimizer", "state", "args")
# Options that must match between a checkpoint and the run resuming it.
RESUME_MUST_MATCH = ("method", "dataset", "limit", "test_limit", "batch_size", "seed", "lr",
                     "eps", "sigma", "n_projections", "width", "n_sigmas", "sigma_max", "sigma_min",
                     "condition", "alpha_directions")


class CheckpointError(Exception):
    """A checkpoint file that cannot be read (truncated, overwritten, not a checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A file that only unsafe unpickling could read (it names Python globals to call)."""


def plain_args(args: argparse.Namespace | dict) -> dict:
    """The options as plain values (str, int, float, bool, None, lists of them), as stored in
    checkpoints; any other value becomes its str()."""
    def plain(v):
        if v is None or isinstance(v, (str, bool, int, float)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)
    items = vars(args).items() if isinstance(args, argparse.Namespace) else args.items()
    return {str(k): plain(v) for k, v in items}


# ----------------------------------------------------------------------------- writing
def atomic_write(path: str, write: Callable[[IO[bytes]], Any],
                 previous: str | None = None) -> None:
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


def save_json(path: str, obj: Any) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode() + b"\n"))


def write_checkpoint(path: str, state: dict) -> None:
    """torch.save ``state`` to ``path`` atomically; the file it replaces becomes
    PREV_CKPT_NAME beside it (the fallback of :func:`load_for_resume`)."""
    previous = os.path.join(os.path.dirname(path), PREV_CKPT_NAME)
    atomic_write(path, lambda f: torch.save(state, f), previous=previous)


def save_checkpoint(path: str, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | dict, step: int, history: dict,
                    args: argparse.Namespace) -> None:
    """Model, optimizer, step, history, global RNG states and options (:data:`CKPT_KEYS`).
    ``optimizer`` may be given as its state dict (FSDP: the gathered full one)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.state_dict()
    write_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer,
                            "step": step, "history": history, "rng": get_rng_state(),
                            "args": plain_args(args)})


def save_run_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   state: dict, args: argparse.Namespace) -> None:
    """Model, optimizer, the script's own loop ``state`` and options (:data:`STATE_CKPT_KEYS`)."""
    write_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "state": state, "args": plain_args(args)})


# ----------------------------------------------------------------------------- reading
def _unsafe_globals(path: str, err: Exception) -> list[str]:
    """The Python globals a file refused by the weights-only unpickler would call (read from
    the file without running anything); empty when it is not that kind of refusal."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch.save zip file: the old format names one in the error
        names = re.findall(r"GLOBAL ([\w.]+) was not an allowed global", str(err))
    return sorted(set(names))


def _unsafe_message(path: str, names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    if all(n.startswith("numpy.") for n in names):
        return (f"{path} was not loaded: it was written by an older version of these examples, "
                f"whose NumPy RNG state ({shown}) needs more than weights_only=True "
                "unpickling; start the run again without --resume, or convert the file once "
                "(it reads NumPy arrays only) with: python -m examples.common.checkpoint "
                f"--convert {path}")
    return (f"{path} was not loaded: it refers to Python code ({shown}) that unpickling "
            "would run, so it is not a checkpoint these examples wrote; remove it (and do "
            "not load it elsewhere), then run without --resume to start again from step 0")


def load_checkpoint(path: str, map_location, keys: tuple[str, ...] = CKPT_KEYS) -> dict:
    """torch.load (weights_only=True) a checkpoint holding ``keys``; any failure is a one-line
    CheckpointError, and a file that needs unsafe unpickling an UnsafeCheckpointError."""
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol: refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated: OSError/RuntimeError; garbage: ValueError/Unpickling
        if isinstance(e, pickle.UnpicklingError):
            names = _unsafe_globals(path, e)
            if names:
                raise UnsafeCheckpointError(_unsafe_message(path, names)) from None
            reason = "not a file torch.save wrote, or one that cannot be read safely"
        else:
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise CheckpointError(f"{path} is damaged ({reason})") from e
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise CheckpointError(f"{path} is not a checkpoint of these examples (missing keys)")
    return state


def load_for_resume(folder: str, map_location, *, is_main: bool, log: Callable = print,
                    keys: tuple[str, ...] = CKPT_KEYS) -> tuple[dict, str] | None:
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
        except UnsafeCheckpointError:
            raise  # never fall back past such a file: someone has to look at it
        except CheckpointError as e:
            problem = str(e)
    if not os.path.exists(previous):
        raise CheckpointError(f"{problem}, and there is no previous checkpoint {previous}; "
                              "run without --resume to start again from step 0")
    try:
        state = load_checkpoint(previous, map_location, keys)
    except UnsafeCheckpointError:
        raise
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
                   is_main: bool = True, keys: tuple[str, ...] = CKPT_KEYS,
                   log: Callable = print) -> tuple[dict, str] | None:
    """:func:`load_for_resume` whose CheckpointError is a one-line argument error."""
    try:
        return load_for_resume(folder, map_location, is_main=is_main, log=log, keys=keys)
    except CheckpointError as e:
        parser.error(f"--resume: {e}")


def check_resume_args(p: argparse.ArgumentParser, saved: dict, args: argparse.Namespace,
                      keys: tuple[str, ...] = RESUME_MUST_MATCH) -> None:
    """An argument error when an option in ``keys`` differs from the checkpoint's."""
    ours = plain_args({k: getattr(args, k, None) for k in keys})  # as a checkpoint holds them
    for k in keys:
        if k in saved and ours[k] != saved[k]:
            p.error(f"--resume: checkpoint was made with --{k.replace('_', '-')} {saved[k]}, "
                    f"this run has {getattr(args, k, None)}")


def resume_run_state(parser: argparse.ArgumentParser, folder: str, map_location,
                     model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     args: argparse.Namespace) -> dict | None:
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


def finished_result(path: str, complete: Callable[[dict], bool]) -> dict | None:
    """The result a finished run saved at ``path`` (its metrics.json), or None when there is
    none or ``complete(result)`` is false: a run cut short by a smaller budget than the
    current one, which then resumes from its checkpoint."""
    if not os.path.exists(path):
        return None
    try:  # a file that is not such a result (edited, cut short by a full disk): run again
        with open(path) as f:
            result = json.load(f)
        return result if isinstance(result, dict) and complete(result) else None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------- old checkpoints
def _old_numpy_globals() -> list[tuple]:
    """Exactly the NumPy globals, as ``(object, name in the file)``, that a checkpoint of the
    older format refers to (its NumPy RNG state was a pickled uint32 array): array
    reconstruction, no other code."""
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
    uint32 = type(np.dtype(np.uint32))
    return [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype"),
            (uint32, f"numpy.dtypes.{uint32.__name__}"),
            (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
            (multiarray._reconstruct, "numpy._core.multiarray._reconstruct")]


def convert_old_checkpoint(path: str) -> None:
    """Rewrite, in place, a checkpoint of the older format (NumPy RNG state as a pickled
    array) in the current one. Still with weights_only=True: only the NumPy array globals of
    :func:`_old_numpy_globals` are allowed, so a file that refers to anything else is refused
    without running it."""
    import numpy as np

    from .seeding import plain_rng_state

    allowed = _old_numpy_globals()
    allowed_names = {name for _, name in allowed}
    try:
        needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a torch.save checkpoint ({type(e).__name__})") \
            from None
    if not needed <= allowed_names:
        raise UnsafeCheckpointError(_unsafe_message(path, sorted(needed - allowed_names)))
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})"[:300]) from None
    if not isinstance(state, dict) or "args" not in state:
        raise CheckpointError(f"{path} is not a checkpoint of these examples (missing keys)")
    if "rng" in state:
        state["rng"] = plain_rng_state(state["rng"])
    state["args"] = plain_args(state["args"])

    def plain(v):  # any other NumPy value left in the file (none known) as a tensor
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v.copy())
        if isinstance(v, dict):
            return type(v)((k, plain(x)) for k, x in v.items())
        if isinstance(v, (list, tuple)):
            return type(v)(plain(x) for x in v)
        return v

    state = plain(state)
    atomic_write(path, lambda f: torch.save(state, f))
    load_checkpoint(path, "cpu", keys=())  # now readable with weights_only=True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m examples.common.checkpoint",
        description="Convert, once and in place, checkpoints written by an older version of "
                    "these examples (NumPy RNG states as pickled arrays) to the current format, "
                    "which loads with torch.load(weights_only=True). Nothing in the files is "
                    "run: only NumPy's array reconstruction is allowed while reading them.")
    p.add_argument("--convert", nargs="+", required=True, metavar="PATH",
                   help="checkpoint files (OUT/checkpoint.pt, OUT/checkpoint.prev.pt)")
    args = p.parse_args(argv)
    for path in args.convert:
        try:
            convert_old_checkpoint(path)
        except (CheckpointError, OSError) as e:
            p.error(str(e))
        print(f"converted {path}")


if __name__ == "__main__":
    main()
