"""Summarises one `bash bench/gpu_check.sh` run: the benchmark JSON (every implementation at each N) and the Nsight
Compute CSV of the fast kernel (counters divided by the vectors it coded) in a short Markdown table, written beside
them and appended to bench/results/README.md.

    python bench/gpu_summary.py PREFIX   # reads PREFIX-float32.json and PREFIX-ncu.csv, writes PREFIX-summary.md
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

NCU_VECTORS = 1 << 20  # bench/ncu_fast.py codes this many vectors per launch
TARGETS = {65536: 2.5e8, 1 << 22: 5e8}  # issue 12, float32, K=512 M=16 S=5
TARGET_X_ANCHOR = 40.0


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def _rate(v: float) -> str:
    return f"{v / 1e6:,.1f}M/s" if v >= 1e6 else f"{v / 1e3:,.1f}k/s"


def ncu_metrics(path: Path) -> dict[str, float]:
    """The fast kernel's row of an `ncu --csv --page raw` report: metric name -> value (numbers only)."""
    if not path.exists():
        return {}
    text = path.read_text(errors="replace")
    start = text.find('"ID"')
    if start < 0:
        return {}
    rows = list(csv.reader(io.StringIO(text[start:])))
    header = rows[0]
    name_col = header.index("Kernel Name") if "Kernel Name" in header else None
    for row in rows[2:]:  # row 1 holds the units
        if len(row) == len(header) and (name_col is None or "kernel<" in row[name_col]):
            return {h: v for h, v in ((h, _number(c)) for h, c in zip(header, row)) if v is not None}
    return {}


def ncu_lines(m: dict[str, float]) -> list[str]:
    if not m:
        return ["Nsight Compute: no report (ncu missing or failed on this machine; see the run's log)."]
    per = lambda key: m[key] / NCU_VECTORS if key in m else None  # noqa: E731
    rows = [
        ("warp instructions per vector", per("smsp__inst_executed.sum"), "{:,.0f}"),
        ("thread FFMA per vector", per("smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"), "{:,.0f}"),
        ("issued IPC per SM (of 4)", m.get("sm__inst_executed.avg.per_cycle_active"), "{:.2f}"),
        ("L2 bytes per vector", per("lts__t_bytes.sum"), "{:,.0f}"),
        ("DRAM bytes per vector", per("dram__bytes.sum"), "{:,.0f}"),
        ("L1 hit rate %", m.get("l1tex__t_sector_hit_rate.pct"), "{:.1f}"),
        ("achieved occupancy % (warps)", m.get("sm__warps_active.avg.pct_of_peak_sustained_active"), "{:.1f}"),
        ("registers per thread", m.get("launch__registers_per_thread"), "{:.0f}"),
        ("kernel time (us) for 2^20 vectors", (m["gpu__time_duration.sum"] / 1e3)
         if "gpu__time_duration.sum" in m else None, "{:,.1f}"),
    ]
    out = ["| fast kernel, N = 2^20 (ncu) | value |", "|---|---|"]
    out += [f"| {name} | {fmt.format(v)} |" for name, v, fmt in rows if v is not None]
    stalls = {k: v for k, v in m.items() if "issue_stalled" in k and k.endswith("per_issue_active.ratio")}
    if stalls:
        top = sorted(stalls.items(), key=lambda kv: -kv[1])[:6]
        mix = ", ".join(f"{k.split('issue_stalled_')[1].split('_per_issue')[0]} {v:.2f}" for k, v in top)
        out.append(f"| stall mix (cycles per issued instruction) | {mix} |")
    return out


def bench_lines(result: dict) -> list[str]:
    rows = result["rows"]
    ns = sorted({r["N"] for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {(r["impl"], r["N"]): r for r in rows}
    columns = " | ".join(f"N={n:,}" for n in ns)
    out = [f"| implementation | {columns} | x best batched-PyTorch anchor (largest N) |",
           "|---|" + "---|" * (len(ns) + 1)]
    for impl in impls:
        cells = []
        for n in ns:
            r = by.get((impl, n))
            cells.append(_rate(r["vectors_per_s"]) + (f" (timed {r['timed_N']:,})" if r["timed_N"] != n else "")
                         if r else "-")
        last = by.get((impl, ns[-1]))
        ratio = f"{last['x_torch_anchor']:.1f}x" if last and last.get("x_torch_anchor") else "-"
        out.append(f"| {impl} | " + " | ".join(cells) + f" | {ratio} |")
    out.append("")
    for n, target in TARGETS.items():
        r = by.get(("cuda", n))
        if r:
            met = "met" if r["vectors_per_s"] >= target else "NOT met"
            anchor = r.get("x_torch_anchor")
            out.append(f"- N={n:,}: cuda {r['vectors_per_s']:.3g}/s against the target {target:.2g}/s: **{met}**"
                       + (f"; {anchor:.1f}x the best batched-PyTorch anchor (target {TARGET_X_ANCHOR:.0f}x: "
                          f"**{'met' if anchor >= TARGET_X_ANCHOR else 'NOT met'}**)" if anchor else ""))
    return out


def main(prefix: str) -> int:
    prefix_path = Path(prefix)
    result = json.loads(Path(f"{prefix}-float32.json").read_text())
    gpu = Path(f"{prefix}-gpu.txt").read_text().strip() if Path(f"{prefix}-gpu.txt").exists() else "?"
    p = result["problem"]
    lines = [f"## {prefix_path.name} (`bash bench/gpu_check.sh`)", "",
             f"{gpu.splitlines()[-1] if gpu else ''}; {result['machine'].get('gpu')}; K={p['K']} M={p['M']} "
             f"S={p['S']} {p['dtype']}, best of the timed runs after a warm-up.", ""]
    lines += bench_lines(result) + [""] + ncu_lines(ncu_metrics(Path(f"{prefix}-ncu.csv"))) + [""]
    text = "\n".join(lines)
    Path(f"{prefix}-summary.md").write_text(text)
    readme = prefix_path.parent / "README.md"
    with readme.open("a") as f:
        f.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
