"""Run every benchmark (or one) and write benchmarks/results/<quick|full>/README.md + PNGs.

    python -m benchmarks.run [--quick] [--only NAME] [--out DIR] [--device cpu|cuda]
                             [--curve-runs DSM_JSON SSM_JSON]
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

from . import BENCHMARKS, deep_ebm
from .harness import base_parser, check_json_files, run_and_write, write_readme


def main(argv=None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--only", choices=BENCHMARKS, action="append",
                   help="run only this benchmark (repeatable)")
    deep_ebm.add_curve_runs_option(p)
    args = p.parse_args(argv)
    check_json_files(p, "--curve-runs", args.curve_runs)
    names = args.only or list(BENCHMARKS)
    t0 = time.perf_counter()
    sections = []
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        kwargs = deep_ebm.run_kwargs(args) if name == "deep_ebm" else {}
        sections.append(run_and_write(name, module.run, args, **kwargs))
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
