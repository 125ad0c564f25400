"""Loading a checkpoint or a cache never runs code: every file loads with weights_only=True.

A planted file whose unpickling would run code (a ``__reduce__`` that opens a marker file for
writing) is refused with one line and runs nothing; a checkpoint of the older format (NumPy
RNG state as a pickled array) is refused with the reason and a one-time conversion, after
which the run resumes exactly.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_examples import _KILL_AFTER  # the crash-after-step-N wrapper of the resume tests

from examples.common import checkpoint, classifier, seeding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EBM = "examples.train_ebm"
TINY_EBM = ["--limit", "64", "--batch-size", "16", "--threads", "1", "--width", "8",
            "--n-samples", "16", "--no-progress", "--eval-size", "16", "--n-sigmas", "3",
            "--n-steps-each", "2"]

def run(*args, check=True, module=EBM, killed_after=None):
    cmd = [sys.executable, "-m", module, *args]
    if killed_after is not None:
        cmd = [sys.executable, "-c", _KILL_AFTER, str(killed_after), module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    if killed_after is not None:
        assert proc.returncode == 17, proc.stdout + proc.stderr
    elif check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if "error:" in line]


class Planted:
    """Unpickling this opens ``path`` for writing: the marker that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_checkpoint(path, marker):
    """A torch.save file with every checkpoint key, one of which runs code when unpickled."""
    torch.save({**{k: 0 for k in checkpoint.CKPT_KEYS}, "args": Planted(marker)}, path)


def unsafe_unpickle_zip(path):
    """What an unsafe load of ``path`` would do (pickle.loads of its data.pkl; the planted
    files hold no tensors, so no torch persistent ids are needed)."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        obj = pickle.loads(z.read(name))
    obj["args"].close()


# --------------------------------------------------------------------------- the format
def test_checkpoint_holds_tensors_and_plain_values_and_restores_rng_exactly(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    args = argparse.Namespace(pairs=("dsm", "ssm"), out=Path("/x"), lr=1e-3, limit=None)
    seeding.seed_everything(5)
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save_checkpoint(path, model=model, optimizer=opt, step=3,
                               history={"train": [(1, 0.5)]}, args=args)
    draws = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
             torch.rand(3).tolist())
    state = torch.load(path, weights_only=True)
    assert state["args"] == {"pairs": ["dsm", "ssm"], "out": "/x", "lr": 1e-3, "limit": None}
    assert isinstance(state["rng"]["numpy"]["key"], torch.Tensor)
    seeding.seed_everything(9)
    seeding.set_rng_state(state["rng"])
    assert draws == (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
                     torch.rand(3).tolist())
    assert checkpoint.load_checkpoint(path, "cpu")["step"] == 3


# --------------------------------------------------------------------------- planted files
def test_planted_checkpoint_is_refused_in_one_line_and_runs_nothing(tmp_path):
    out = tmp_path / "run"
    run("--steps", "2", "--ckpt-every", "1", "--out", str(out), *TINY_EBM)
    latest, prev = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    assert prev.exists()  # a good previous checkpoint, which --resume must not fall back to
    marker = tmp_path / "code_ran"
    plant_checkpoint(latest, marker)
    # The planted file is live: an unsafe load would run its code.
    control = tmp_path / "control_marker"
    plant_checkpoint(tmp_path / "control.pt", control)
    unsafe_unpickle_zip(tmp_path / "control.pt")
    assert control.exists()

    prev_bytes = prev.read_bytes()
    proc = run("--steps", "4", "--out", str(out), "--resume", *TINY_EBM, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc)
    assert f"--resume: {latest} was not loaded" in line and "io.open" in line
    assert "not a checkpoint these examples wrote" in line
    assert not marker.exists()  # nothing in the file ran
    assert "resumed" not in proc.stdout and prev.read_bytes() == prev_bytes  # nothing trained
    assert latest.exists() and not Path(str(latest) + ".damaged").exists()  # left to inspect


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_planted_plain_pickle_is_refused_and_runs_nothing(tmp_path, protocol):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "code_ran"
    with open(path, "wb") as f:
        pickle.dump({**{k: 0 for k in checkpoint.CKPT_KEYS}, "args": Planted(marker)}, f,
                    protocol=protocol)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_checkpoint(str(path), "cpu")
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    if protocol == 2:  # the global is named in the file: the message names it
        assert isinstance(e.value, checkpoint.UnsafeCheckpointError) and "io.open" in str(e.value)
    assert not marker.exists()


def test_classifier_cache_loads_safely_and_a_planted_one_is_rebuilt(tmp_path):
    logs = []
    kw = {"cache_dir": str(tmp_path), "steps": 3, "max_train": 200, "log": logs.append}
    model, info = classifier.load_or_train("digits", **kw)
    path = tmp_path / "classifier_digits_200_3.pt"
    stored = torch.load(path, weights_only=True)
    assert isinstance(stored["info"]["train_mu"], torch.Tensor)
    model2, info2 = classifier.load_or_train("digits", **kw)  # from the cache
    assert isinstance(info2["train_cov"], np.ndarray)
    np.testing.assert_array_equal(info2["train_cov"], info["train_cov"])
    marker = tmp_path / "code_ran"
    torch.save({"model": {}, "info": Planted(marker)}, path)
    logs.clear()
    _, info3 = classifier.load_or_train("digits", **kw)
    assert not marker.exists()
    assert any("cannot be read safely" in m for m in logs)
    np.testing.assert_array_equal(info3["train_cov"], info["train_cov"])  # same training


# --------------------------------------------------------------------------- old checkpoints
def to_old_format(path):
    """Rewrite a checkpoint as the examples wrote it before: np.random.get_state() and
    random.getstate() tuples (a pickled NumPy array)."""
    state = torch.load(path, weights_only=True)
    n, py = state["rng"]["numpy"], state["rng"]["python"]
    state["rng"]["numpy"] = (n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"])
    state["rng"]["python"] = (py["version"], tuple(py["internal"].tolist()), py["gauss_next"])
    torch.save(state, path)


def test_old_checkpoint_is_refused_with_the_reason_then_converted_and_resumed_exactly(tmp_path):
    args = ["--steps", "4", "--ckpt-every", "2", "--eval-every", "2", *TINY_EBM]
    full, part = tmp_path / "full", tmp_path / "part"
    run(*args, "--out", str(full))
    run(*args, "--out", str(part), killed_after=2)
    latest = part / "checkpoint.pt"
    to_old_format(latest)
    proc = run(*args, "--out", str(part), "--resume", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = error_lines(proc)
    assert "older version of these examples" in line and "weights_only=True" in line
    assert f"python -m examples.common.checkpoint --convert {latest}" in line

    run("--convert", str(latest), module="examples.common.checkpoint")
    torch.load(latest, weights_only=True)
    resumed = run(*args, "--out", str(part), "--resume")
    assert f"resumed from {latest} at step 2" in resumed.stdout + resumed.stderr
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (full, part))
    assert a["step"] == b["step"] == 4 and a["history"] == b["history"]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_convert_refuses_a_file_that_needs_more_than_numpy(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "code_ran"
    plant_checkpoint(path, marker)
    proc = run("--convert", str(path), module="examples.common.checkpoint", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "io.open" in line and not marker.exists()
