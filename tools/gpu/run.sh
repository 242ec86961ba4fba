#!/bin/bash
# Issue 11/12, GPU call 2: the CLIP fixture, generate on the tiny repositories (every format,
# float32 and float16), the attention kernel's rate, and one full-size image-large job
# (`bench pipeline`). carry: [".devbin"] with trellisd.xz and clip.tar.xz. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
tar -C $W -xJf .devbin/clip.tar.xz
for p in full half; do
  timeout 60 $W/trellisd parity $W/reference --device cuda:0 --precision $p -v > $OUT/parity_clip_$p.txt 2>&1; echo rc=$?
  grep -E "^(ok|FAIL)|^parity" $OUT/parity_clip_$p.txt | cut -c1-160
done
$W/trellisd tiny-repos --out $W/tiny > /dev/null 2>&1 || echo "tiny-repos failed"
T=$W/tiny
for p in full half; do
  timeout 60 $W/trellisd generate --device cuda:0 --precision $p --model $T/TRELLIS-image-tiny --image-cond-model $T/dinov2_reg_tiny --image assets/example.png --out $W/i_$p.glb --ply $W/i_$p.ply --asset $W/i_$p.trellis --formats mesh,gaussian,radiance_field --quiet > $OUT/generate_image_$p.txt 2>&1; echo "generate image $p rc=$?"; tail -3 $OUT/generate_image_$p.txt
  timeout 60 $W/trellisd generate --device cuda:0 --precision $p --model $T/TRELLIS-text-tiny --text-cond-model $T/clip_text_tiny --text "a wooden chair" --out $W/t_$p.glb --ply $W/t_$p.ply --formats mesh,gaussian,radiance_field --quiet > $OUT/generate_text_$p.txt 2>&1; echo "generate text $p rc=$?"; tail -3 $OUT/generate_text_$p.txt
done
ls -la $W/*.glb $W/*.ply $W/*.trellis 2>&1
cp $W/i_half.glb $W/t_half.glb $OUT/ 2>/dev/null
timeout 90 $W/trellisd bench attention --device cuda:0 --precision half > $OUT/bench_attention.txt 2>&1; echo rc=$?; cat $OUT/bench_attention.txt
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
timeout 330 $W/trellisd bench pipeline --device cuda:0 --precision half --runs 1 --json $OUT/pipeline_half.json > $OUT/bench_pipeline_half.txt 2>&1; echo rc=$?; cat $OUT/bench_pipeline_half.txt
echo "elapsed $(elapsed) s"
