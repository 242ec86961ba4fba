#!/bin/bash
# Issue 12: the weight prefetch on the copy stream (medium and low, against TRELLIS_PREFETCH=0 in
# the same call), the fused residual + norm (against TRELLIS_FUSED_RESIDUAL_NORM=0), the sparse
# conv's tile order and 128-row tiles (TRELLIS_CONV_GRID / TRELLIS_CONV_ROWS) and the
# flash-attention builds (`bench attention` times every tiling; image-large
# at high with each candidate TILINGS as TRELLIS_FLASH_TILING), after the kernel checks.
# carry: [".devbin"] with trellisd.xz and manifests-root/.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
B="$W/trellisd bench pipeline --device cuda:0 --precision half"
L=$OUT/pipelines.txt
run() {
  local name=$1; shift; echo "== $name" | tee -a $L
  timeout 120 "$@" > /tmp/run.txt 2>&1; echo rc=$? | tee -a $L; cat /tmp/run.txt >> $L
  grep -E "^(conditioner|sparse|SLat|mesh|Gaussian|radiance|decoders|sum|GPU memory|later|weight uploads|out-of|error)" /tmp/run.txt | cut -c1-150
}
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1
echo "doctor rc=$? ok=$(grep -c ' ok (' $OUT/doctor.txt)"; grep -iE "fail|error" $OUT/doctor.txt | head
timeout 100 $W/trellisd parity tests/reference-alt --device cuda:0 --precision half 2>&1 | tail -1
timeout 150 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/attention.txt 2>&1
echo "attention rc=$?"; grep -vE "^\s*$" $OUT/attention.txt | tail -45 | cut -c1-160
run "medium, prefetch" $B --vram-tier medium --runs 2
run "medium, TRELLIS_PREFETCH=0" env TRELLIS_PREFETCH=0 $B --vram-tier medium --runs 2
run "low, prefetch" $B --vram-tier low --runs 1
echo "elapsed $(elapsed) s"
export TRELLIS_BENCH_BLOCKS=1
run "high, default" $B --vram-tier high --runs 2
run "high, TRELLIS_FUSED_RESIDUAL_NORM=0" env TRELLIS_FUSED_RESIDUAL_NORM=0 $B --vram-tier high --runs 2
run "high, TRELLIS_CONV_GRID=cols" env TRELLIS_CONV_GRID=cols $B --vram-tier high --runs 2
run "high, TRELLIS_CONV_ROWS=128" env TRELLIS_CONV_ROWS=128 $B --vram-tier high --runs 2
for v in ${TILINGS:-64a4 64a3}; do
  run "high, TRELLIS_FLASH_TILING=$v" env TRELLIS_FLASH_TILING=$v $B --vram-tier high --runs 2
done
grep -E "^(== |SLat flow, one forward)" $L | cut -c1-400
echo "elapsed $(elapsed) s"
