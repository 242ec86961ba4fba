#!/bin/bash
# Issue 12: where the fused attention kernel's time goes. One launch of KERNEL (default: the
# mma.sync 128-row cp.async build, f16, d64; `bench attention`'s first launch of it is the SS
# flow's 1 x 4096 self-attention) under Nsight Compute: speed of light, occupancy, issue and warp
# state, and per-pipe utilisation plus the stall reasons per issued instruction.
# carry: [".devbin"] with trellisd.xz. Logs go to $OUT.
cd "$(dirname "$0")/../.."
. tools/gpu/common.sh
set +x
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
K=${KERNEL:-flash_attention_async_f16_d64_m2}
M='regex:^(sm__inst_executed_pipe_.*\.avg\.pct_of_peak_sustained_active|sm__pipe_.*_cycles_active\.avg\.pct_of_peak_sustained_active|smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio)$'
echo "== ncu $K"
timeout ${NCU_TIMEOUT:-240} $NCU -k "regex:^$K\$" -c 1 --print-units base \
  --section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats \
  --section LaunchStats --metrics "$M" \
  $W/trellisd bench attention --device cuda:0 --precision half > $OUT/ncu_attention.txt 2>&1
echo rc=$?
grep -E "Duration|Throughput|Registers|Occupancy|Eligible|Issued Warp|Warp Cycles|No Eligible|pct_of_peak|stalled" \
  $OUT/ncu_attention.txt | grep -vE " 0(\.0+)?$" | sed 's/  */ /g' | cut -c1-120 | head -90
echo "elapsed $(elapsed) s"
