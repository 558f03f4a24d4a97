#!/usr/bin/env bash
# The one prepared GPU check: compiled kernel tests, kernel_bench at SmolLM2 and Qwen2.5-7B
# shapes, model_bench (engine tokens/s, bf16, random weights) and the round benchmark
# (prefix / per-request cacheblend / tokendance at 8, 16, 32 agents, random weights).
#
#   bash benchmarks/gpu_check.sh --out DIR [--quick]
#
# Writes into DIR: gpu_check.json (every stage's result, the issue's targets and whether
# the tuning table may set kernel_faster), kernel_smollm2.png, kernel_qwen7b.png,
# model.png, rounds.png (where matplotlib is installed) and gpu_check.log: 6 files. Each
# stage has a time limit (455 s in all, < 8 min on an H100 / H200 with the start-up) and a
# softer budget inside it; the benchmarks write their JSON after every point, so a stage
# that fails or runs out keeps what it measured, and the rest go on.
# --quick: tiny shapes, one point per stage, for CPU and CI (~1 min).
# Needs no model wheel: jax, numpy, pytest (GPU), tqdm; matplotlib optional.
set -uo pipefail

OUT="" QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "usage: bash benchmarks/gpu_check.sh --out DIR [--quick]" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: bash benchmarks/gpu_check.sh --out DIR [--quick]" >&2; exit 2; }
REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
: >"$LOG"
cd "$REPO" || exit 1
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/tokendance_jax_cache}"

# The package maps kernels/ to tokendance_jax.kernels, so it must be installed (editable,
# no dependencies, no network); failing that, a symlink tree on PYTHONPATH stands in.
if ! "$PY" -c "import tokendance_jax.kernels" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 \
      || ! "$PY" -c "import tokendance_jax.kernels" >/dev/null 2>&1; then
    mkdir -p "$WORK/site/tokendance_jax"
    ln -s "$REPO"/tokendance_jax/* "$WORK/site/tokendance_jax/"
    ln -s "$REPO/kernels" "$WORK/site/tokendance_jax/kernels"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed as a symlink tree on PYTHONPATH" >>"$LOG"
  fi
fi
BACKEND="$("$PY" -c "import jax; print(jax.default_backend())" 2>>"$LOG")"
echo "backend: $BACKEND, quick: $QUICK" | tee -a "$LOG"

# stage NAME SECONDS CMD...: run with a time limit, append its output to the log.
stage() {
  local name="$1" limit="$2" t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$WORK/stages.tsv"
  echo "   rc=$rc after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

BENCH="$PY benchmarks"
QUICK_LIMIT=300  # --quick stages take 10-50 s on 2 idle cores; the limit only guards a hang
if [ "$BACKEND" = gpu ]; then
  # From $WORK, so the source folder tokendance_jax/ (no kernels/ inside) cannot shadow
  # the installed package on sys.path.
  (cd "$WORK" && stage tests 70 "$PY" -m pytest -q -m gpu "$REPO/tests/test_kernels.py" \
    -p no:cacheprovider --junitxml="$WORK/tests.xml")
else
  printf 'tests\tskipped\t0\n' >>"$WORK/stages.tsv"
fi
if [ "$QUICK" = 1 ]; then
  stage kernel_tiny "$QUICK_LIMIT" $BENCH/kernel_bench.py --smoke --shapes tiny --repeats 2 \
    --json "$WORK/kernel_tiny.json" --plot "$OUT/kernel_tiny.png"
  stage model "$QUICK_LIMIT" $BENCH/model_bench.py --model tiny --cases smoke --repeats 2 \
    --json "$WORK/model.json" --plot "$OUT/model.png"
  stage rounds "$QUICK_LIMIT" $BENCH/round_gpu_bench.py --models tiny --agents 2 --rounds 1 --single-pass \
    --out-tokens 4 --prompt-scale 0.1 --json "$WORK/rounds.json" --plot "$OUT/rounds.png"
else
  stage kernel_smollm2 65 $BENCH/kernel_bench.py --shapes smollm2 --variants --budget-s 45 \
    --json "$WORK/kernel_smollm2.json" --plot "$OUT/kernel_smollm2.png"
  stage kernel_qwen7b 75 $BENCH/kernel_bench.py --shapes qwen7b --variants --budget-s 55 \
    --json "$WORK/kernel_qwen7b.json" --plot "$OUT/kernel_qwen7b.png"
  stage model 65 $BENCH/model_bench.py --model smollm2 --dtype bfloat16 --cases gpu \
    --attn reference pallas chunked --budget-s 45 --json "$WORK/model.json" \
    --plot "$OUT/model.png"
  stage rounds 120 $BENCH/round_gpu_bench.py --models qwen7b smollm2 --agents 16 32 8 \
    --budget-s 90 --json "$WORK/rounds.json" --plot "$OUT/rounds.png"
  # The paper's point (7B shapes, 16 agents) again with the kernels as the attention.
  stage rounds_kernel 60 $BENCH/round_gpu_bench.py --models qwen7b --agents 16 \
    --methods tokendance cacheblend --attn pallas --budget-s 30 \
    --json "$WORK/rounds_kernel.json"
fi
"$PY" benchmarks/gpu_check_report.py "$WORK" "$OUT/gpu_check.json" --quick "$QUICK" \
  2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
