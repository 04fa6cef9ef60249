#!/usr/bin/env bash
# The runtime alone (CI): `pip install .` into a fresh virtual environment, no extra, then the
# installed tools run without torch: --help of every tool, a conversion and a generation on a
# small random-weight model (no download), and each feature that needs an extra fails with one
# line naming it (pip install "fastvlm-mlx[EXTRA]"). Bounded: every step has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "check_runtime_install: $*" >&2; exit 1; }

python3 -m venv "$work/venv"
bin=$work/venv/bin
timeout 900 "$bin/python" -m pip install -q "$root" || fail "pip install . failed"
cd "$work"  # away from the checkout: the installed package is the one imported
"$bin/python" - <<'PY' || fail "the runtime install brought in an extra's package"
import importlib.util, sys
extra = [n for n in ("torch", "timm", "fastapi", "uvicorn", "openai", "matplotlib", "av", "pytest")
         if importlib.util.find_spec(n) is not None]
if extra:
    sys.exit("installed with the runtime: " + " ".join(extra))
print("the runtime: no torch, timm, fastapi, uvicorn, openai, matplotlib, av or pytest")
PY
for tool in generate chat caption convert server benchmark verify; do
  timeout 60 "$bin/fastvlm-$tool" --help >/dev/null || fail "fastvlm-$tool --help failed"
done
echo "--help: every tool"

timeout 300 "$bin/python" -c "from fastvlm_mlx.random_model import write_small_model; write_small_model('small')"
timeout 300 "$bin/fastvlm-convert" --model small --out small-q4 -q 2>/dev/null || fail "fastvlm-convert failed"
timeout 300 "$bin/fastvlm-generate" --model small-q4 --image "$root/examples/images/chelsea.jpg" \
    --max-tokens 4 --json >out.json || fail "fastvlm-generate failed"
"$bin/python" -c "import json; r = json.load(open('out.json')); assert len(r['token_ids']) == 4, r" \
  || fail "fastvlm-generate gave no answer"
echo "convert -q and generate --json: a 4-token answer"

# Each feature that needs an extra: exit 1 (verify: its exit code 3) and one line naming the extra.
expect_one_line() {  # EXTRA COMMAND...
  local extra=$1 rc=0; shift
  timeout 300 "$@" >/dev/null 2>err.txt || rc=$?
  [ "$rc" -ne 0 ] || fail "$* should have failed without the $extra extra"
  [ "$(wc -l <err.txt)" -eq 1 ] || fail "$* printed more than one line: $(cat err.txt)"
  grep -q "^error: .*pip install \"fastvlm-mlx\[$extra\]\"" err.txt || fail "$*: $(cat err.txt)"
  echo "$extra: $(cat err.txt)"
}
expect_one_line server "$bin/fastvlm-server" --model small-q4 --port 0
expect_one_line verify "$bin/fastvlm-verify" --model small --image "$root/examples/images/chelsea.jpg"
expect_one_line plot "$bin/fastvlm-benchmark" --model small-q4 --plot plot.png
expect_one_line video "$bin/fastvlm-generate" --model small-q4 --video "$root/examples/images/chelsea.jpg"
# A missing peer is skipped with one note naming its install line; the benchmark still runs.
timeout 300 "$bin/fastvlm-benchmark" --model small-q4 --compare torch --resolutions 256 --runs 1 \
    --warmup 0 --tokens 2 --quiet >bench.txt 2>err.txt || fail "fastvlm-benchmark failed: $(cat err.txt)"
grep -q '^note: skipping --compare torch .*pip install "fastvlm-mlx\[verify\]"' err.txt \
  || fail "benchmark --compare torch: $(cat err.txt)"
grep -q "^fastvlm-mlx " bench.txt || fail "benchmark printed no result: $(cat bench.txt)"
echo "benchmark --compare torch: $(grep '^note: skipping' err.txt)"
echo "check_runtime_install: ok"
