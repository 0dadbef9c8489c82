"""lasers_bench: the Batch-OMP benchmark (``lasers-omp-bench``: omp_bench, with the SPAMS anchor in spams_anchor).

This folder is installed as the package ``lasers_bench`` (pyproject.toml maps it), so the benchmark runs as a command,
as ``python -m lasers_bench.omp_bench`` and as ``python bench/omp_bench.py``. The other scripts here are the GPU
checks (gpu_check.sh, gpu_train_check.sh and their helpers) and pytest-benchmark timings (test_bench_omp.py).
"""
