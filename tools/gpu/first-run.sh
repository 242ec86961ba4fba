#!/bin/bash
# The first GPU call for issue 11, run on the device machine from the repository root with
# `carry: [".devbin"]`. .devbin/ (git-ignored) must hold: trellisd.xz (tools/build-cuda.sh 13, xz -9),
# ref1.tar.xz (../shared/reference without conditioners/, as reference/) and dino.tar.xz
# (reference/conditioners/dinov2_reg_tiny). Writes doctor, parity full/half, generate and bench logs to $OUT.
cd "$(dirname "$0")/../.."
set -x
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
W=/tmp/w; mkdir -p $W; xz -dc .devbin/trellisd.xz > $W/trellisd; chmod +x $W/trellisd
tar -C $W -xJf .devbin/ref1.tar.xz; tar -C $W -xJf .devbin/dino.tar.xz
ls /usr/local/cuda/lib64 2>/dev/null | head -30
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
$W/trellisd doctor --check-kernels --device cuda:0 2>&1 | tee $OUT/doctor.txt
R=$W/reference
echo "== parity full (reference subset)"; time timeout 250 $W/trellisd parity $R --device cuda:0 --precision full -v > $OUT/parity_full.txt 2>&1; echo rc=$?
tail -5 $OUT/parity_full.txt
echo "== parity full (reference-alt)"; time timeout 120 $W/trellisd parity tests/reference-alt --device cuda:0 --precision full -v > $OUT/parity_alt_full.txt 2>&1; echo rc=$?
tail -5 $OUT/parity_alt_full.txt
echo "== generate image tiny"; time timeout 100 $W/trellisd generate --device cuda:0 --model $R/pipelines/TRELLIS-image-tiny --image-cond-model $R/conditioners/dinov2_reg_tiny --image assets/example.png --out $W/t.glb --ply $W/t.ply --asset $W/t.trellis --formats mesh,gaussian,radiance_field --quiet > $OUT/generate.txt 2>&1; echo rc=$?; tail -3 $OUT/generate.txt; ls -la $W/t.*
[ $(( $(date +%s) - T0 )) -lt 240 ] && echo "== parity half (reference subset)" && time timeout 150 $W/trellisd parity $R --device cuda:0 --precision half -v > $OUT/parity_half.txt 2>&1; echo rc=$?
tail -5 $OUT/parity_half.txt
export TRELLIS_REFERENCE_DIR=$R
for b in slat-flow mesh-decoder dinov2-large; do
  if [ $(( $(date +%s) - T0 )) -lt 300 ]; then
    echo "== bench $b"; timeout 150 $W/trellisd bench $b --device cuda:0 --precision full > $OUT/bench_$b.txt 2>&1; echo rc=$?; cat $OUT/bench_$b.txt
  fi
done
echo "elapsed $(( $(date +%s) - T0 )) s"
