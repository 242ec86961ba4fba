#!/bin/bash
# Issue 12, session 15's closing call: the kernel checks and half-precision parity with the
# default build (the 256-row pipelined wgmma attention on sm_90), then image-large at every tier
# (high, median of 3, first; then medium, low, minimal) and text-xlarge at high. carry:
# [".devbin"] with trellisd.xz, ref1.tar.xz, dino.tar.xz and manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
PRECISIONS=half BENCH_BEFORE=0 bash tools/gpu/parity.sh 2>&1 | grep -v "^+" | grep -v "^ok "
grep -E "flash|fail" $OUT/doctor.txt | cut -c1-160
RUNS="high|-|--vram-tier high --runs 3
medium|-|--vram-tier medium --runs 1
low|-|--vram-tier low --runs 1
minimal|-|--vram-tier minimal --runs 1
text-xlarge, high|-|--pipeline text-xlarge --vram-tier high --runs 1 --formats mesh" bash tools/gpu/tiers.sh 2>&1 | grep -v "^+"
