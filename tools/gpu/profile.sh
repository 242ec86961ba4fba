#!/bin/bash
# Issue 12: where the GPU time goes. Per-kernel GPU time of a short image-large job under Nsight
# Compute (one metric, gpu__time_duration, clocks left alone), summed by kernel and by stage
# (tools/gpu/ncu_summary.py), beside the same job's wall times; optionally the mesh decoder's own
# stage times and background removal's time per image (issue 17).
# Env: NCU_FORMATS (decoders in the profiled job, default mesh), NCU_STEPS (default 1),
#      EXTRA=1 also runs `bench u2net` and `bench mesh-decoder`.
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "${EXTRA:-}" ]; then
  echo "== bench u2net"; timeout 60 $W/trellisd bench u2net --device cuda:0 > $OUT/u2net.txt 2>&1; echo rc=$?; tail -5 $OUT/u2net.txt
  echo "== bench mesh-decoder"; timeout 120 $W/trellisd bench mesh-decoder --device cuda:0 > $OUT/mesh_decoder.txt 2>&1; echo rc=$?; tail -8 $OUT/mesh_decoder.txt
fi
echo "== ncu ($NCU)"
timeout ${NCU_TIMEOUT:-300} $NCU --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file $OUT/ncu.csv \
  $W/trellisd bench pipeline --device cuda:0 --precision half --steps ${NCU_STEPS:-1} --runs 1 --formats ${NCU_FORMATS:-mesh} > $OUT/ncu_stdout.txt 2>&1; echo rc=$?
tail -3 $OUT/ncu_stdout.txt
python3 tools/gpu/ncu_summary.py $OUT/ncu.csv > $OUT/ncu_summary.txt; head -40 $OUT/ncu_summary.txt
echo "elapsed $(elapsed) s"
