#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100/H200), in two phases that each fit one
# command's time limit, the second issued as soon as the first returns:
#     OUT=/tmp/out BUDGET_S=400 bash bench/gpu_run.sh tests   # the gpu test tier
#     OUT=/tmp/out BUDGET_S=300 bash bench/gpu_run.sh bench   # MFU, profile, ratios
# Run from the repository root with the wheels the image lacks in .whl/ (bench/gpu_wheels.sh
# builds them). Each step runs under its own limit, cut to what is left of BUDGET_S, most
# important first, so a slow step costs the later ones and never the whole run; a step
# with under 20 s left is skipped and named in the log. What comes back is a handful of
# files in $OUT: device.log, <phase>.log (every step's output in turn) and, for bench,
# mfu.jsonl (one JSON line per measured job).
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-/tmp/loom_gpu}
BUDGET_S=${BUDGET_S:-540}
END=$((SECONDS + BUDGET_S))
LOG=$OUT/$PHASE.log
mkdir -p "$OUT" /tmp/site
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
export LOOM_CACHE=/tmp/loom_cache LOOM_TEST_CACHE=/tmp/loom_cache
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python3 -m pip install --quiet --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl ||
    { echo "the wheels in .whl/ did not install (run bench/gpu_wheels.sh, carry .whl)"; exit 1; }
nvidia-smi -L | tee "$OUT/device.log"

step() {  # name, limit in seconds, command...
    local name=$1 cap=$2 left=$((END - SECONDS))
    shift 2
    if ((left < 20)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
        return
    fi
    local limit=$((left < cap ? left : cap))
    echo "== $name (limit ${limit}s)" | tee -a "$LOG"
    # SIGINT first: pytest then still prints its failures and summary.
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v " INFO " | tee -a "$LOG"
}

mfu() {  # name, limit, bench/mfu.py arguments and launch/train.py overrides
    local name=$1 cap=$2
    shift 2
    rm -rf "/tmp/mfu/$name"  # a warm machine keeps an earlier run's results
    step "mfu_$name" "$cap" python3 bench/mfu.py --steps 10 --warmup 3 "$@" precision=bf16 \
        trainer.out_dir="/tmp/mfu/$name"
    cat "/tmp/mfu/$name/mfu.jsonl" >>"$OUT/mfu.jsonl" 2>/dev/null
}

if [[ $PHASE == tests || $PHASE == all ]]; then
    # A hung test is cut at 120 s where pytest-timeout is installed (the image has it).
    per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
    pytest=(python3 -m pytest -q -rfEs -p no:cacheprovider $per_test)
    step gpu_unit 120 "${pytest[@]}" tests/gpu/test_cuda.py
    step gpu_training 380 "${pytest[@]}" --durations=10 tests/gpu/test_cuda_training.py
fi

if [[ $PHASE == bench || $PHASE == all ]]; then
    mfu gpt3_1.3b 90 --profile 2 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=8 trainer.global_batch_size=8
    mfu bert_large 60 +model=bert_large data.seq_len=512 trainer.micro_batch_size=32 \
        trainer.global_batch_size=32
    mfu t5_large 60 +model=t5_large trainer.micro_batch_size=32 trainer.global_batch_size=32
    mfu glm_large 60 +model=glm_large trainer.micro_batch_size=16 \
        trainer.global_batch_size=16
    # fp32: the bare loop has no autocast.
    step step_overhead 40 python3 bench/step_overhead.py --device cuda --steps 20 --repeats 3
    step lamb_foreach 30 python3 bench/lamb_foreach.py --device cuda
    mfu gpt3_1.3b_compile 150 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=8 trainer.global_batch_size=8 parallel.compile=true
    mfu gpt3_1.3b_selective 100 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=12 trainer.global_batch_size=12 \
        parallel.activation_checkpointing=selective
    mfu bert_large_sweep 120 --micro-batches 16,64 +model=bert_large data.seq_len=512
    mfu glm_large_sweep 120 --micro-batches 8,32 +model=glm_large
    step moe_layer 40 python3 bench/moe_layer.py --device cuda --dtype bf16 --repeats 5
fi
