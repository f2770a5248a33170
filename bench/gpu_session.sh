#!/usr/bin/env bash
# Every check that needs a GPU, for a session that is lent one. Runs on the GPU machine's own
# Python (CUDA torch and triton already installed; nothing is fetched), from the repository root:
#
#   bash bench/gpu_session.sh tests      # the whole suite on the GPU (tests/test_gpu*.py included)
#   bash bench/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck over the GPU tests
#   bash bench/gpu_session.sh bench      # make bench, demo, GAE, host overhead, microbenchmarks
#
# Each step stays well under ten minutes and writes its log to $RESULTS (default bench/results/),
# next to the tables bench/ writes there; commit them with the command above. With the device
# tool, copy them to $OUT as well: RESULTS=$OUT bash bench/gpu_session.sh tests
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET ROLLOUT_BUFFERS_BACKEND

"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null) || {
    echo "no CUDA device visible to $PY"; exit 1; }
versions() {
    echo "# $(date -u +%F\ %T) UTC: bash bench/gpu_session.sh $1"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

status=0
for step in "${@:-tests}"; do
    log="$RESULTS/gpu-$step-$gpu.log"
    {
        versions "$step"
        case "$step" in
            tests)
                "$PY" -m pytest -q -rs tests/ ;;
            sanitize)
                # Small shapes first: the sanitizers slow kernels down by orders of magnitude.
                compute-sanitizer --tool memcheck --error-exitcode 9 \
                    "$PY" -m pytest -q -x tests/test_gpu.py -k "not workload_sizes" &&
                compute-sanitizer --tool racecheck --error-exitcode 9 \
                    "$PY" -m pytest -q -x tests/test_gpu.py -k "not workload_sizes" ;;
            bench)
                "$PY" bench/run.py && "$PY" bench/demo.py && "$PY" bench/bench_gae.py &&
                "$PY" bench/host_overhead.py && "$PY" -m pytest -q bench/ --benchmark-only ;;
            *)
                echo "unknown step '$step': tests, sanitize or bench"; false ;;
        esac
        echo "# exit status: $?"
    } 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] && grep -q "^# exit status: 0$" "$log" || status=1
done
exit $status
