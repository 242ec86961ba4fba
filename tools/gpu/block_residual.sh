#!/bin/bash
# Issue 12: the block-to-block residual fusion (TRELLIS_FUSED_BLOCK_RESIDUAL, on by default since
# session 15) in one call:
# the kernel checks and the half-precision parity with it on (the flows' parity handlers require
# the untraced forward to equal the traced one exactly), then image-large at high with it on and
# off, twice each (A/B/A/B). carry: [".devbin"] with trellisd.xz, ref1.tar.xz, dino.tar.xz and
# manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
export TRELLIS_FUSED_BLOCK_RESIDUAL=1
PRECISIONS=half BENCH_BEFORE=0 bash tools/gpu/parity.sh 2>&1 | grep -v "^+"
RUNS="on|TRELLIS_FUSED_BLOCK_RESIDUAL=1|--vram-tier high --runs 3
off|TRELLIS_FUSED_BLOCK_RESIDUAL=0|--vram-tier high --runs 3
on again|TRELLIS_FUSED_BLOCK_RESIDUAL=1|--vram-tier high --runs 3
off again|TRELLIS_FUSED_BLOCK_RESIDUAL=0|--vram-tier high --runs 3" bash tools/gpu/tiers.sh 2>&1 | grep -v "^+"
