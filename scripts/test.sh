#!/usr/bin/env bash
# The test command (README, CI). It installs the test extra (pyproject.toml: the PyTorch reference,
# the server's and the plots' packages, pytest) into the active environment when a package of it
# is missing, so the README's runtime install needs nothing else first.
# MLX's Linux CPU wheel bundles a reference BLAS that is 20-50x slower than OpenBLAS for float32
# matmul; Debian's libopenblas0-pthread, when present, is preloaded so the PyTorch-parity suite
# runs in minutes. On macOS nothing is preloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
# The test extra's import names (pyproject.toml's `test`: its own packages and those of the
# server, plot, verify and video extras), looked up without importing them.
if ! python - <<'PY'
import importlib.util, sys
names = ("pytest", "hypothesis", "httpx", "tokenizers", "torch", "torchvision", "timm", "transformers",
         "fastapi", "uvicorn", "openai", "matplotlib", "av")
sys.exit(any(importlib.util.find_spec(n) is None for n in names))
PY
then
  echo "installing the test extra: python -m pip install -e '.[test]'" >&2
  python -m pip install -q -e ".[test]"
fi
if [ "$(uname -s)" = Linux ] && [ -z "${LD_PRELOAD:-}" ]; then
  for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0; do
    if [ -e "$lib" ]; then export LD_PRELOAD="$lib"; break; fi
  done
fi
exec python -m pytest "$@"
