#!/bin/bash
# One device call for a change set: parity on the GPU (tools/gpu/parity.sh without its bench;
# summary lines only, the full logs in $OUT), then tools/gpu/compare.sh with $VARIANTS.
# carry: [".devbin"] with trellisd.xz, ref1.tar.xz, dino.tar.xz and manifests-root/.
cd "$(dirname "$0")/../.."
BENCH_BEFORE=0 bash tools/gpu/parity.sh > $OUT/parity_all.txt 2>&1
grep -E "^(parity|FAIL|== |rc=)|doctor|error" $OUT/parity_all.txt | grep -v "^+" | cut -c1-200
bash tools/gpu/compare.sh 2>&1 | grep -v "^+"
