"""Sums Nsight Compute's per-launch CSV (gpu__time_duration.sum) by kernel name, in launch order
segments: prints total GPU time, then the kernels by total time with their launch counts."""
import csv
import sys
from collections import defaultdict

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]
for r in csv.DictReader(lines):
    if r.get("Metric Name") != "gpu__time_duration.sum":
        continue
    try:
        ns = float(r["Metric Value"].replace(",", ""))
    except ValueError:
        continue
    rows.append((int(r["ID"]), r["Kernel Name"], ns))
rows.sort()
total = sum(ns for _, _, ns in rows)
print(f"launches {len(rows)}  GPU time {total / 1e6:.1f} ms")
by = defaultdict(lambda: [0, 0.0])
for _, name, ns in rows:
    short = name.split("(")[0][:90]
    by[short][0] += 1
    by[short][1] += ns
for name, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1])[:60]:
    print(f"{ns / 1e6:9.2f} ms {100 * ns / total:5.1f}%  {n:6d}x  {ns / n / 1e3:8.1f} us  {name}")
# The launch sequence in coarse segments (every 500 launches), to place stages.
print("\nsegments (launch range: GPU ms)")
for i in range(0, len(rows), 500):
    seg = rows[i : i + 500]
    print(f"  {i:6d}-{i + len(seg):6d}: {sum(ns for _, _, ns in seg) / 1e6:8.2f}  first {seg[0][1][:50]}")
