"""Builds lasers_ext._C with torch.utils.cpp_extension.

CUDA sources are compiled when the installed torch has CUDA and nvcc is found. The environment variable
LASERS_EXT_CUDA overrides that choice:
    LASERS_EXT_CUDA=0     CPU-only build, even with a CUDA toolkit present
    LASERS_EXT_CUDA=1     CUDA build or a loud failure (never a silent CPU-only build)
    unset / "auto"        CUDA when possible; when torch has CUDA but nvcc is missing, a warning says so
TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0+PTX" (A100, H100, newer GPUs via PTX) plus the architectures of the
visible GPUs.
Install with `pip install --no-build-isolation .` after torch so the extension is built against that same torch.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

# cpp_extension reads CUDA_HOME when it is imported; its auto-detection can pick /usr/local, which lacks libcudart.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted() -> bool:
    mode = os.environ.get("LASERS_EXT_CUDA", "auto").strip().lower()
    if mode not in {"0", "1", "auto", ""}:
        sys.exit(f"LASERS_EXT_CUDA must be 0, 1 or auto, not {mode!r}")
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    have_nvcc = bool(nvcc) and os.path.exists(nvcc)
    problem = None
    if torch.version.cuda is None:
        problem = f"the installed torch {torch.__version__} is a CPU-only build"
    elif not have_nvcc:
        problem = "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    if mode == "0":
        return False
    if mode == "1":
        if problem:
            sys.exit(f"LASERS_EXT_CUDA=1 but the CUDA extension cannot be built: {problem}")
        return True
    if problem and torch.version.cuda is not None:
        print(f"\n*** lasers_ext: building WITHOUT CUDA kernels: {problem}. "
              "Set LASERS_EXT_CUDA=1 to make this an error. ***\n", file=sys.stderr)
    return problem is None


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # at::parallel_for is a header template over OpenMP (torch's CPU backend): without -fopenmp it runs serially.
    # The extension then needs libgomp.so.1, which the loader takes from the copy torch has already loaded.
    # -ffp-contract=off: the arithmetic contract of csrc/omp_core.h (explicit fma only, in every SIMD clone)
    cxx = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    if not _cuda_wanted():
        return CppExtension("lasers_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # A100 and H100 always, plus any visible GPU's own architecture; PTX of the newest for GPUs to come.
        archs = {(8, 0), (9, 0)}
        archs |= {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in sorted(archs)) + "+PTX"
    cuda_dir = os.path.join("csrc", "cuda")
    sources += sorted(glob.glob(os.path.join(cuda_dir, "*.cpp")) + glob.glob(os.path.join(cuda_dir, "*.cu")))
    # Warnings that signal real bugs fail the build: host-only calls from device code, use before set (549),
    # missing return (940), and any register spill or local-memory array in a kernel (ptxas). -fmad=false: no
    # multiply-add contraction beyond the explicit fma calls of the arithmetic contract (csrc/omp_core.h).
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "--Werror", "cross-execution-space-call",
            "-Xcudafe", "--diag_error=549", "-Xcudafe", "--diag_error=940", "-fmad=false",
            "-Xcompiler", "-ffp-contract=off", "-Xptxas", "-warn-spills,-warn-lmem-usage,-Werror"]
    return CUDAExtension("lasers_ext._C", sources, define_macros=[("LASERS_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
)
