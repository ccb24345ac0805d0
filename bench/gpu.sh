#!/usr/bin/env bash
# One command on a machine with a CUDA GPU (issue 7 item 8):
#   1. the kernel tests, compiled (the INTERPRET = False classes run on the GPU), and the sm_90a compile
#      figures of every kernel configuration (tests/test_compile_h100.py -> sm90.json);
#   2. the ragged kernel benchmark (bench/ragged_kernel.py) at the 0.6B and 8B attention shapes;
#   3. the decode benchmark (bench/decode.py) at 0.6B and 8B, bfloat16;
#   4. the pruning replay (bench/pruning.py) at 0.6B and 8B, bfloat16;
# then appends a section with every table, the machine and the exact commands to bench/RESULTS.md.
#
#   bash bench/gpu.sh                 # everything (expect ~1 h on an H100, most of it 8B pruning)
#   QUICK=1 bash bench/gpu.sh         # smaller grids: a smoke run of every step (~10 min)
#   OUT=dir PYTHON=python3 bash bench/gpu.sh
#
# Install first: pip install -e '.[test,cuda12]' (jax with CUDA; torch with CUDA for the transformers row).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-bench/out/gpu-$STAMP}
QUICK=${QUICK:-0}

die() { echo "gpu.sh: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this script needs a machine with a CUDA GPU"
nvidia-smi -L >/dev/null 2>&1 || die "nvidia-smi sees no GPU (driver not loaded?)"
# conftest.py defaults JAX_PLATFORMS to cpu; here the GPU must be used, and must be found.
export JAX_PLATFORMS=cuda
"$PY" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 1)" \
  || die "jax sees no GPU backend: pip install -e '.[test,cuda12]'"

mkdir -p "$OUT"
CMDS="$OUT/commands.txt"
: > "$CMDS"
FAILED=()
# run NAME CMD...: print and record the command, keep its output in $OUT/NAME.log, go on after a failure
# (one broken step must not cost the others' figures), and report failures at the end.
run() {
  local name=$1; shift
  echo "+ $*" | tee -a "$CMDS"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then
    echo "gpu.sh: step '$name' FAILED (log: $OUT/$name.log)" >&2
    FAILED+=("$name")
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.csv"

# 1. kernels compiled on the GPU, plus the sm_90a figures
run kernel_tests env TIMJAX_SM90_REPORT="$OUT/sm90.json" "$PY" -m pytest -q -rs \
  tests/test_kernels.py tests/test_kernels_ragged.py tests/test_compile_h100.py

if [ "$QUICK" = 1 ]; then
  BATCH="1 8"; STEPS=16; PROMPT=256; REPEATS=1; PRUNE_BATCH="1 8"; PRUNE_BUF="off 0 2"
else
  BATCH="1 8 32"; STEPS=64; PROMPT=1024; REPEATS=3; PRUNE_BATCH="1 8 16"; PRUNE_BUF="off 0 1 2"
fi

for shape in 0.6b 8b; do
  # 2. ragged kernel vs the padded decode/extend kernels vs the XLA reference (one layer)
  run "ragged_$shape" "$PY" bench/ragged_kernel.py --shape "$shape" --dtype bfloat16 --repeats "$REPEATS" \
    --json "$OUT/ragged_$shape.json"
  # 3. decode throughput (pallas, xla, decode_loop, engine, kernels, transformers)
  # shellcheck disable=SC2086
  run "decode_$shape" "$PY" bench/decode.py --shape "$shape" --dtype bfloat16 --batch $BATCH \
    --prompt-len "$PROMPT" --steps "$STEPS" --repeats "$REPEATS" --json "$OUT/decode_$shape.json"
  # 4. pruning replay on long traces (flags as of this commit; see bench/pruning.py --help)
  # shellcheck disable=SC2086
  run "pruning_$shape" "$PY" bench/pruning.py --shape "$shape" --dtype bfloat16 --depth 5 --breadth 3 --words 12 \
    --batch $PRUNE_BATCH --buffers $PRUNE_BUF --batched-buffers $PRUNE_BUF --page-sizes 16 \
    --modes reencode shift --repeats "$REPEATS" --json "$OUT/pruning_$shape.json"
done

run report "$PY" bench/gpu_report.py --out "$OUT" --results bench/RESULTS.md

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu.sh: failed steps: ${FAILED[*]} (logs in $OUT)" >&2
  exit 1
fi
echo "gpu.sh: done; JSON and logs in $OUT, section appended to bench/RESULTS.md"
