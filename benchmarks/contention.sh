#!/usr/bin/env bash
# The tiny --perf's decode latency on a quiet machine and beside a CPU-bound neighbour (normal priority), with
# the OpenMP settings that matter: libgomp's default spin-waiting, OMP_WAIT_POLICY=PASSIVE, one thread.
# A first probe for the issue "CPU under contention"; run from the repository root: bash benchmarks/contention.sh
set -u
PY=${PY:-.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${neighbour:-}" ] && kill "$neighbour" 2>/dev/null' EXIT
run() {  # label, then environment assignments
  local label=$1; shift
  local figure
  figure=$(cd "$work" && env "$@" "$OLDPWD/$PY" -m vllm_utils.benchmark_vision_language --perf --input-len 100 \
           --output-len 64 --num-prompts 1 2>/dev/null | grep -o '"decode_latency_per_token": "[0-9.]* ms"')
  figure=${figure#*: }
  echo "| $label | ${figure//\"/} |"
}
echo "| case | decode latency per token |"
echo "|---|---|"
run "quiet" X=1
run "quiet, OMP_WAIT_POLICY=PASSIVE" OMP_WAIT_POLICY=PASSIVE
"$PY" -c "while True: pass" & neighbour=$!
sleep 1
run "neighbour" X=1
run "neighbour, OMP_WAIT_POLICY=PASSIVE" OMP_WAIT_POLICY=PASSIVE
run "neighbour, OMP_NUM_THREADS=1" OMP_NUM_THREADS=1
