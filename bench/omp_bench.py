"""Batch-OMP benchmark: every backend against scikit-learn and an eager-PyTorch anchor. See lasers_ext/benchmark.py.

Usage: python bench/omp_bench.py [--N 1024,16384,65536] [--json out.json]
"""

import sys

from lasers_ext.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
