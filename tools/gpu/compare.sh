#!/bin/bash
# One full-size image-large job (`bench pipeline`, half precision, RUNS runs) per environment
# variant, side by side on one warm GPU: VARIANTS is a space-separated list of VAR=VALUE[,VAR=VALUE]
# items, `default` for none (default: "default TRELLIS_CFG_BATCH=0 TRELLIS_FLASH_ASYNC=1").
# Also the attention kernel's rates and the kernel checks when CHECKS=1.
# carry: [".devbin"] with trellisd.xz and manifests-root/. Logs: $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
if [ "${CHECKS:-1}" = 1 ]; then
  $W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; echo "doctor rc=$?"
  grep -E "^  " $OUT/doctor.txt | grep -v " ok " ; echo "checks ok: $(grep -c ' ok (' $OUT/doctor.txt)"
  grep -E "conv3d|flash" $OUT/doctor.txt
  timeout 90 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/attention.txt 2>&1; echo "attention rc=$?"; cat $OUT/attention.txt
fi
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
for v in ${VARIANTS:-default TRELLIS_CFG_BATCH=0 TRELLIS_FLASH_ASYNC=1}; do
  envs=(); [ "$v" = default ] || IFS=, read -ra envs <<< "$v"
  tag=$(echo "$v" | tr ',=' '__')
  echo "== bench pipeline [$v]"
  env "${envs[@]}" timeout 240 $W/trellisd bench pipeline --device cuda:0 --precision half --runs ${RUNS:-1} ${ARGS:-} --json $OUT/pipeline_$tag.json > $OUT/pipeline_$tag.txt 2>&1; echo rc=$?
  grep -E "^(stage|conditioner|sparse|SLat|mesh|Gaussian|radiance|decoders|sum|GPU memory|host)" $OUT/pipeline_$tag.txt | cut -c1-150
  echo "elapsed $(elapsed) s"
done
