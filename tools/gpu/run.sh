#!/bin/bash
# Issues 11, 12 and 16, GPU call 2: the CLIP fixture, every GPU kernel against its CPU twin
# (doctor), generate on the tiny repositories (every format, full and half, the GLB baked on the
# GPU with its preview), the bake benchmark on the GPU and on this machine's CPU, the attention
# kernel's rate and one full-size image-large job (`bench pipeline`).
# carry: [".devbin"] with trellisd.xz, clip.tar.xz and manifests-root/. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
tar -C $W -xJf .devbin/clip.tar.xz
for p in full half; do
  timeout 60 $W/trellisd parity $W/reference --device cuda:0 --precision $p --only clip -v > $OUT/parity_clip_$p.txt 2>&1; echo rc=$?
  grep -E "^(ok|FAIL)|^parity" $OUT/parity_clip_$p.txt | cut -c1-160
done
$W/trellisd doctor --check-kernels --device cuda:0 > $OUT/doctor.txt 2>&1; echo "doctor rc=$?"
sed -n '/GPU kernels against/,$p' $OUT/doctor.txt
$W/trellisd tiny-repos --out $W/tiny > /dev/null 2>&1 || echo "tiny-repos failed"
T=$W/tiny
for p in full half; do
  timeout 90 $W/trellisd generate --device cuda:0 --precision $p --model $T/TRELLIS-image-tiny --image-cond-model $T/dinov2_reg_tiny --image assets/example.png --out $W/i_$p.glb --ply $W/i_$p.ply --asset $W/i_$p.trellis --preview $W/i_$p.png --texture-size 512 --formats mesh,gaussian,radiance_field --quiet > $OUT/generate_image_$p.txt 2>&1; echo "generate image $p rc=$?"; tail -3 $OUT/generate_image_$p.txt
  timeout 90 $W/trellisd generate --device cuda:0 --precision $p --model $T/TRELLIS-text-tiny --text-cond-model $T/clip_text_tiny --text "a wooden chair" --out $W/t_$p.glb --ply $W/t_$p.ply --formats mesh,gaussian,radiance_field --quiet > $OUT/generate_text_$p.txt 2>&1; echo "generate text $p rc=$?"; tail -3 $OUT/generate_text_$p.txt
done
ls -la $W/*.glb $W/*.ply $W/*.trellis $W/*.png 2>&1
cp $W/i_half.glb $W/i_half.png $OUT/ 2>/dev/null
echo "== bench bake, GPU"; timeout 150 $W/trellisd bench bake --device cuda:0 > $OUT/bench_bake_gpu.txt 2>&1; echo rc=$?; cat $OUT/bench_bake_gpu.txt
echo "== bench bake, CPU (this machine)"; timeout 150 $W/trellisd bench bake --device cpu > $OUT/bench_bake_cpu.txt 2>&1; echo rc=$?; cat $OUT/bench_bake_cpu.txt
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
if [ "$(elapsed)" -lt 330 ]; then
  timeout 200 $W/trellisd bench pipeline --device cuda:0 --precision half --runs 1 --json $OUT/pipeline_half.json > $OUT/bench_pipeline_half.txt 2>&1; echo rc=$?; cat $OUT/bench_pipeline_half.txt
fi
echo "elapsed $(elapsed) s"
