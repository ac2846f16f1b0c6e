#!/usr/bin/env bash
# The GPU checks of docs/speed.md in one run of under 8 minutes on an H200, each stage under its own time limit:
#   1. tests/test_cuda.py: fit (float32, bf16-mixed) with the EMA, grid and FID; resume; sample against the CPU; the
#      guide, a latent model, LoRA; two DDP ranks on the one GPU with sharded FID sampling.
#   2. benchmarks/bench.py: configs/cifar10.yaml (float32, bf16-mixed, + channels_last, + compile) and
#      configs/mnist.yaml (the same without compile) at their batch of 128, ours against diffusers' twin: training
#      and DDIM-50 img/s, peak memory, the training step's share of --peak_tflops (990, an H200's dense bf16 peak).
#   3. benchmarks/loop_speed.py: two minutes of `fit --config configs/cifar10.yaml` on the shipped digits at 32x32 RGB,
#      its steps/s against the bare step's and the host-device synchronizations of a step; benchmarks/ddp_strides.py:
#      what DDP's "Grad strides" warning cost (the attention block before its fix, and now).
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --tiny      # the same stages on the CPU at tiny sizes, to check the script
#   bash benchmarks/gpu_check.sh --fetch-wheels      # here, with a package index: fills benchmarks/wheels/
#
# The GPU machine has torch, lightning, torchmetrics, tensorboard, transformers and peft but no package index: the
# packages it lacks travel as wheels in benchmarks/wheels/ (git-ignored: carry it). Everything lands in OUT_DIR, eight
# files at most: summary.txt (each stage's status and time, and the lines that matter), setup.log, tests.log,
# bench.log, bench.jsonl, loop.log, loop.json, ddp_strides.log. A stage that fails or runs out of time is said so in
# summary.txt and the next one runs. GPU_CHECK_BUDGET (seconds, default 540) bounds the whole run: a late stage gets
# what is left (the fit at least 60 s). While the tests run, the compiled settings of bench.py are compiled once in the
# background, untimed, so that the timed runs find Inductor's cache warm (the tests time nothing).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/wheels

if [ "${1:-}" = "--fetch-wheels" ]; then
    # What the GPU machine lacks, pure-Python wheels all: the versions of constraints.txt where it names them, else
    # those this project's environment holds; --no-deps, so every dependency it lacks is named here too.
    pin() { grep -i "^$1==" constraints.txt || echo "$1==$2"; }
    mkdir -p "$WHEELS"
    exec "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
        "$(pin jsonargparse 4.53.0)" "$(pin docstring-parser 0.18.0)" "$(pin typeshed-client 2.15.0)" \
        "$(pin torch-fidelity 0.4.0)" "$(pin diffusers 0.42.1)" "$(pin importlib-metadata 10.2.0)" \
        "$(pin lazy-importer 0.1.0)" "$(pin torchdata 0.11.0)"
fi

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [--tiny] | --fetch-wheels}
TINY=0
[ "${2:-}" = "--tiny" ] && TINY=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)  # the fit's run folder and the tests' files: not in OUT
BUDGET=${GPU_CHECK_BUDGET:-$([ $TINY = 1 ] && echo 3000 || echo 540)}
SCALE=$([ $TINY = 1 ] && echo 4 || echo 1)  # the CPU is slower: its stages get longer limits
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# Nothing outside the GPU machine can be reached: a download (Inception's weights) fails at once, not after a timeout.
NOWHERE=http://127.0.0.1:9
export HTTPS_PROXY=$NOWHERE https_proxy=$NOWHERE HTTP_PROXY=$NOWHERE http_proxy=$NOWHERE
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# stage NAME LIMIT_SECONDS LOG COMMAND...: runs it under min(LIMIT, what the budget leaves), logs it, notes the outcome.
stage() {
    local name=$1 limit=$(($2 * SCALE)) log=$3
    shift 3
    local budget_left
    budget_left=$(left)
    [ "$budget_left" -lt "$limit" ] && limit=$budget_left
    if [ "$limit" -lt 10 ]; then
        echo "$name: SKIPPED (the budget of ${BUDGET} s is spent)" >> "$SUMMARY"
        return 1
    fi
    local t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*" >> "$log"
    timeout --kill-after=20 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0)) verdict=ok
    [ $rc = 124 ] || [ $rc = 137 ] && verdict="OUT OF TIME"
    [ $rc != 0 ] && [ "$verdict" = ok ] && verdict="FAILED (exit $rc)"
    echo "$name: $verdict in ${took} s (limit ${limit} s)" >> "$SUMMARY"
    return $rc
}

{
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "mode: $([ $TINY = 1 ] && echo 'tiny, on the CPU' || echo 'GPU'); budget ${BUDGET} s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: none"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, '| gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
    echo
} >> "$SUMMARY"

# --- setup: the missing packages from the wheels, the project itself -----------------------------------------------
export PY WHEELS
setup() {
    if ! "$PY" -c "import jsonargparse, docstring_parser, typeshed_client, torch_fidelity, diffusers, torchdata" \
            2>/dev/null; then
        if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
            echo "no wheels in $WHEELS: run --fetch-wheels, and carry the folder"
            return 1
        fi
        "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl || return 1
    fi
    "$PY" -c "import diffusion_lit.cli, diffusers, torch_fidelity, peft, transformers; print('imports: ok')"
}
export -f setup
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # diffusion_lit itself, from the repository
stage setup 90 "$OUT/setup.log" bash -c setup

# --- bench.py's settings: which, and their compilation warmed in the background -----------------------------------
if [ $TINY = 1 ]; then
    BENCH=(--device cpu --quick --peak_tflops 2)
    CIFAR=configs/tiny_cpu.yaml
    MNIST=(--configs configs/mnist_cpu.yaml --settings 32-true bf16-mixed+channels_last)
else
    BENCH=(--device cuda --warmup 2 --repeats 5 --sample_steps 5 --child_timeout 100)
    CIFAR=configs/cifar10.yaml
    MNIST=(--configs configs/mnist.yaml --settings 32-true bf16-mixed bf16-mixed+channels_last)
fi
WARM=()
for network in ours diffusers; do  # one process per network, side by side: bench.py's child mode
    timeout $((200 * SCALE)) "$PY" benchmarks/bench.py "${BENCH[@]}" --config "$CIFAR" --network $network \
        --settings bf16-mixed+channels_last+compile --warmup 1 --repeats 1 --sample_steps 1 \
        > "$WORK/warm_$network.log" 2>&1 &
    WARM+=($!)
done

# --- 1. the CUDA tests --------------------------------------------------------------------------------------------
if [ $TINY = 1 ]; then export DIFFUSION_LIT_TEST_DEVICE=cpu; fi
stage tests 150 "$OUT/tests.log" "$PY" -m pytest -q -rA -p no:cacheprovider --basetemp "$WORK/pytest" \
    --durations=0 tests/test_cuda.py
unset DIFFUSION_LIT_TEST_DEVICE

# --- 2. bench.py: ours against diffusers' twin, once the warm-up compilation is done (nothing else on the device) ---
t0=$(date +%s)
for pid in "${WARM[@]}"; do wait "$pid"; echo -n "compilation warm-up $pid: exit $?; " >> "$SUMMARY"; done
echo "waited $(($(date +%s) - t0)) s after the tests" >> "$SUMMARY"
stage "bench cifar10" 230 "$OUT/bench.log" "$PY" benchmarks/bench.py "${BENCH[@]}" --configs "$CIFAR" \
    --settings ladder --rows_out "$OUT/bench.jsonl"

# --- 3. the whole loop against its step, and what the grad-strides warning cost -------------------------------------
DIGITS=(--data.source ShippedDigits --data.image_size 32 --data.channels 3)
if [ $TINY = 1 ]; then
    SECONDS_FIT=20
    LOOP=(--warmup_steps 5 --bare_steps 5 --sync_debug_steps 2)
    LOOP_DATA=(--data.batch_size 8 --data.num_workers 0 --model.net.init_args.base_channels 32)
    STRIDES=(--device cpu --batch_size 2 --repeats 2)
else
    SECONDS_FIT=120
    LOOP=(--warmup_steps 30 --bare_steps 50 --sync_debug_steps 3)
    LOOP_DATA=()
    STRIDES=(--device cuda)
fi
room=$(($(left) - 60 - 40 - 70))  # what the fit may take: less its setup and end, the strides and bench mnist
[ "$room" -lt "$SECONDS_FIT" ] && SECONDS_FIT=$((room > 60 ? room : 60))
stage loop $((SECONDS_FIT + 60)) "$OUT/loop.log" "$PY" benchmarks/loop_speed.py --config configs/cifar10.yaml \
    --seconds "$SECONDS_FIT" "${LOOP[@]}" --out "$OUT" --workdir "$WORK/loop" -- "${DIGITS[@]}" "${LOOP_DATA[@]}"
stage "ddp strides" 40 "$OUT/ddp_strides.log" "$PY" benchmarks/ddp_strides.py --config configs/cifar10.yaml \
    "${STRIDES[@]}"
stage "bench mnist" 70 "$OUT/bench.log" "$PY" benchmarks/bench.py "${BENCH[@]}" "${MNIST[@]}" \
    --rows_out "$OUT/bench.jsonl"

# --- the lines that matter -----------------------------------------------------------------------------------------
{
    echo
    echo "total: $(($(date +%s) - START)) s"
    echo "-- tests"; grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -20
    echo "-- bench"; grep -E "^(config|[a-z0-9_]+\.yaml)" "$OUT/bench.log" 2>/dev/null
    echo "-- loop"; grep -E "^(bare step|fit:|host-device)" "$OUT/loop.log" 2>/dev/null
    echo "-- ddp strides"; grep -E "^(32-true|bf16-mixed)" "$OUT/ddp_strides.log" 2>/dev/null
} >> "$SUMMARY"
cat "$SUMMARY"
rm -rf "$WORK"
