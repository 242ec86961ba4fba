#!/bin/bash
# Issue 12: a short check of a build on the GPU: kernel checks, GPU parity in half precision on
# reference-alt, one image-large job at tier high. carry: [".devbin"].
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh > /dev/null 2>&1
set +x
nvidia-smi --query-gpu=name --format=csv,noheader
$W/trellisd doctor --check-kernels --device cuda:0 > /tmp/doctor.txt 2>&1
echo "doctor rc=$? ok=$(grep -c ' ok (' /tmp/doctor.txt)"; grep -iE "fail|error:" /tmp/doctor.txt | head
timeout 100 $W/trellisd parity tests/reference-alt --device cuda:0 --precision half 2>&1 | tail -1
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
timeout 120 $W/trellisd bench pipeline --device cuda:0 --precision half --runs 1 > /tmp/p.txt 2>&1; echo "pipeline rc=$?"
grep -E "^(conditioner|sparse|SLat|mesh|Gaussian|radiance|sum|GPU memory|later)" /tmp/p.txt | cut -c1-120
echo "elapsed $(elapsed) s"
