#!/bin/bash
# Issue 12: `bench pipeline` (image-large, half precision) at the tiers, most wanted first, so a
# call cut short still returns the runs that matter: RUNS= "name|env switches|bench args" lines
# (switches comma-joined, `-` for none). Default: tier minimal (the flows' blocks streamed) beside
# the same run with the flows placed whole, both with the CFG branches paired (their outputs'
# sums must be equal), then high, the budgets, the other tiers. Logs: $OUT/pipelines.txt.
# carry: [".devbin"] with trellisd.xz and manifests-root/.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
B="$W/trellisd bench pipeline --device cuda:0 --precision half"
L=$OUT/pipelines.txt
DEFAULT_RUNS="minimal|-|--vram-tier minimal --runs 1
minimal, flows whole, paired|TRELLIS_STREAM_BLOCKS=0,TRELLIS_CFG_BATCH=1|--vram-tier minimal --runs 1
high|TRELLIS_BENCH_BLOCKS=1|--vram-tier high --runs 3
text-xlarge, high, budget 1GiB (its flows are 1.84 and 2.00 GiB)|-|--pipeline text-xlarge --vram-tier high --vram-budget 1GiB --runs 1 --formats mesh
minimal, flows whole|TRELLIS_STREAM_BLOCKS=0|--vram-tier minimal --runs 1
high, SLat paired|TRELLIS_CFG_BATCH=1|--vram-tier high --runs 2
medium|-|--vram-tier medium --runs 1
low|-|--vram-tier low --runs 1"
while IFS='|' read -r name envs args; do
  [ -z "$name" ] && continue
  echo "== $name" | tee -a $L
  e=""; [ "$envs" != "-" ] && e="${envs//,/ }"
  timeout 200 env $e $B $args > /tmp/run.txt 2>&1; echo rc=$? | tee -a $L; cat /tmp/run.txt >> $L
  grep -E "^(warm-up|conditioner|sparse|SLat|mesh|Gaussian|radiance|decoders|sum|GPU memory|later|out-of|weight uploads|warning|Error|error)" /tmp/run.txt | cut -c1-160
  grep -oE "outputs: .*" /tmp/run.txt
  echo "elapsed $(elapsed) s"
done <<< "${RUNS:-$DEFAULT_RUNS}"
