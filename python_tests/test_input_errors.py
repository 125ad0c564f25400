"""Bad input from a user or a file is a one-line error naming what to fix, never a raw
exception from deep inside: a model that is not callable, labels out of range, truncated
IDX files, unreadable results files, bad benchmark options."""

from __future__ import annotations

import gzip
import json
import shutil
import struct

import pytest
import torch

from examples.common import data
from fdsm_ext import (
    annealed_langevin_dynamics,
    dsm_loss,
    exact_sm_loss,
    fd_dsm_loss,
    fd_ssm_loss,
    langevin_dynamics,
    noise_conditional_loss,
    ssm_loss,
)

X = torch.randn(16, 3)
SIGMAS = torch.linspace(1.0, 0.1, 10)


# --------------------------------------------------------------------------- the model
CALLS = {
    "fd_ssm_loss": lambda m: fd_ssm_loss(m, X, output="energy"),
    "fd_dsm_loss": lambda m: fd_dsm_loss(m, X, 0.1, output="energy"),
    "ssm_loss": lambda m: ssm_loss(m, X, output="energy"),
    "dsm_loss": lambda m: dsm_loss(m, X, 0.1, output="energy"),
    "exact_sm_loss": lambda m: exact_sm_loss(m, X, output="energy"),
    "noise_conditional_loss": lambda m: noise_conditional_loss(m, X, SIGMAS, output="energy"),
    "langevin_dynamics": lambda m: langevin_dynamics(m, X, 2, 0.01),
    "annealed_langevin_dynamics": lambda m: annealed_langevin_dynamics(m, X, SIGMAS, 1),
}


@pytest.mark.parametrize("fn", list(CALLS))
@pytest.mark.parametrize("model", [None, torch.zeros(3)], ids=["None", "tensor"])
def test_a_model_that_is_not_callable_is_named(fn, model):
    with pytest.raises(TypeError) as e:
        CALLS[fn](model)
    msg = str(e.value)
    assert msg.startswith(f"{fn}: model must be callable (a torch.nn.Module or function), got "
                          f"{type(model).__name__}"), msg


# --------------------------------------------------------------------------- labels
def energy(x, c):
    return (x**2).sum(1) * (1 + c.to(x.dtype))


@pytest.mark.parametrize("labels, values", [
    (torch.full((16,), 12), "from 12 to 12"),
    (torch.tensor([-1] + [0] * 15), "from -1 to 0"),
    (torch.arange(16), "from 0 to 15"),
])
def test_labels_outside_the_levels_are_named(labels, values):
    with pytest.raises(ValueError) as e:
        noise_conditional_loss(energy, X, SIGMAS, labels=labels, output="energy")
    msg = str(e.value)
    assert "noise_conditional_loss: labels must be level indices in [0, 10)" in msg
    assert values in msg and "\n" not in msg


def test_labels_that_are_not_integers_are_named():
    with pytest.raises(ValueError, match=r"noise_conditional_loss: labels must be a LongTensor"):
        noise_conditional_loss(energy, X, SIGMAS, labels=torch.full((16,), 2.0),
                               output="energy")


def test_labels_in_range_work_and_compile_without_a_graph_break():
    labels = torch.arange(16) % 10
    eager = noise_conditional_loss(energy, X, SIGMAS, labels=labels, output="energy", seed=3)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            lambda x, y: noise_conditional_loss(energy, x, SIGMAS, labels=y, output="energy",
                                                seed=3),
            backend="eager", fullgraph=True)(X, labels)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_labels_outside_the_levels_fail_on_the_device():
    x = X.cuda()
    with pytest.raises(RuntimeError):
        noise_conditional_loss(energy, x, SIGMAS.cuda(), labels=torch.full((16,), 12).cuda(),
                               output="energy")
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- IDX files
def write(path, raw):
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_truncated_idx_header_is_one_data_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    write(path, struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">I", 10))  # 1 of 3 sizes
    with pytest.raises(data.DataError) as e:
        data.read_idx(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: truncated IDX header") and "3 dimensions" in msg


def test_unreadable_or_missing_idx_file_is_one_data_error(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"this is not gzip")
    with pytest.raises(data.DataError, match=f"{bad}: cannot be read"):
        data.read_idx(str(bad))
    cut = tmp_path / "cut.gz"
    whole = gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 2, 2, 2) + bytes(8))
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.DataError, match=f"{cut}: cannot be read"):
        data.read_idx(str(cut))
    with pytest.raises(data.DataError, match="no such file"):
        data.read_idx(str(tmp_path / "missing.gz"))
    good = tmp_path / "good.gz"
    data.write_idx(str(good), torch.arange(8, dtype=torch.uint8).reshape(2, 2, 2).numpy())
    assert data.read_idx(str(good)).shape == (2, 2, 2)


def test_a_result_file_that_is_not_a_result_means_run_again(tmp_path):
    from examples.common import checkpoint

    path = tmp_path / "metrics.json"
    for text in ('{"steps": 10', '[1, 2]', '{"other": 1}'):
        path.write_text(text)
        assert checkpoint.finished_result(str(path), lambda r: r["steps"] >= 10) is None
    path.write_text('{"steps": 10}')
    assert checkpoint.finished_result(str(path), lambda r: r["steps"] >= 10) == {"steps": 10}


# --------------------------------------------------------------------------- results renderer
@pytest.fixture
def results_copy(tmp_path, monkeypatch):
    """docs.render_results reading a copy of docs/results (a file to break)."""
    from docs import render_results as rr

    copy = tmp_path / "results"
    shutil.copytree(rr.RESULTS, copy)
    monkeypatch.setattr(rr, "RESULTS", copy)
    monkeypatch.chdir(rr.ROOT)
    return rr, copy


def test_render_results_names_a_results_file_that_is_not_json(results_copy, capsys):
    rr, copy = results_copy
    path = copy / "ncsn_digits.json"
    path.write_text(path.read_text()[:100])
    with pytest.raises(SystemExit) as e:
        rr.main(["check"])
    assert e.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert str(path) in line and "not a readable JSON results file" in line


def test_render_results_names_the_file_that_lacks_a_field(results_copy, capsys):
    rr, copy = results_copy
    path = copy / "ncsn_digits.json"
    d = json.loads(path.read_text())
    del d["provenance"]
    path.write_text(json.dumps(d))
    with pytest.raises(SystemExit) as e:
        rr.main(["check"])
    assert e.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert str(path) in line and "a field is missing or of the wrong type" in line


# --------------------------------------------------------------------------- benchmark options
@pytest.mark.parametrize("argv, words", [
    (["--device", "tpu"], "'tpu' is not a device"),
    (["--threads", "0"], "'0' is not a positive integer"),
    (["--threads", "two"], "'two' is not a positive integer"),
])
def test_benchmark_options_are_argument_errors(argv, words, capsys):
    from benchmarks import harness

    with pytest.raises(SystemExit) as e:
        harness.base_parser("x").parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


def test_benchmark_run_checks_curve_runs_before_running(tmp_path, capsys):
    from benchmarks import run

    bad = tmp_path / "dsm.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as e:
        run.main(["--only", "order", "--out", str(tmp_path), "--curve-runs", str(bad),
                  str(tmp_path / "missing.json")])
    assert e.value.code == 2
    assert f"--curve-runs {bad}: not a readable JSON file" in capsys.readouterr().err
    assert not (tmp_path / "full").exists()  # nothing ran


def test_benchmark_readme_leaves_out_a_broken_results_file(tmp_path, capsys):
    from benchmarks import harness

    section = harness.Section(name="order", title="t", markdown="## order\n", targets=[],
                              data={})
    harness.write_section(section, tmp_path, harness.machine_info("cpu", 1), "cmd")
    (tmp_path / "dimension.json").write_text("{cut")
    (tmp_path / "dimension.md").write_text("## dimension\n")
    readme = harness.write_readme(tmp_path, "quick").read_text()
    assert "## order" in readme and "## dimension" not in readme
    assert "dimension.json left out of the README" in capsys.readouterr().err
