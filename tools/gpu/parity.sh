#!/bin/bash
# Issue 11, GPU call 1: kernel checks and parity on the GPU, float32 and float16.
# carry: [".devbin"], .devbin/ holding trellisd.xz, ref1.tar.xz (../shared/reference without
# conditioners/, as reference/) and dino.tar.xz (reference/conditioners/dinov2_reg_tiny); the
# CLIP fixture runs in tools/gpu/run.sh (the checkout and carry must stay under 64 MiB). Logs: $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
for f in .devbin/ref1.tar.xz .devbin/dino.tar.xz; do tar -C $W -xJf $f; done
R=$W/reference
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; tail -12 $OUT/doctor.txt
for p in ${PRECISIONS:-full half}; do
  echo "== parity $p reference"; timeout 200 $W/trellisd parity $R --device cuda:0 --precision $p -v > $OUT/parity_${p}.txt 2>&1; echo rc=$?
  grep -E "^(ok|FAIL)|^parity" $OUT/parity_${p}.txt | cut -c1-160
  echo "== parity $p reference-alt"; timeout 100 $W/trellisd parity tests/reference-alt --device cuda:0 --precision $p -v > $OUT/parity_alt_${p}.txt 2>&1; echo rc=$?
  grep -E "^(ok|FAIL)|^parity" $OUT/parity_alt_${p}.txt | cut -c1-160
done
echo "elapsed $(elapsed) s"
# With the manifests carried too (.devbin/manifests-root), one full-size image-large job.
if [ -d .devbin/manifests-root ] && [ "$(elapsed)" -lt ${BENCH_BEFORE:-400} ]; then
  export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
  echo "== bench pipeline"; timeout 150 $W/trellisd bench pipeline --device cuda:0 --precision half --runs ${RUNS:-1} --json $OUT/pipeline.json > $OUT/pipeline.txt 2>&1; echo rc=$?; cat $OUT/pipeline.txt
fi
echo "elapsed $(elapsed) s"
