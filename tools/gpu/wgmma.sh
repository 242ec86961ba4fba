#!/bin/bash
# Issue 12: the wgmma (sm_90) attention kernel on an H100/H200 in one call: the kernel checks,
# `bench attention` for every build, then image-large at high
# for the default (mma.sync) against the wgmma builds (TILINGS, each forced for every attention
# call) and AB switches. carry: [".devbin"] (trellisd.xz, manifests-root/). Logs: $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
timeout ${DOCTOR_TIMEOUT:-150} $W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; drc=$?; echo "doctor rc=$drc"
# A kernel that fails its check (or hangs) is not timed: only the default runs then.
FORCED=${TILINGS:-auto 192w64 192w128}
[ $drc = 0 ] || { echo "doctor failed: the forced tilings are skipped"; FORCED=; }
sed -n '/GPU kernels against/,$p' $OUT/doctor.txt | grep -v "^ *ok" | cut -c1-400; grep -c "^ *ok" $OUT/doctor.txt
grep "wgmma" $OUT/doctor.txt | cut -c1-300
echo "== bench attention"
timeout 120 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/attention.txt 2>&1
echo rc=$?; grep -E "TFLOP" $OUT/attention.txt | cut -c1-125
echo "elapsed $(elapsed) s"
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
B="$W/trellisd bench pipeline --device cuda:0 --precision half --vram-tier high"
L=$OUT/pipelines.txt
run() {
  local name=$1; shift; echo "== $name" | tee -a $L
  timeout 150 "$@" > /tmp/run.txt 2>&1; echo rc=$? | tee -a $L; cat /tmp/run.txt >> $L
  grep -E "^(sparse|SLat|mesh|Gaussian|radiance|sum|GPU memory)" /tmp/run.txt | cut -c1-150
  grep -E "^SLat flow, one forward" /tmp/run.txt | tail -1 | cut -c1-400
}
run "high, default" env TRELLIS_BENCH_BLOCKS=1 $B --runs ${RUNS:-2}
for t in $FORCED; do
  if [ "$t" = auto ]; then
    run "high, TRELLIS_FLASH_WGMMA=1" env TRELLIS_BENCH_BLOCKS=1 TRELLIS_FLASH_WGMMA=1 $B --runs ${RUNS:-2}
  else
    run "high, TRELLIS_FLASH_TILING=$t" env TRELLIS_BENCH_BLOCKS=1 TRELLIS_FLASH_TILING=$t $B --runs ${RUNS:-2}
  fi
  echo "elapsed $(elapsed) s"
done
for v in ${AB:-}; do run "high, $v" env TRELLIS_BENCH_BLOCKS=1 $v $B --runs ${RUNS:-2}; done
echo "elapsed $(elapsed) s"
