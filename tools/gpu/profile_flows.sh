#!/bin/bash
# Issue 12: the kernels of ONE flow forward each (SS flow, then SLat flow) under Nsight Compute,
# GPU time per kernel (gpu__time_duration, clocks left alone), against the same forward's wall time.
# `bench pipeline` with TRELLIS_BENCH_BLOCKS=1 runs an unsynced forward of each flow after the
# timed runs; TRELLIS_PROFILE=ss|slat brackets it with cuProfilerStart/Stop, and ncu
# (--profile-from-start off) sees only that range.
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for flow in ${FLOWS:-ss slat}; do
  echo "== ncu, one $flow forward"
  TRELLIS_BENCH_BLOCKS=1 TRELLIS_PROFILE=$flow timeout ${NCU_TIMEOUT:-200} $NCU --profile-from-start off \
    --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file $OUT/ncu_$flow.csv \
    $W/trellisd bench pipeline --device cuda:0 --precision half --steps 1 --runs 1 --formats mesh ${ARGS:-} \
    > $OUT/ncu_${flow}_stdout.txt 2>&1; echo rc=$?
  grep -E "^SLat flow, one forward|warning" $OUT/ncu_${flow}_stdout.txt | cut -c1-600
  python3 tools/gpu/ncu_summary.py $OUT/ncu_$flow.csv > $OUT/ncu_${flow}_summary.txt; head -${TOP:-32} $OUT/ncu_${flow}_summary.txt | cut -c1-150
  echo "elapsed $(elapsed) s"
done
