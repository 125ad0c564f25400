"""The CMAKE_CUDA_ARCHITECTURES list for the torch that this interpreter imports.

Run by CMakeLists.txt as ``python torch_cuda_archs.py "<nvcc --list-gpu-code output>"``.
Prints the list (``;``-separated) on the first line of stdout and a warning per further
line; exits 1 with the reason on stdout when no valid list can be formed. (stdout only:
importing torch may write its own warnings to stderr.)

* ``TORCH_CUDA_ARCH_LIST`` set: its entries are read exactly as torch.utils.cpp_extension
  reads them (``"8.0;8.6+PTX"``, ``"8.0 9.0"``, named entries such as ``"Ampere"``), by torch
  itself; an entry torch does not know is an error. ``native`` is CMake's ``native``: the
  GPUs of this machine (an error when torch sees none).
* otherwise: a cubin (``-real``) for every architecture that torch itself was built for and
  nvcc can compile, plus PTX (``-virtual``) for the newest of them, which newer GPUs
  JIT-compile. A cubin runs on GPUs of its major version with the same or a newer minor, so
  this covers every GPU the installed torch runs on.
"""

from __future__ import annotations

import os
import re
import sys


def parse_gencode_flags(flags: list[str]) -> list[str]:
    """nvcc flags ``-gencode=arch=compute_X,code=sm_X`` / ``code=compute_X`` -> ``X-real`` /
    ``X-virtual``, sorted by architecture, without repeats."""
    archs: set[str] = set()
    for flag in flags:
        match = re.fullmatch(r"-gencode=arch=compute_\w+,code=(sm|compute)_(\w+)", flag)
        if match is None:
            raise ValueError(f"unexpected nvcc architecture flag from torch: {flag!r}")
        archs.add(match[2] + ("-real" if match[1] == "sm" else "-virtual"))
    return sorted(archs, key=lambda a: (int(re.match(r"\d+", a)[0]), a))


def check_nvcc_supports(archs: list[str], nvcc_archs: list[int]) -> None:
    """Raise ValueError naming the architectures of ``archs`` that nvcc cannot compile."""
    numbers = {int(re.match(r"\d+", a)[0]) for a in archs if a[0].isdigit()}
    missing = sorted(n for n in numbers if nvcc_archs and n not in nvcc_archs)
    if missing:
        raise ValueError(f"this nvcc cannot compile sm_{', sm_'.join(map(str, missing))} "
                         f"(it supports sm_{', sm_'.join(map(str, nvcc_archs))})")


def archs_from_env(value: str) -> list[str]:
    """CMake architectures for TORCH_CUDA_ARCH_LIST=value, mapped by torch's own parser."""
    import torch
    from torch.utils import cpp_extension

    if value.strip() == "native":
        # Without a GPU, nvcc -arch=native only warns and compiles for its oldest architecture.
        if torch.cuda.device_count() == 0:
            raise ValueError("TORCH_CUDA_ARCH_LIST='native' but torch sees no GPU on this "
                             "machine; name the architectures (e.g. \"8.0;9.0+PTX\")")
        return ["native"]

    parse = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if parse is None:
        raise ValueError(
            "this torch has no torch.utils.cpp_extension._get_cuda_arch_flags to read "
            "TORCH_CUDA_ARCH_LIST with; set CMAKE_CUDA_ARCHITECTURES (CMake syntax) instead")
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    try:
        flags = parse()
    except ValueError as err:  # torch: "Unknown CUDA arch (X) or GPU not supported"
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={value!r}: {err}") from None
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={value!r} names no architecture")
    return parse_gencode_flags(flags)


def torch_build_archs() -> list[int]:
    """Compute capabilities (as 75, 80, ..., 120) that the installed torch has cubins for.

    torch._C._cuda_getArchFlags() answers without a GPU (torch.cuda.get_arch_list() returns
    [] without one in some versions); "sm_90a"-style entries count as 90.
    """
    import torch

    flags = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else None
    text = flags if flags else " ".join(torch.cuda.get_arch_list())
    return sorted({int(n) for n in re.findall(r"\bsm_(\d+)", text)})


def default_archs(torch_archs: list[int], nvcc_archs: list[int]) -> tuple[list[str], list[str]]:
    """(architectures, warnings): cubins for torch's architectures that nvcc supports (all of
    them if nvcc_archs is empty: an nvcc without --list-gpu-code), PTX for the newest."""
    if not torch_archs:
        raise ValueError("torch reports no CUDA architectures it was built for; set "
                         "TORCH_CUDA_ARCH_LIST (e.g. \"8.0;9.0+PTX\")")
    kept = [a for a in torch_archs if not nvcc_archs or a in nvcc_archs]
    dropped = [a for a in torch_archs if a not in kept]
    if not kept:
        raise ValueError(f"nvcc compiles none of torch's architectures {torch_archs} "
                         f"(nvcc: {nvcc_archs}); set TORCH_CUDA_ARCH_LIST")
    warnings = []
    if dropped:
        warnings.append(
            f"this nvcc cannot compile sm_{', sm_'.join(map(str, dropped))}, which torch "
            f"supports: GPUs of those generations will JIT-compile the PTX of sm_{kept[-1]} "
            "if they are newer, or get no kernels at all. Use a newer CUDA toolkit.")
    return [f"{a}-real" for a in kept] + [f"{kept[-1]}-virtual"], warnings


def nvcc_archs_from_listing(listing: str) -> list[int]:
    """``nvcc --list-gpu-code`` output (sm_75 sm_80 ...) -> [75, 80, ...]."""
    return sorted({int(n) for n in re.findall(r"\bsm_(\d+)\b", listing)})


def main(argv: list[str]) -> int:
    try:
        env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        nvcc_archs = nvcc_archs_from_listing(argv[1] if len(argv) > 1 else "")
        if env:
            archs, warnings = archs_from_env(env), []
            check_nvcc_supports(archs, nvcc_archs)
        else:
            archs, warnings = default_archs(torch_build_archs(), nvcc_archs)
    except ValueError as err:
        print(err)
        return 1
    print("\n".join([";".join(archs), *warnings]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
