#!/bin/bash
# Issue 12: one full-size image-large job per VRAM tier, the budget / real out-of-memory fallbacks,
# and the single-stage vs cp.async variants of the flash attention and tensor-core sparse conv.
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs (and JSON) go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
B="$W/trellisd bench pipeline --device cuda:0 --precision half"
run() { local name=$1; shift; echo "== $name"; timeout 150 "$@" > $OUT/$name.txt 2>&1; echo rc=$?; grep -vE "^(warm-up|pipeline )" $OUT/$name.txt | cut -c1-150; }
for a in 0 1; do echo "== bench attention, TRELLIS_FLASH_ASYNC=$a"; TRELLIS_FLASH_ASYNC=$a timeout 60 $W/trellisd bench attention --device cuda:0 --precision half 2>&1 | tail -6; done
run high $B --vram-tier high --runs ${RUNS:-1} --json $OUT/high.json
TRELLIS_CONV_ASYNC=1 run high_conv_async $B --vram-tier high --runs 1 --formats mesh
for t in medium low minimal; do run $t $B --vram-tier $t --runs 1 --json $OUT/$t.json; done
TRELLIS_PINNED=0 run medium_pageable $B --vram-tier medium --runs 1 --formats mesh
run budget_1_5g $B --vram-tier high --vram-budget 1.5GiB --runs 1 --formats mesh
FREE=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
run ballast $B --vram-tier high --vram-ballast $(( FREE / 1024 - 6 ))GiB --runs 1 --formats mesh
echo "elapsed $(elapsed) s"
