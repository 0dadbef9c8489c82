"""The CMake build of the torch-free core: compiles it (and, where nvcc exists, its device code) and runs ctest."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_build_and_ctest(tmp_path):
    env = dict(os.environ)
    nvcc = Path(env.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    if nvcc.exists():
        env.setdefault("CUDACXX", str(nvcc))
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build)],
                ["cmake", "--build", str(build), "-j", "2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    if nvcc.exists():  # the shared core also compiled as CUDA device code
        assert list(build.rglob("device_compile_check.cu.o")), "nvcc was found but the device check was not built"
