#!/bin/bash
# Issue 12: the flash-attention tilings side by side (bench attention) and one image-large job per
# tiling variant; doctor first (the variants are checked there too). carry: [".devbin"].
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh > /dev/null 2>&1
set +x
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; echo "doctor rc=$? ok=$(grep -c ' ok (' $OUT/doctor.txt)"; grep -E "flash|FAIL|fail" $OUT/doctor.txt
timeout 120 $W/trellisd bench attention --device cuda:0 --precision half 2>&1 | grep -v "^matrix" | cut -c1-110
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
for v in ${VARIANTS:-default TRELLIS_FLASH_ASYNC=0 TRELLIS_FLASH_ROWS=64}; do
  envs=(); [ "$v" = default ] || IFS=, read -ra envs <<< "$v"
  echo "== $v"; env "${envs[@]}" timeout 150 $W/trellisd bench pipeline --device cuda:0 --precision half --runs 1 > /tmp/p.txt 2>&1; echo rc=$?
  grep -E "^(sparse-structure flow|SLat flow|sum)" /tmp/p.txt | cut -c1-110
done
echo "elapsed $(elapsed) s"
