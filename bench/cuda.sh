#!/usr/bin/env bash
# The synthetic full-depth bench (random weights in the real 26B-A4B shapes, all 30 layers) on an
# NVIDIA GPU with MLX's CUDA build, at 4 and 8 bits: the first GPU figures of this project.
#
#   bash bench/cuda.sh [OUT_DIR]        # default OUT_DIR: bench-cuda (JSON, plots, logs)
#
# Needs Linux x86_64, an NVIDIA driver new enough for CUDA 13, Python >= 3.10 and, the first time,
# a package registry. MLX's CUDA backend is a separate wheel that must match the mlx version exactly:
# `mlx[cuda13]==X` pulls `mlx-cuda-13==X`. This project is tested with mlx 0.32.4, and
# mlx-cuda-13 0.32.4 exists (manylinux_2_35, x86_64; CUDA 13 runtime, cuBLAS, cuDNN 9, NCCL as
# nvidia-* wheels). The older `mlx-cuda` wheels stop at 0.30.0: do not use them with mlx 0.32.
# Without a registry, point VENV at an environment that already has mlx[cuda13] installed.
# Takes a few minutes on a datacenter GPU: two trials per setting, 16 and 32 steps per block.
set -euo pipefail

MLX_VERSION="${MLX_VERSION:-0.32.4}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-cuda}"
OUT="${1:-$ROOT/bench-cuda}"
mkdir -p "$OUT"

gpu_ready() {
    "$VENV/bin/python" -c "import mlx.core as mx, sys; sys.exit(0 if mx.cuda.is_available() else 1)" 2>/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! gpu_ready; then
    # The package itself without its dependencies: on Linux those name mlx[cpu], whose backend
    # would compete with the CUDA one.
    "$VENV/bin/pip" install -q "mlx[cuda13]==$MLX_VERSION" "mlx-lm>=0.32.2" numpy huggingface_hub "typer>=0.12" rich matplotlib
    "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
fi
if ! gpu_ready; then
    echo "mlxdg: MLX's CUDA backend is not available in $VENV (mlx-cuda-13==$MLX_VERSION installed?" \
         "nvidia-smi working?): install mlx[cuda13]==$MLX_VERSION on a machine with an NVIDIA GPU" >&2
    exit 1
fi

"$VENV/bin/python" - <<'EOF' | tee "$OUT/device.txt"
import mlx.core as mx
import importlib.metadata as m
print("device", mx.default_device(), mx.device_info())
print("mlx", m.version("mlx"), "mlx-cuda-13", m.version("mlx-cuda-13"), "mlx-lm", m.version("mlx-lm"))
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$OUT/device.txt" || true

for bits in 4 8; do
    # Random prompt and weights, fixed steps (adaptive stop off for those rows), EOS off: every run
    # makes all its tokens. The AR row is mlx-lm's Gemma 4 on weights of the same shape and bits.
    "$VENV/bin/mlxdg" bench --synthetic 26b-a4b --quant "$bits" --steps 16,32 --trials 2 \
        --prompt-tokens 512 --gen-tokens 512 --json "$OUT/bench-${bits}bit.json" \
        --plot "$OUT/bench-${bits}bit.png" 2>&1 | tee "$OUT/bench-${bits}bit.log"
done
echo "results in $OUT"
