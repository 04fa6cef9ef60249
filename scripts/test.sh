#!/usr/bin/env bash
# The test command (README, CI). MLX's Linux CPU wheel bundles a reference BLAS that is 20-50x
# slower than OpenBLAS for float32 matmul; Debian's libopenblas0-pthread, when present, is
# preloaded so the PyTorch-parity suite runs in minutes. On macOS nothing is preloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(uname -s)" = Linux ] && [ -z "${LD_PRELOAD:-}" ]; then
  for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0; do
    if [ -e "$lib" ]; then export LD_PRELOAD="$lib"; break; fi
  done
fi
exec python -m pytest "$@"
