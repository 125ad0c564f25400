"""Run every benchmark (or one) and write benchmarks/results/<quick|full>/README.md + PNGs.

    python -m benchmarks.run [--quick] [--only NAME] [--out DIR] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from . import BENCHMARKS
from .harness import RESULTS_ROOT, default_device, default_threads, run_and_write, write_readme


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--only", choices=BENCHMARKS, action="append",
                   help="run only this benchmark (repeatable)")
    p.add_argument("--out", type=Path, default=RESULTS_ROOT)
    p.add_argument("--device", default=default_device())
    p.add_argument("--threads", type=int, default=default_threads())
    args = p.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    t0 = time.perf_counter()
    sections = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        sections.append(run_and_write(name, module.run, args))
    mode = "quick" if args.quick else "full"
    readme = write_readme(Path(args.out) / mode, mode)
    print(f"\nall done in {time.perf_counter() - t0:.1f} s -> {readme}")
    print("\nTargets:")
    missed = 0
    for s in sections:
        for t in s.targets:
            print("  " + t.line())
            missed += not t.passed
    print(f"{missed} target(s) missed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
