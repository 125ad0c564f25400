"""Build configuration: GPU architectures, the nvcc/torch CUDA version check, numerics flags.

The architecture mapping (cmake/torch_cuda_archs.py) is tested directly; the CMake decisions
by configuring the project (no build) in a temporary folder, with a fake nvcc where a
toolkit of another CUDA version is needed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TORCH_CUDA = torch.version.cuda

_spec = importlib.util.spec_from_file_location("torch_cuda_archs",
                                               ROOT / "cmake" / "torch_cuda_archs.py")
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)

NVCC_13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121]  # nvcc 13.0 --list-gpu-code


# ---------------------------------------------------------------------------------------
# Architecture lists


def test_default_archs_are_torch_cubins_plus_newest_ptx():
    listed, warnings = archs.default_archs([75, 80, 86, 90, 100, 120], NVCC_13)
    assert listed == ["75-real", "80-real", "86-real", "90-real", "100-real", "120-real",
                      "120-virtual"]
    assert warnings == []


def test_default_archs_drop_what_nvcc_cannot_compile_with_a_warning():
    listed, warnings = archs.default_archs([75, 80, 86, 90, 100, 120], [75, 80, 86, 89, 90])
    assert listed == ["75-real", "80-real", "86-real", "90-real", "90-virtual"]
    assert len(warnings) == 1 and "sm_100, sm_120" in warnings[0]
    with pytest.raises(ValueError, match="compiles none of torch's architectures"):
        archs.default_archs([100, 120], [75, 80])
    with pytest.raises(ValueError, match="set TORCH_CUDA_ARCH_LIST"):
        archs.default_archs([], NVCC_13)
    # An nvcc without --list-gpu-code: no filtering.
    assert archs.default_archs([80, 90], [])[0] == ["80-real", "90-real", "90-virtual"]


def test_nvcc_listing_parser():
    assert archs.nvcc_archs_from_listing("sm_75\nsm_80\nsm_90a\nsm_120\n") == [75, 80, 120]
    assert archs.nvcc_archs_from_listing("nvcc fatal: Unknown option") == []


@pytest.mark.skipif(TORCH_CUDA is None, reason="CPU-only torch has no architecture list")
def test_torch_build_archs_without_a_gpu():
    found = archs.torch_build_archs()
    assert found, "torch._C._cuda_getArchFlags() gave no sm_ entries"
    listed = torch._C._cuda_getArchFlags().split()
    assert found == sorted({int(re.sub(r"\D", "", a)) for a in listed if a.startswith("sm_")})


@pytest.mark.parametrize("value,expected", [
    ("8.0;9.0", ["80-real", "90-real"]),
    ("8.0 9.0+PTX", ["80-real", "90-real", "90-virtual"]),
    # torch.utils.cpp_extension's named architectures: Ampere = "8.0;8.6+PTX".
    ("Ampere", ["80-real", "86-real", "86-virtual"]),
    ("Turing;Hopper", ["75-real", "75-virtual", "90-real", "90-virtual"]),
])
def test_torch_cuda_arch_list_is_read_as_torch_reads_it(monkeypatch, value, expected):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    assert archs.archs_from_env(value) == expected


def test_native_archs_need_a_gpu(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "native")
    if torch.cuda.device_count() > 0:
        assert archs.archs_from_env("native") == ["native"]
    else:
        with pytest.raises(ValueError, match="'native' but torch sees no GPU"):
            archs.archs_from_env("native")


@pytest.mark.parametrize("value", ["Amper", "8.0;sm_90", "Ampere-real"])
def test_unknown_arch_names_fail_clearly(monkeypatch, value):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    with pytest.raises(ValueError, match=r"TORCH_CUDA_ARCH_LIST=.*Unknown CUDA arch"):
        archs.archs_from_env(value)


def test_archs_nvcc_cannot_compile_fail_clearly():
    archs.check_nvcc_supports(["80-real", "90-virtual", "native"], NVCC_13)
    archs.check_nvcc_supports(["70-real"], [])  # unknown nvcc support: let nvcc decide
    with pytest.raises(ValueError, match="cannot compile sm_70"):
        archs.check_nvcc_supports(["70-real", "80-real"], NVCC_13)


def test_gencode_parser():
    flags = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    assert archs.parse_gencode_flags(flags) == ["80-real", "90-real", "90-virtual", "90a-real"]
    with pytest.raises(ValueError, match="unexpected nvcc architecture flag"):
        archs.parse_gencode_flags(["-arch=sm_80"])


# ---------------------------------------------------------------------------------------
# CMake configure runs


def _cmake() -> str | None:
    """A cmake >= 3.26 (the project's minimum): the PyPI one if installed, else PATH's."""
    candidates = []
    try:
        import cmake

        candidates.append(str(Path(cmake.CMAKE_BIN_DIR) / "cmake"))
    except ImportError:
        pass
    candidates.append(shutil.which("cmake"))
    for exe in filter(None, candidates):
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"version (\d+)\.(\d+)", out)
        if match and (int(match[1]), int(match[2])) >= (3, 26):
            return exe
    return None


CMAKE = _cmake()
NINJA = shutil.which("ninja")
needs_cmake = pytest.mark.skipif(CMAKE is None or NINJA is None,
                                 reason="needs cmake >= 3.26 and ninja")
needs_cuda_torch = pytest.mark.skipif(TORCH_CUDA is None,
                                      reason="a CPU-only torch never looks at nvcc")


def _real_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    for exe in (Path(cuda_home) / "bin" / "nvcc", shutil.which("nvcc")):
        if exe and Path(exe).exists():
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout
            match = re.search(r"release (\d+)\.", out)
            if match and TORCH_CUDA and match[1] == TORCH_CUDA.split(".")[0]:
                return str(exe)
    return None


def configure(build_dir: Path, nvcc: str, mode: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """cmake configure of the project with FDSM_CUDA=mode and CMAKE_CUDA_COMPILER=nvcc.

    Runs may share build_dir (CMake then detects the C++ compiler once): none of them
    enables CUDA, and CMAKE_CUDA_FLAGS is reset each time."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("TORCH_CUDA_ARCH_LIST", "CUDAFLAGS", "NVCC_PREPEND_FLAGS",
                             "NVCC_APPEND_FLAGS")}
    full_env.update({"FDSM_CUDA": mode, **(env or {})})
    cmd = [CMAKE, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
           f"-DCMAKE_MAKE_PROGRAM={NINJA}", f"-DPython_EXECUTABLE={sys.executable}",
           f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_FLAGS=", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


@pytest.fixture(scope="module")
def build_dirs(tmp_path_factory) -> dict[str, Path]:
    """One configure folder per nvcc (fake, real), shared by the tests of this module."""
    return {"fake": tmp_path_factory.mktemp("build_fake"),
            "real": tmp_path_factory.mktemp("build_real")}


@pytest.fixture(scope="module")
def other_major_nvcc(tmp_path_factory) -> str:
    """A fake nvcc that reports a CUDA major version other than torch's."""
    major = int(TORCH_CUDA.split(".")[0]) - 1
    path = tmp_path_factory.mktemp("fake_cuda") / "nvcc"
    path.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                    f"echo 'Cuda compilation tools, release {major}.4, V{major}.4.131'\n")
    path.chmod(0o755)
    return str(path)


@needs_cmake
@needs_cuda_torch
def test_nvcc_of_another_cuda_major_fails_with_fdsm_cuda_1(build_dirs, other_major_nvcc):
    result = configure(build_dirs["fake"], other_major_nvcc, "1")
    assert result.returncode != 0
    major = int(TORCH_CUDA.split(".")[0]) - 1
    text = " ".join((result.stdout + result.stderr).split())  # CMake wraps long messages
    assert "FDSM_CUDA=1 but CUDA kernels cannot be built" in text
    assert f"is CUDA {major}.4 but torch was built with CUDA {TORCH_CUDA}" in text
    assert f"libcudart.so.{major}" in text


@needs_cmake
@needs_cuda_torch
def test_nvcc_of_another_cuda_major_builds_cpu_only_with_a_warning(build_dirs,
                                                                   other_major_nvcc):
    result = configure(build_dirs["fake"], other_major_nvcc, "auto")
    assert result.returncode == 0, result.stderr
    text = " ".join((result.stdout + result.stderr).split())
    assert "building WITHOUT CUDA kernels" in text
    assert f"but torch was built with CUDA {TORCH_CUDA}" in text
    assert "CUDA kernels OFF" in text
    assert "CUDA_KERNELS = False" in (build_dirs["fake"] / "_build_info.py").read_text()


@needs_cmake
@needs_cuda_torch
@pytest.mark.skipif(_real_nvcc() is None, reason="needs an nvcc of torch's CUDA major version")
@pytest.mark.parametrize("env,args,expected", [
    ({"TORCH_CUDA_ARCH_LIST": "Amper"}, [], "Unknown CUDA arch (Amper)"),
    ({"NVCC_APPEND_FLAGS": "--fmad=true"}, [], "NVCC_APPEND_FLAGS sets nvcc's -fmad"),
    ({}, ["-DCMAKE_CUDA_FLAGS=--use_fast_math --prec-sqrt=false"],
     "CMAKE_CUDA_FLAGS sets nvcc's -prec-sqrt"),
])
def test_bad_cuda_settings_fail_at_configure(build_dirs, env, args, expected):
    result = configure(build_dirs["real"], _real_nvcc(), "1", *args, env=env)
    assert result.returncode != 0
    assert expected in " ".join((result.stdout + result.stderr).split())


# ---------------------------------------------------------------------------------------
# The built module


def _cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one the triton wheel (a torch dependency) ships."""
    found = shutil.which("cuobjdump")
    if found is None:
        try:
            import triton

            path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(path) if path.exists() else None
        except ImportError:
            pass
    return found


def _built_module() -> tuple[Path, str] | None:
    """(the loaded _C library, its CUDA_ARCHITECTURES) when it has CUDA kernels."""
    from fdsm_ext import _C, _build_info

    if not _build_info.CUDA_KERNELS:
        return None
    return Path(_C.__file__), _build_info.CUDA_ARCHITECTURES


needs_cuda_build = pytest.mark.skipif(_built_module() is None or _cuobjdump() is None,
                                      reason="needs a build with CUDA kernels and cuobjdump")


@needs_cuda_build
def test_module_carries_exactly_the_configured_architectures():
    library, configured = _built_module()
    listing = subprocess.run([_cuobjdump(), "--list-elf", "--list-ptx", str(library)],
                             capture_output=True, text=True, check=True).stdout
    cubins = set(re.findall(r"\.sm_(\w+)\.cubin", listing))
    ptx = set(re.findall(r"\.sm_(\w+)\.ptx", listing))
    expected = configured.split(";")
    assert cubins == {a.removesuffix("-real") for a in expected if a.endswith("-real")}
    assert ptx == {a.removesuffix("-virtual") for a in expected if a.endswith("-virtual")}


@needs_cuda_build
def test_kernels_are_compiled_without_fma_contraction_or_fast_math():
    library, configured = _built_module()
    if not any(a.endswith("-virtual") for a in configured.split(";")):
        pytest.skip("this build carries no PTX to inspect")
    ptx = subprocess.run([_cuobjdump(), "--dump-ptx", str(library)],
                         capture_output=True, text=True, check=True).stdout
    assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx  # the kernels' float math is there
    # --fmad=false: no contracted multiply-adds; --ftz=false, --prec-div/sqrt=true: no
    # flush-to-zero and no approximate division or square root.
    for pattern in (r"\bfma\.rn\.f(32|64)", r"\.ftz\b", r"\.approx\.", r"\bdiv\.full\."):
        assert re.search(pattern, ptx) is None, pattern
