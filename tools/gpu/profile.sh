#!/bin/bash
# Issue 12: where the GPU time goes. Per-kernel GPU time of a short image-large job under Nsight
# Compute (one metric, gpu__time_duration, clocks left alone), beside the same job's wall times;
# the mesh decoder's own stage times; background removal's time per image (issue 17).
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
STEPS=${STEPS:-5}
echo "== bench u2net"; timeout 60 $W/trellisd bench u2net --device cuda:0 > $OUT/u2net.txt 2>&1; echo rc=$?; tail -15 $OUT/u2net.txt
echo "== bench mesh-decoder"; timeout 120 $W/trellisd bench mesh-decoder --device cuda:0 > $OUT/mesh_decoder.txt 2>&1; echo rc=$?; tail -15 $OUT/mesh_decoder.txt
echo "== bench pipeline steps $STEPS"; timeout 120 $W/trellisd bench pipeline --device cuda:0 --precision half --steps $STEPS --runs 1 --formats mesh > $OUT/pipeline.txt 2>&1; echo rc=$?; cat $OUT/pipeline.txt
echo "== ncu ($NCU)"
timeout ${NCU_TIMEOUT:-300} $NCU --clock-control none --metrics gpu__time_duration.sum --csv --print-units base --log-file $OUT/ncu.log \
  $W/trellisd bench pipeline --device cuda:0 --precision half --steps 1 --runs 1 --formats mesh > $OUT/ncu.csv 2>$OUT/ncu.err; echo rc=$?
tail -3 $OUT/ncu.err; ls -la $OUT
python3 tools/gpu/ncu_summary.py $OUT/ncu.csv | tee $OUT/ncu_summary.txt | head -80
echo "elapsed $(elapsed) s"
