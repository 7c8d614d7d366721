#!/usr/bin/env bash
# GPU check (issue 10): on a CUDA machine, in under 8 minutes, set up what is missing, run the
# gpu-marked tests and the kernel and engine benchmarks, and write JSON under one folder.
# Without a GPU it says "no GPU" and exits 0 (CI runs that case). See bench/README.md
# "GPU check".
#
#   bash bench/gpu_check.sh [--out DIR] [--budget-s N] [--only PART,...] [--dry-run]
#   bash bench/gpu_check.sh --prepare-wheels     # where PyPI is reachable, for offline GPUs
#
# Environment: OUT (results folder; default bench/results/gpu), PYTHON (interpreter to try
# first), GPU_CHECK_WHEELS (wheelhouse; default .gpu-wheels), GPU_CHECK_STATE (side folder;
# default /tmp/scission-gpu-check), GPU_CHECK_OFFLINE=1 (never try the package index).
#
# Parts, each with its own timeout (seconds, cut to what is left of --budget-s):
#   setup            scission importable from this checkout (symlink shim, nothing built) and
#                    missing packages added to a side folder (never the env holding torch)
#   tests_kernels    tests/kernels/ compiled on CUDA (gpu-marked ones included) vs float64
#   tests_engine     tests/engine/test_engine_cuda.py: Triton vs torch backend tokens, HF,
#                    CUDA graphs vs eager
#   bench_kernels    python -m scission.bench.kernels --quick (Triton vs SDPA, ...)
#   bench_engine     python -m scission.bench.engine_gpu: decode tok/s b1/8/32/128, graphs
#                    on/off
#   bench_flashinfer the decode cases again with FlashInfer, when it imports
# Exit status: 0 when no part failed (skipped parts do not fail), else 1.
set -uo pipefail
CALLER_PWD=$PWD
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)

PARTS="setup:30 tests_kernels:100 tests_engine:100 bench_kernels:70 bench_engine:130 bench_flashinfer:40"
BUDGET_S=470
OUT_DIR=${OUT:-}
ONLY=""
DRY_RUN=0
PREPARE=0
STATE=${GPU_CHECK_STATE:-${TMPDIR:-/tmp}/scission-gpu-check}
WHEELS=${GPU_CHECK_WHEELS:-$REPO/.gpu-wheels}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR=$2; shift 2 ;;
    --budget-s) BUDGET_S=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --prepare-wheels) PREPARE=1; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$OUT_DIR" in "" | /*) ;; *) OUT_DIR="$CALLER_PWD/$OUT_DIR" ;; esac  # as the caller meant
case "$WHEELS" in /*) ;; *) WHEELS="$CALLER_PWD/$WHEELS" ;; esac

selected() {  # selected PART: the part is in --only (or there is no --only)
  [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]
}

if [ "$DRY_RUN" = 1 ]; then
  total=0
  for p in $PARTS; do
    if selected "${p%%:*}"; then
      echo "part ${p%%:*} timeout ${p##*:}s"
      total=$((total + ${p##*:}))
    fi
  done
  echo "total timeouts ${total}s, budget ${BUDGET_S}s"
  exit 0
fi

if [ "$PREPARE" = 1 ]; then
  mkdir -p "$WHEELS"
  if git rev-parse --git-dir >/dev/null 2>&1; then  # keep the wheels out of commits
    exclude="$(git rev-parse --git-dir)/info/exclude"
    grep -qx "/.gpu-wheels/" "$exclude" 2>/dev/null || echo "/.gpu-wheels/" >>"$exclude"
  fi
  exec "${PYTHON:-python3}" bench/gpu_setup.py prepare-wheels --wheels "$WHEELS"
fi

# -- is there a GPU, and which Python's torch sees it? ------------------------------------
cuda_python() {  # prints the first interpreter whose torch sees a CUDA device
  # GPU_CHECK_FAKE_GPU=1 takes any torch: runs the script's flow on a CPU (tests of the script).
  local want='torch.cuda.is_available()'
  [ "${GPU_CHECK_FAKE_GPU:-0}" = 1 ] && want=True
  for c in "${PYTHON:-}" python3 "$REPO/.venv/bin/python" python; do
    if [ -z "$c" ] || ! command -v "$c" >/dev/null 2>&1; then continue; fi
    if "$c" -c "import sys, torch; sys.exit(0 if $want else 1)" >/dev/null 2>&1; then
      command -v "$c"
      return 0
    fi
  done
  return 1
}

driver_sees_gpu() {  # the driver lists a GPU and CUDA_VISIBLE_DEVICES does not hide it
  case "${CUDA_VISIBLE_DEVICES-unset}" in "" | "-1") return 1 ;; esac
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU "
}

export PYTHONPATH="$STATE/shim:$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
PY=$(cuda_python)
TORCH_NOTE=""
if [ -z "$PY" ] && driver_sees_gpu; then
  # A GPU but no torch that sees it: one try at the index's (CUDA) torch, into a side folder.
  echo "gpu_check: the driver lists a GPU but no Python's torch sees it; trying pip install torch"
  mkdir -p "$STATE/torch"
  if timeout 300 python3 -m pip install -q --target "$STATE/torch" torch; then
    export PYTHONPATH="$STATE/torch:$PYTHONPATH"
    PY=$(cuda_python)
  fi
  [ -z "$PY" ] && TORCH_NOTE="a GPU is listed by nvidia-smi but no CUDA torch could be found or installed"
fi
if [ -z "$PY" ] && [ -z "$TORCH_NOTE" ]; then
  echo "gpu_check: no GPU (no CUDA device visible to torch, none listed by nvidia-smi): nothing to check"
  if [ -n "$OUT_DIR" ]; then
    mkdir -p "$OUT_DIR"
    printf '{"gpu": false, "note": "no GPU", "parts": []}\n' >"$OUT_DIR/summary.json"
  fi
  exit 0
fi

# -- from here on there is a GPU ------------------------------------------------------------
OUT_DIR=${OUT_DIR:-$REPO/bench/results/gpu}
mkdir -p "$OUT_DIR" "$STATE/run" "$STATE/shim" "$STATE/site"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# Every part runs from $STATE/run: from the repo root, `python -m` would import the bare
# scission/ folder (no subpackages) before the shim on PYTHONPATH (see bench/gpu_setup.py).
cd "$STATE/run" || exit 1
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU-only machines
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
echo "gpu_check: $(date -u +%FT%TZ) python=${PY:-none} out=$OUT_DIR budget=${BUDGET_S}s"
command -v nvidia-smi >/dev/null && nvidia-smi -L

START_S=$SECONDS
RESULTS=()
FAILED=0

run_part() {  # run_part NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 left rc t0
  shift 2
  left=$((BUDGET_S - (SECONDS - START_S)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 10 ]; then
    RESULTS+=("$name|skipped|0|budget spent")
    return
  fi
  echo "=== $name (timeout ${limit}s) $*"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  rc=$?
  local took=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    RESULTS+=("$name|passed|$took|")
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    RESULTS+=("$name|failed|$took|timed out after ${limit}s")
    FAILED=1
  else
    RESULTS+=("$name|failed|$took|exit status $rc")
    FAILED=1
  fi
  echo "=== $name: $(cut -d'|' -f2 <<<"${RESULTS[-1]}") after ${took}s"
}

skip_part() {  # skip_part NAME WHY
  RESULTS+=("$1|skipped|0|$2")
  echo "=== $1: skipped ($2)"
}

part_limit() {  # part_limit NAME: its timeout from PARTS
  for p in $PARTS; do [ "${p%%:*}" = "$1" ] && echo "${p##*:}"; done
}

pytest_args() {  # -n 4 when pytest-xdist is there (Triton compiles in parallel processes)
  if "$PY" -c 'import xdist' >/dev/null 2>&1; then echo "-n 4"; fi
}

SETUP_OK=0
if [ -n "$TORCH_NOTE" ]; then
  RESULTS+=("setup|failed|0|$TORCH_NOTE")
  FAILED=1
else  # setup always runs, --only or not: the other parts need it
  offline=()
  [ "${GPU_CHECK_OFFLINE:-0}" = 1 ] && offline=(--offline)
  run_part setup "$(part_limit setup)" "$PY" "$REPO/bench/gpu_setup.py" setup --state "$STATE" \
    --wheels "$WHEELS" --report "$OUT_DIR/setup.json" "${offline[@]}"
  [ "${RESULTS[-1]}" != "${RESULTS[-1]#setup|passed}" ] && SETUP_OK=1
fi

for part in tests_kernels tests_engine bench_kernels bench_engine bench_flashinfer; do
  selected "$part" || continue
  if [ "$SETUP_OK" != 1 ]; then skip_part "$part" "setup failed"; continue; fi
  limit=$(part_limit "$part")
  case "$part" in
    tests_kernels)
      # shellcheck disable=SC2046  # pytest_args is empty or "-n 4"
      run_part "$part" "$limit" "$PY" -m pytest -q -rs -p no:cacheprovider $(pytest_args) \
        "$REPO/tests/kernels" --junitxml="$OUT_DIR/tests_kernels.xml" ;;
    tests_engine)
      run_part "$part" "$limit" "$PY" -m pytest -v -rs -p no:cacheprovider \
        "$REPO/tests/engine/test_engine_cuda.py" --junitxml="$OUT_DIR/tests_engine.xml" ;;
    bench_kernels)
      run_part "$part" "$limit" "$PY" -m scission.bench.kernels --quick --flashinfer off \
        --out "$OUT_DIR/kernels.json" ;;
    bench_engine)
      run_part "$part" "$limit" "$PY" -m scission.bench.engine_gpu \
        --time-budget-s $((limit * 3 / 4)) --synthetic-dir "$STATE/smollm2-135m" \
        --output "$OUT_DIR/engine.json" ;;
    bench_flashinfer)
      if "$PY" -c 'import flashinfer' >/dev/null 2>&1; then
        run_part "$part" "$limit" "$PY" -m scission.bench.kernels --quick \
          --kernels decode_attention --impls triton flashinfer \
          --out "$OUT_DIR/kernels_flashinfer.json"
      else
        skip_part "$part" "flashinfer not importable (not installable here)"
      fi ;;
  esac
done

# -- summary ---------------------------------------------------------------------------------
echo
echo "gpu_check summary ($((SECONDS - START_S))s of ${BUDGET_S}s; results in $OUT_DIR)"
printf '  %-17s %-8s %6s  %s\n' part status seconds note
json_parts=""
for r in "${RESULTS[@]}"; do
  IFS='|' read -r name status took note <<<"$r"
  printf '  %-17s %-8s %6s  %s\n' "$name" "$status" "$took" "$note"
  note=${note//\"/\'}
  json_parts+="${json_parts:+, }{\"part\": \"$name\", \"status\": \"$status\", \"seconds\": $took, \"note\": \"$note\"}"
done
printf '{"gpu": true, "python": "%s", "total_s": %d, "budget_s": %d, "parts": [%s]}\n' \
  "$PY" "$((SECONDS - START_S))" "$BUDGET_S" "$json_parts" >"$OUT_DIR/summary.json"
exec 1>&- 2>&-  # let tee drain into the log before the folder is collected
wait "$TEE_PID" 2>/dev/null
exit "$FAILED"
