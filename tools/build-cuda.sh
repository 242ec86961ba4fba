#!/usr/bin/env bash
# Builds `trellisd --features cuda` from a fresh Debian/Ubuntu x86-64 machine with no GPU.
#
#   tools/build-cuda.sh [12|13]...      (default: 13; one binary per CUDA major)
#
# Output: $OUT_DIR/trellisd-cuda12, $OUT_DIR/trellisd-cuda13 (default OUT_DIR: dist/).
#
# What it does (see ../shared/toolchain/CUDA.md for the why):
# 1. a relocatable CUDA 12.4 toolkit (nvcc, headers, static cudart) in $CUDA_TOOLKIT
#    (default ~/.cache/trellis-rs/cuda-12.4), assembled from Debian's packages by
#    tools/setup-toolkit-deb124.sh when it is not there yet;
# 2. copies of candle-core and candle-kernels from cargo's registry in $PATCH_DIR, patched so that
#    the binary opens the CUDA libraries at run time (cudarc `dynamic-loading`) and links the CUDA
#    runtime statically: it then starts on machines without a GPU or CUDA and `doctor` explains;
# 3. `cargo build --release -p trellisd --features cuda` with CUDARC_CUDA_VERSION per major, the
#    patched crates selected with `--config patch.crates-io...`, in a copy of the sources under
#    $CARGO_TARGET_DIR/src (the patch rewrites Cargo.lock there, never in the repository).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CUDA_TOOLKIT=${CUDA_TOOLKIT:-$HOME/.cache/trellis-rs/cuda-12.4}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-cuda}
PATCH_DIR=${PATCH_DIR:-$CARGO_TARGET_DIR/patched-candle}
OUT_DIR=${OUT_DIR:-$ROOT/dist}
MAJORS=("$@"); [[ ${#MAJORS[@]} -gt 0 ]] || MAJORS=(13)

# 1. toolkit
if ! [[ -x $CUDA_TOOLKIT/bin/nvcc ]]; then
  bash "$ROOT/tools/setup-toolkit-deb124.sh" "$CUDA_TOOLKIT"
fi
export CUDA_HOME=$CUDA_TOOLKIT CUDA_PATH=$CUDA_TOOLKIT PATH=$CUDA_TOOLKIT/bin:$PATH
# One PTX arch that every driver JITs for sm_86..sm_120; never >= 90 (the `a` suffix pins one chip).
export CUDA_COMPUTE_CAP=80
# candle-kernels' static MoE/GGUF library: sm_80 SASS plus compute_80 PTX so it loads on newer GPUs.
export REAL_NVCC=$CUDA_TOOLKIT/bin/nvcc NVCC=$ROOT/tools/nvcc-multiarch
export LIB_GENCODE="-gencode=arch=compute_80,code=[sm_80,compute_80]"

# 2. patched candle sources
REG=$(ls -d "$HOME"/.cargo/registry/src/*/ 2>/dev/null | head -1 || true)
VER=$(grep -A1 '^name = "candle-core"' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')
if ! [[ -n $REG && -d $REG/candle-core-$VER && -d $REG/candle-kernels-$VER ]]; then
  (cd "$ROOT" && cargo fetch --locked)
  REG=$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)
fi
STAMP="$PATCH_DIR/.patched-$VER-$(sha256sum "$0" | cut -c1-16)"
patch_candle() {   # once per candle version and script version (keeps the build cached)
mkdir -p "$PATCH_DIR"
for c in candle-core candle-kernels; do
  rm -rf "$PATCH_DIR/$c"
  cp -a "$REG/$c-$VER" "$PATCH_DIR/$c"
  chmod -R u+w "$PATCH_DIR/$c"
done
# candle-core: open the CUDA libraries at run time instead of linking them.
sed -i 's/^    "dynamic-linking",$/    "dynamic-loading",/' "$PATCH_DIR/candle-core/Cargo.toml"
grep -q '"dynamic-loading"' "$PATCH_DIR/candle-core/Cargo.toml" ||
  { echo "patching candle-core's cudarc features failed (candle $VER)" >&2; exit 1; }
# candle-kernels: the static CUDA runtime (no libcudart.so needed at start-up).
python3 - "$PATCH_DIR/candle-kernels/build.rs" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
old = 'println!("cargo:rustc-link-lib=dylib=cudart");'
new = ('if let Ok(h) = env::var("CUDA_HOME") { println!("cargo:rustc-link-search=native={h}/lib64"); }\n'
       '    println!("cargo:rustc-link-lib=static=cudart_static");\n'
       '    println!("cargo:rustc-link-lib=dylib=dl");\n'
       '    println!("cargo:rustc-link-lib=dylib=rt");\n'
       '    println!("cargo:rustc-link-lib=dylib=pthread");')
if old not in s:
    sys.exit("patching candle-kernels' build.rs failed: link line not found")
open(p, 'w').write(s.replace(old, new))
EOF
touch "$STAMP"
}
[[ -f $STAMP ]] || patch_candle

# 3. build, one binary per CUDA major
SRC=$CARGO_TARGET_DIR/src
mkdir -p "$SRC"
# Files whose content changed get a fresh modification time (so cargo rebuilds them even when
# they were edited while an earlier build ran); unchanged files keep theirs and are not rebuilt.
STAGE=$(mktemp -d)
tar -C "$ROOT" -cf - --exclude=./target --exclude=./target-cuda --exclude=./dist --exclude=./.git \
  --exclude=./.devbin --exclude=./tests Cargo.toml Cargo.lock daemon kernels ipc-protocol |
  tar -C "$STAGE" -xf -
(cd "$STAGE" && find . -type f) | while read -r f; do
  if ! cmp -s "$STAGE/$f" "$SRC/$f"; then
    mkdir -p "$(dirname "$SRC/$f")"
    cp "$STAGE/$f" "$SRC/$f"
  fi
done
# Sources deleted from the checkout go from the copy too.
for d in daemon/src kernels/src ipc-protocol/src; do
  [ -d "$SRC/$d" ] || continue
  (cd "$SRC" && find "$d" -type f) | while read -r f; do
    [ -e "$STAGE/$f" ] || rm -f "$SRC/$f"
  done
done
rm -rf "$STAGE"
mkdir -p "$OUT_DIR"
for major in "${MAJORS[@]}"; do
  case $major in
    12) ver=12080 ;;
    13) ver=13000 ;;
    *) echo "unknown CUDA major $major (12 or 13)" >&2; exit 1 ;;
  esac
  echo "== trellisd for CUDA $major (CUDARC_CUDA_VERSION=$ver)"
  # cudarc's build script reads CUDARC_CUDA_VERSION (a change rebuilds cudarc and what uses it).
  CUDARC_CUDA_VERSION=$ver TRELLIS_CUDA_MAJOR=$major \
    cargo build --release -p trellisd --features cuda \
    --config "patch.crates-io.candle-core.path=\"$PATCH_DIR/candle-core\"" \
    --config "patch.crates-io.candle-kernels.path=\"$PATCH_DIR/candle-kernels\"" \
    --manifest-path "$SRC/Cargo.toml"
  # symbols are most of the file; strip them from the copy that ships
  strip -o "$OUT_DIR/trellisd-cuda$major" "$CARGO_TARGET_DIR/release/trellisd" 2>/dev/null ||
    cp "$CARGO_TARGET_DIR/release/trellisd" "$OUT_DIR/trellisd-cuda$major"
  echo "built $OUT_DIR/trellisd-cuda$major"
done
