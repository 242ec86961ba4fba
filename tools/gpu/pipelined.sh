#!/bin/bash
# Issue 12: the pipelined wgmma attention (sm_90 default for 128-row blocks since session 15) in
# one call: the kernel checks (every wgmma build, q's fused RMS norm in each) and half-precision
# parity with the default, `bench attention`, then image-large at high with the default against
# `TRELLIS_FLASH_WGMMA=0` (the mma.sync kernel), A/B/A/B. carry: [".devbin"] with trellisd.xz,
# ref1.tar.xz, dino.tar.xz and manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
PRECISIONS=half BENCH_BEFORE=0 bash tools/gpu/parity.sh 2>&1 | grep -v "^+"
grep -E "flash|fail" $OUT/doctor.txt | cut -c1-200
. tools/gpu/common.sh
set +x
timeout 120 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/attention.txt 2>&1
echo "bench attention rc=$?"; grep -E "TFLOP" $OUT/attention.txt | grep -E " (128a|128w64|128p64)" | cut -c1-110
RUNS="pipelined wgmma (default)|-|--vram-tier high --runs 3
mma.sync|TRELLIS_FLASH_WGMMA=0|--vram-tier high --runs 3
pipelined wgmma again|-|--vram-tier high --runs 3
mma.sync again|TRELLIS_FLASH_WGMMA=0|--vram-tier high --runs 3" bash tools/gpu/tiers.sh 2>&1 | grep -v "^+"
