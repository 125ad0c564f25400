"""The training loop of every example script.

A script supplies ``step(i)``, which trains on batch ``i`` (0-based) and returns its losses
by name, and :class:`Hook` s (evaluation, checkpoint, ...) that run after a step, in the given
order, with the number of steps done. Resuming is the script's business: it restores its
state and passes ``start``; everything random in ``step(i)`` is a function of ``i``
(:mod:`.seeding`), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence


class NonFiniteLoss(FloatingPointError):
    """A training loss became inf or nan."""


@dataclasses.dataclass
class Hook:
    """``fn(done)`` after every ``every``-th step (0: never periodically) and, with
    ``at_end``, after the loop's last step (once, also when ``every`` divides it)."""

    every: int
    fn: Callable[[int], object]
    at_end: bool = False


def run(step: Callable[[int], Mapping[str, float]], *, start: int, stop: int,
        hooks: Sequence[Hook] = (), until: Callable[[int], bool] = lambda done: False,
        desc: str = "train", progress: bool = True) -> int:
    """Call ``step(i)`` for i = start, start + 1, ... while i < stop and not ``until(i)``.

    After each step the hooks run in order with ``done = i + 1``; an ``at_end`` hook runs
    when ``done == stop`` or ``until(done)``, asked when that hook's turn comes, so an earlier
    hook may decide to stop (early stopping, time budget). Raises :class:`NonFiniteLoss` when
    a loss is not finite. Returns the number of steps done.
    """
    from tqdm import tqdm

    # mininterval + refresh=False: the bar is redrawn at most twice a second, so a log
    # redirected to a file grows by a line per half second, not per step.
    bar = tqdm(total=stop, initial=start, desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=0.5)
    done = start
    try:
        while done < stop and not until(done):
            losses = step(done)
            done += 1
            for name, value in losses.items():
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"{desc}: {name} became {value} at step {done}")
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()}, refresh=False)
            for h in hooks:
                if (h.every and done % h.every == 0) or (
                        h.at_end and (done == stop or until(done))):
                    h.fn(done)
    finally:
        bar.close()
    return done
