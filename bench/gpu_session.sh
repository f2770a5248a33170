#!/usr/bin/env bash
# Every check that needs a GPU, for a session that is lent one. Runs on the GPU machine's own
# Python (CUDA torch and triton already installed; nothing is fetched), from the repository root:
#
#   bash bench/gpu_session.sh quick [TOOLS]  # first, in one device command of < 8 minutes: the
#                                        # GPU tests, one short `make bench` pass over the four
#                                        # workloads, host_launch.py --mode real (TOOLS: a copy of
#                                        # ../shared/tools in the checkout, default .shared-tools)
#   bash bench/gpu_session.sh tests      # the whole suite on the GPU (tests/test_gpu*.py included)
#   bash bench/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck over the GPU tests
#   bash bench/gpu_session.sh bench      # make bench, demo, GAE, host overhead, microbenchmarks
#
# Each step stays well under ten minutes and writes its log to $RESULTS (default bench/results/),
# next to the tables bench/ writes there; commit them with the command above. With the device
# tool, everything under bench/results/ is also copied to $OUT/results/ at the end:
#   mkdir -p .shared-tools && cp ../shared/tools/* .shared-tools/   (here; carry .shared-tools)
#   bash bench/gpu_session.sh quick                                  (there)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET ROLLOUT_BUFFERS_BACKEND

if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
    # No registry there and perhaps an older setuptools: import the checkout in place instead
    # (kernels/ is the package rollout_buffers.kernels; a git-ignored link makes it one).
    [ -e rollout_buffers/kernels ] || ln -s ../kernels rollout_buffers/kernels
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    echo "pip install -e . failed: importing rollout_buffers from $PWD (rollout_buffers/kernels -> ../kernels)"
fi
gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))" 2>/dev/null) || {
    echo "no CUDA device visible to $PY"; exit 1; }
versions() {
    echo "# $(date -u +%F\ %T) UTC: bash bench/gpu_session.sh $1"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

TOOLS=.shared-tools
steps=()
for a in "${@:-tests}"; do
    if [ -d "$a" ]; then TOOLS=$a; else steps+=("$a"); fi
done

status=0
for step in "${steps[@]}"; do
    log="$RESULTS/gpu-$step-$gpu.log"
    {
        versions "$step"
        case "$step" in
            quick)
                # Each part bounded, so that the whole stays under 8 minutes on an H200.
                timeout 180 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider \
                    tests/test_gpu.py tests/test_gpu_large.py tests/test_memory.py \
                    tests/test_distributed.py tests/test_sequences.py tests/test_api.py
                t=$?
                # The four workloads this budget was set for (the default list also has
                # protomotions_amp, run by the bench step).
                timeout 210 "$PY" bench/run.py --repeats 5 --warmup 1 \
                    --workloads locomotion,humanoid,humanoid_large,many_small
                b=$?
                if [ -f "$TOOLS/host_launch.py" ]; then
                    timeout 60 "$PY" "$TOOLS/host_launch.py" --mode real --quick \
                        | tee "$RESULTS/host_launch-real-$gpu.md"
                    h=${PIPESTATUS[0]}
                else
                    echo "no $TOOLS/host_launch.py: copy ../shared/tools there (and carry it)"; h=1
                fi
                echo "# quick: tests exit $t, bench exit $b, host_launch exit $h"
                [ $t -eq 0 ] && [ $b -eq 0 ] && [ $h -eq 0 ] ;;
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
                echo "unknown step '$step': quick, tests, sanitize or bench"; false ;;
        esac
        echo "# exit status: $?"
    } 2>&1 | tee "$log"
    [ "${PIPESTATUS[0]}" -eq 0 ] && grep -q "^# exit status: 0$" "$log" || status=1
done
# With the device tool only what lands under $OUT comes back: the logs and every table.
if [ -n "${OUT:-}" ] && [ "$RESULTS" != "$OUT" ]; then
    mkdir -p "$OUT/results" && cp -r bench/results/. "$OUT/results/"
fi
exit $status
