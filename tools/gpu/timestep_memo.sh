#!/bin/bash
# Issue 12: the SLat flow's timestep memo (the embedding and every layer's modulation kept for the
# other guided branch at the same t; TRELLIS_TIMESTEP_MEMO=0 off) in one call: the kernel checks
# and half-precision parity (the SLat flow handler checks the kept path bit for bit), then
# image-large at high with the memo on and off, A/B/A/B, and once with the mma.sync attention
# (TRELLIS_FLASH_WGMMA=0). carry: [".devbin"] with trellisd.xz, ref1.tar.xz, dino.tar.xz and
# manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
PRECISIONS=half BENCH_BEFORE=0 bash tools/gpu/parity.sh 2>&1 | grep -v "^+" | grep -v "^ok "
RUNS="memo on (default)|-|--vram-tier high --runs 3
memo off|TRELLIS_TIMESTEP_MEMO=0|--vram-tier high --runs 3
memo on again|-|--vram-tier high --runs 3
memo off again|TRELLIS_TIMESTEP_MEMO=0|--vram-tier high --runs 3
mma.sync attention|TRELLIS_FLASH_WGMMA=0|--vram-tier high --runs 3" bash tools/gpu/tiers.sh 2>&1 | grep -v "^+"
