#!/bin/bash
# GPU checks of the rasterisers (issue 16), run on the device machine from the repository root
# with `carry: [".devbin"]`; .devbin/trellisd.xz must hold `tools/build-cuda.sh 13`'s binary
# (xz -9). Writes to $OUT: doctor.txt (every GPU kernel against its CPU twin, the rasterisers'
# checks included: exit code 1 on any failure), bench_bake_gpu.txt and bench_bake_cpu.txt (the
# bake benchmark on the GPU and, on the same machine, on the CPU), and a textured GLB with its
# preview from the tiny image pipeline baked on the GPU (generate.txt, tiny.glb, tiny_preview.png).
cd "$(dirname "$0")/../.."
set -x
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
W=/tmp/w; mkdir -p $W; xz -dc .devbin/trellisd.xz > $W/trellisd; chmod +x $W/trellisd
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export TRELLIS_KERNEL_CACHE=$W/kernel-cache
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; echo "doctor rc=$?"
sed -n '/GPU kernels against/,$p' $OUT/doctor.txt
echo "== bench bake, GPU"; time timeout 240 $W/trellisd bench bake --device cuda:0 > $OUT/bench_bake_gpu.txt 2>&1; echo rc=$?
cat $OUT/bench_bake_gpu.txt
$W/trellisd tiny-repos --out $W/tiny > /dev/null 2>&1
echo "== generate tiny, baked on the GPU"; time timeout 120 $W/trellisd generate --device cuda:0 \
  --model $W/tiny/TRELLIS-image-tiny --image-cond-model $W/tiny/dinov2_reg_tiny \
  --image assets/example.png --out $OUT/tiny.glb --preview $OUT/tiny_preview.png \
  --texture-size 512 --quiet > $OUT/generate.txt 2>&1; echo rc=$?
tail -3 $OUT/generate.txt; ls -la $OUT/tiny*
if [ $(( $(date +%s) - T0 )) -lt 300 ]; then
  echo "== bench bake, CPU (same machine)"; time timeout 250 $W/trellisd bench bake --device cpu > $OUT/bench_bake_cpu.txt 2>&1; echo rc=$?
  cat $OUT/bench_bake_cpu.txt
fi
echo "elapsed $(( $(date +%s) - T0 )) s"
