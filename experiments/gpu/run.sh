#!/usr/bin/env bash
# The prepared check and benchmark of gpt2_jax on one lent GPU (offline there), in one command:
#
#   experiments/gpu/run.sh              # on the GPU machine, from the repository root
#   experiments/gpu/run.sh --dry-run    # here, on the CPU: the same steps at tiny shapes
#
# Steps, each under `timeout`, none started past the whole run's deadline
# (GPU_RUN_BUDGET_S, default 470 s on the GPU: the issue's 8 minutes, less the report):
#   install  the wheels of experiments/gpu/wheels (`make gpu-bundle`) that this Python lacks,
#            then gpt2_jax, with pip --no-index --no-deps (--dry-run: only says what it would)
#   devices  jax's devices, their kind and memory; nvidia-smi
#   tests    pytest -m gpu tests/test_gpu.py (GPT2_JAX_GPU=require; --dry-run: dry-run)
#   bench    experiments/gpu/bench.py: gpt2_jax against Hugging Face PyTorch, same GPU
#   report   experiments/gpu/report.py: $OUT/gpu_results.json and the summary at the log's end
# Optional: GPU_RUN_TESTS (a pytest -k expression), GPU_RUN_BENCH (bench tasks, e.g. train,eval),
# PYTHON (default python3, the image's), GPU_BUNDLE_DIR, GPT2_JAX_COMMIT (recorded).
# Writes $OUT/gpu_results.json and $OUT/gpu_log.txt (OUT defaults to runs/gpu). Exits 1 when a
# GPU test failed, errored or did not run to the end (install or time limit); benchmark errors
# never change the exit code: they are in gpu_results.json (bench.errors, each task's "error").
#
# Through the device tool (the wheels are git-ignored, so they travel only when carried):
#   run(command="experiments/gpu/run.sh", carry=["experiments/gpu/wheels"], timeout_s=540)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *)
        echo "usage: $0 [--dry-run]" >&2
        exit 2
        ;;
esac

OUT=${OUT:-$ROOT/runs/gpu}
PY=${PYTHON:-python3}
BUNDLE=${GPU_BUNDLE_DIR:-$ROOT/experiments/gpu/wheels}
if ((DRY)); then BUDGET=${GPU_RUN_BUDGET_S:-900}; else BUDGET=${GPU_RUN_BUDGET_S:-470}; fi
RESERVE=10 # seconds kept for the report
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpt2_jax_gpu.XXXXXX")
START=$(date +%s)
DEADLINE=$((START + BUDGET))

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" # the tree's code, whatever is installed
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1        # no network there: fail fast, not retry
export GPT2_JAX_CACHE="$WORK/cache"
if ((DRY)); then
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES="" # the CPU, even on a machine with a GPU
    MODE=dry-run
else
    MODE=require
fi

# phase NAME LIMIT_S CMD...: CMD under `timeout`, for at most LIMIT_S and never past the
# deadline; appends {name, rc, seconds, limit_s} to $WORK/phases.jsonl; never stops the script.
LAST_RC=0
phase() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - RESERVE - $(date +%s)))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "==== $name: not run (the run's ${BUDGET} s are spent)"
        echo "{\"name\": \"$name\", \"rc\": 124, \"seconds\": 0, \"limit_s\": $limit, \"note\": \"not run: out of time\"}" >>"$WORK/phases.jsonl"
        LAST_RC=124
        return 0
    fi
    echo "==== $name (limit ${limit} s) at $(date -u +%H:%M:%S), $(($(date +%s) - START)) s in"
    local t0 rc=0
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    ((rc == 124 || rc == 137)) && echo "==== $name: stopped at its limit (${limit} s)"
    echo "==== $name: rc=$rc, $secs s"
    echo "{\"name\": \"$name\", \"rc\": $rc, \"seconds\": $secs, \"limit_s\": $limit}" >>"$WORK/phases.jsonl"
    LAST_RC=$rc
}

main() {
    echo "gpt2_jax GPU check ($MODE) $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET} s, out $OUT"
    local commit=${GPT2_JAX_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
    cat >"$WORK/meta.json" <<EOF
{"mode": "$MODE", "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "commit": "$commit",
 "host": "$(hostname)", "cpus": $(nproc), "python": "$("$PY" -c 'import sys; print(sys.version.split()[0])')",
 "budget_s": $BUDGET}
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit \
            --format=csv | tee "$WORK/nvidia_smi.txt" || true
    fi

    if ((DRY)); then
        phase install 60 "$PY" experiments/gpu/install.py "$BUNDLE" "$WORK/install.json" --dry-run
    else
        phase install 90 "$PY" experiments/gpu/install.py "$BUNDLE" "$WORK/install.json"
    fi
    phase devices 60 "$PY" experiments/gpu/devices.py "$WORK/devices.json" "$MODE"
    local devices_rc=$LAST_RC

    local pick=()
    [[ -n ${GPU_RUN_TESTS:-} ]] && pick=(-k "$GPU_RUN_TESTS") # pytest -k: some tests only
    phase tests 270 env GPT2_JAX_GPU=$MODE "$PY" -m pytest -m gpu tests/test_gpu.py -q -rfEs --tb=short \
        -p no:cacheprovider -o junit_family=legacy --junitxml="$WORK/junit.xml" ${pick[@]+"${pick[@]}"}
    local tests_rc=$LAST_RC

    local bench_args=(--out "$WORK/bench.json" --deadline $((DEADLINE - RESERVE)))
    ((DRY)) && bench_args+=(--dry-run)
    [[ -n ${GPU_RUN_BENCH:-} ]] && bench_args+=(--only "$GPU_RUN_BENCH") # e.g. train,eval
    if ((devices_rc == 0)); then
        phase bench 600 "$PY" experiments/gpu/bench.py "${bench_args[@]}"
    else
        echo "==== bench: not run (the devices step failed)"
        echo '{"error": "not run: the devices step failed (see phases, gpu_log.txt)"}' >"$WORK/bench.json"
    fi

    if ! "$PY" experiments/gpu/report.py "$WORK" "$OUT/gpu_results.json"; then
        echo "report.py failed: a minimal gpu_results.json with the phases only"
        { echo '{"report_error": "report.py failed", "phases": ['; paste -sd, "$WORK/phases.jsonl"; echo ']}'; } >"$OUT/gpu_results.json"
    fi
    echo "total $(($(date +%s) - START)) s; tests rc=$tests_rc"
    rm -rf "$WORK"
    if ((tests_rc != 0)); then
        echo "FAILED: the GPU tests did not all pass (gpu_results.json: tests)"
        return 1
    fi
}

main 2>&1 | tee "$OUT/gpu_log.txt"
