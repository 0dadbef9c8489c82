"""Each argument error of the raw CUDA op in its own process (a crash names its case): python bench/cuda_errors.py"""

import os
import subprocess
import sys

OP = "torch.ops.lasers_ext.batch_omp"
CASES = {
    "sparsity": f"{OP}(torch.randn(10, 16, device='cuda'), torch.randn(64, 16, device='cuda'), 17)",
    "fast refused": "os.environ['LASERS_CUDA_KERNEL'] = 'fast'; "
                    f"{OP}(torch.randn(10, 64, device='cuda'), torch.randn(512, 64, device='cuda'), 5)",
    "general budget": f"{OP}(torch.randn(10, 16, device='cuda'), torch.randn(30000, 16, device='cuda'), 5)",
}
PROGRAM = """import os, torch, lasers_ext
try:
    {call}
    print('no error')
except RuntimeError as e:
    print('RuntimeError:', str(e)[:100])"""

if __name__ == "__main__":
    failed = 0
    for name, call in CASES.items():
        proc = subprocess.run([sys.executable, "-c", PROGRAM.format(call=call)], capture_output=True, text=True,
                              env=dict(os.environ))
        print(f"{name}: exit {proc.returncode}: {proc.stdout.strip() or proc.stderr.strip()[-200:]}")
        failed += proc.returncode != 0 or "RuntimeError" not in proc.stdout
    sys.exit(1 if failed else 0)
