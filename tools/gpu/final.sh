#!/bin/bash
# Issue 12, one call for a build's figures: GPU parity (summary only), image-large at every tier
# (high: RUNS runs, the per-block SLat times and unsynced forwards), text-xlarge, the budget
# fallback (BUDGETS= more budgets), MINIMAL_AB= switches compared at minimal, and the Nsight Compute kernel times of one forward of each flow; AB="VAR=value ..." adds
# a run at high per switch, ATTENTION=1 adds `bench attention`, CONV=1 `bench sparse-conv`. Few files in $OUT
# (the device tool returns a limited number): logs are appended to a handful of them. PRECISIONS=
# "half" limits the GPU parity to half precision, PARITY=0 skips it, TEXT=0 skips the text-xlarge job.
# carry: [".devbin"] with trellisd.xz, ref1.tar.xz, dino.tar.xz and manifests-root/.
cd "$(dirname "$0")/../.."
if [ "${PARITY:-1}" = 1 ]; then
  mkdir -p /tmp/pout && OUT=/tmp/pout BENCH_BEFORE=0 bash tools/gpu/parity.sh > /tmp/parity_all.txt 2>&1
fi
. tools/gpu/common.sh
set +x
if [ "${PARITY:-1}" = 1 ]; then
  # The parity summary first, so a call cut short still reports it.
  echo "== parity (summary)"
  grep -E "^(parity|FAIL|== |rc=)|checks|error" /tmp/parity_all.txt | grep -v "^+" | cut -c1-200
  cat /tmp/parity_all.txt /tmp/pout/*.txt > $OUT/parity_logs.txt
  echo "elapsed $(elapsed) s"
fi
export TRELLIS_REFERENCE_DIR=$PWD/.devbin/manifests-root
B="$W/trellisd bench pipeline --device cuda:0 --precision half"
L=$OUT/pipelines.txt
run() {
  local name=$1; shift; echo "== $name" | tee -a $L
  timeout 200 "$@" > /tmp/run.txt 2>&1; echo rc=$? | tee -a $L; cat /tmp/run.txt >> $L
  grep -E "^(conditioner|sparse|SLat|mesh|Gaussian|radiance|decoders|sum|GPU memory|host|later|out-of|weight uploads)" /tmp/run.txt | cut -c1-150
}
TRELLIS_BENCH_BLOCKS=1 run high $B --vram-tier high --runs ${RUNS:-3} --json $OUT/high.json
grep -E "^SLat flow, one forward" $L | tail -1 | cut -c1-700
# AB: switches to compare against the default at high, e.g. "TRELLIS_CFG_BATCH=0 TRELLIS_CONV_ROWS=64"
# (one run per word; commas join several switches into one run: "TRELLIS_CONV_TILE=k64,TRELLIS_CONV_ORDER=1")
for v in ${AB:-}; do
  run "high, $v" env TRELLIS_BENCH_BLOCKS=1 ${v//,/ } $B --vram-tier high --runs 2
  grep -E "^SLat flow, one forward" $L | tail -1 | cut -c1-700
done
if [ -n "${CONV:-}" ]; then
  echo "== bench sparse-conv"; timeout 150 $W/trellisd bench sparse-conv --device cuda:0 --precision half > $OUT/conv.txt 2>&1; echo rc=$?; grep -v "^ *$" $OUT/conv.txt | cut -c1-150 | tail -60
fi
if [ -n "${ATTENTION:-}" ]; then
  echo "== bench attention"; timeout 100 $W/trellisd bench attention --device cuda:0 --precision half 2>&1 | grep -E "TFLOP" | cut -c1-120
fi
for t in medium low minimal; do run $t $B --vram-tier $t --runs 1; done
# MINIMAL_AB: switches to compare at minimal (e.g. "TRELLIS_STREAM_BLOCKS=0").
for v in ${MINIMAL_AB:-}; do run "minimal, $v" env ${v//,/ } $B --vram-tier minimal --runs 1; done
run budget_1_5g $B --vram-tier high --vram-budget 1.5GiB --runs 1 --formats mesh
# BUDGETS: more weight budgets to fall from high with (e.g. "1.25GiB").
for b in ${BUDGETS:-}; do run "budget $b" $B --vram-tier high --vram-budget $b --runs 1 --formats mesh; done
[ "${TEXT:-1}" = 1 ] && run text_xlarge $B --pipeline text-xlarge --runs 1
echo "elapsed $(elapsed) s"
[ -n "${PROFILE_FLOWS-ss slat}" ] && FLOWS="${PROFILE_FLOWS-ss slat}" TOP=${TOP:-16} bash tools/gpu/profile_flows.sh 2>&1 | grep -v "^+" | grep -vE "^(name|NVIDIA)"
rm -f $OUT/ncu_*.csv $OUT/ncu_*_stdout.txt
echo "elapsed $(elapsed) s"
