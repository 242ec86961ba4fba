# Sourced by the tools/gpu/*.sh scripts on the device machine (repository root): unpacks the
# cuda build from .devbin/trellisd.xz (tools/build-cuda.sh 13, then xz -9) into $W and puts the
# CUDA 13 libraries (toolkit, else PyTorch's wheels; the driver's folder) on the loader's path.
set -x
T0=$(date +%s)
W=/tmp/w; mkdir -p "$W"
# Always unpack: a warm machine may hold an older (or a broken) binary from an earlier call.
xz -dc .devbin/trellisd.xz > "$W/trellisd" && chmod +x "$W/trellisd" || { echo "no usable .devbin/trellisd.xz"; exit 1; }
L=$(dirname "$(find / -xdev -name 'libcublasLt.so.13*' 2>/dev/null | head -1)" 2>/dev/null)
N=$(dirname "$(find / -xdev -name 'libnvrtc.so.13*' 2>/dev/null | head -1)" 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:/usr/local/nvidia/lib:$L:$N:${LD_LIBRARY_PATH:-}
export RUST_BACKTRACE=0
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
elapsed() { echo $(( $(date +%s) - T0 )); }
