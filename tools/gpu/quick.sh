#!/bin/bash
# Kernel checks, the attention kernel's rates per tiling, and full-size pipeline jobs (image-large,
# RUNS runs; text-xlarge with 5 steps when XL=1) on the GPU, half precision.
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; echo "doctor rc=$?"
sed -n '/GPU kernels against/,$p' $OUT/doctor.txt | grep -v "^ *ok" | head -20; grep -c "^ *ok" $OUT/doctor.txt
echo "== bench attention"; timeout 90 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/attention.txt 2>&1; echo rc=$?; cat $OUT/attention.txt
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
echo "== bench pipeline image-large"; timeout 200 $W/trellisd bench pipeline --device cuda:0 --precision half --runs ${RUNS:-1} --json $OUT/pipeline.json > $OUT/pipeline.txt 2>&1; echo rc=$?; grep -v "^ *$" $OUT/pipeline.txt | tail -22
if [ "${XL:-0}" = 1 ]; then
  echo "== bench pipeline text-xlarge"; timeout 200 $W/trellisd bench pipeline --pipeline text-xlarge --steps 5 --device cuda:0 --precision half --runs 1 --json $OUT/pipeline_xl.json > $OUT/pipeline_xl.txt 2>&1; echo rc=$?; grep -v "^ *$" $OUT/pipeline_xl.txt | tail -16
fi
echo "elapsed $(elapsed) s"
