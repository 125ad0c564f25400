"""Checkpoints and result files, written atomically, and resuming from them.

Files are written to a temporary file in the same folder, fsynced, then os.replace'd. The
previous checkpoint is kept as checkpoint.prev.pt (rotated before the new one takes its
place), so ``--resume`` falls back to it, with a message, when checkpoint.pt is damaged or
missing; a damaged file is moved aside to checkpoint.pt.damaged.
"""

from __future__ import annotations

import argparse
import json
import os
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
RESUME_MUST_MATCH = ("method", "dataset", "limit", "batch_size", "seed", "lr", "eps", "sigma",
                     "n_projections", "width", "n_sigmas", "sigma_max", "sigma_min",
                     "condition", "alpha_directions")


class CheckpointError(Exception):
    """A checkpoint file that cannot be read (truncated, overwritten, not a checkpoint)."""


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


def save_checkpoint(path: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    step: int, history: dict, args: argparse.Namespace) -> None:
    """Model, optimizer, step, history, global RNG states and options (:data:`CKPT_KEYS`)."""
    write_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "step": step, "history": history, "rng": get_rng_state(),
                            "args": vars(args)})


def save_run_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   state: dict, args: argparse.Namespace) -> None:
    """Model, optimizer, the script's own loop ``state`` and options (:data:`STATE_CKPT_KEYS`)."""
    write_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "state": state, "args": vars(args)})


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: str, map_location, keys: tuple[str, ...] = CKPT_KEYS) -> dict:
    """torch.load a checkpoint holding ``keys``; any failure is a one-line CheckpointError."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated: OSError/RuntimeError; garbage: ValueError/Unpickling
        reason = " ".join(f"{type(e).__name__}: {e}".split())
        raise CheckpointError(f"{path} is damaged ({reason[:200]})") from e
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
    for k in keys:
        if k in saved and getattr(args, k, None) != saved[k]:
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
    with open(path) as f:
        result = json.load(f)
    return result if complete(result) else None
