#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100/H200), in two phases that each fit one
# command's time limit:
#     OUT=/tmp/out BUDGET_S=540 bash bench/gpu_run.sh tests   # the gpu test tier
#     OUT=/tmp/out BUDGET_S=540 bash bench/gpu_run.sh bench   # MFU, profile, LAMB ratio
# Run from the repository root with the wheels the image lacks in .whl/ (bench/gpu_wheels.sh
# builds them). Each step runs under its own limit, cut to what is left of BUDGET_S, most
# important first, so a slow step costs the later ones and never the whole run; a step
# with under 20 s left is skipped and named in $OUT/skipped.log. Every step's output is
# kept in $OUT/<step>.log.
set -uo pipefail
PHASE=${1:-all}
OUT=${OUT:-/tmp/loom_gpu}
BUDGET_S=${BUDGET_S:-540}
END=$((SECONDS + BUDGET_S))
mkdir -p "$OUT" /tmp/site
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 LOOM_CACHE=/tmp/loom_cache
python -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
nvidia-smi -L | tee "$OUT/device.log"

step() {  # name, limit in seconds, command...
    local name=$1 cap=$2 left=$((END - SECONDS))
    shift 2
    if ((left < 20)); then
        echo "$name: skipped, ${left}s of the budget left" | tee -a "$OUT/skipped.log"
        return
    fi
    echo "== $name (limit $((left < cap ? left : cap))s)"
    timeout $((left < cap ? left : cap)) "$@" 2>&1 | grep -v " INFO " | tee "$OUT/$name.log"
}

mfu() {  # name, limit, bench/mfu.py arguments and launch/train.py overrides
    local name=$1 cap=$2
    shift 2
    step "mfu_$name" "$cap" python bench/mfu.py --steps 10 --warmup 3 "$@" precision=bf16 \
        trainer.out_dir="$OUT/mfu_$name"
}

if [[ $PHASE == tests || $PHASE == all ]]; then
    # A hung test is cut at 120 s where pytest-timeout is installed (the image has it).
    per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120")
    step gpu_unit 150 python -m pytest -q -rs -p no:cacheprovider $per_test tests/gpu/test_cuda.py
    step gpu_training 400 python -m pytest -q -rs -p no:cacheprovider $per_test --durations=10 \
        tests/gpu/test_cuda_training.py
fi

if [[ $PHASE == bench || $PHASE == all ]]; then
    mfu gpt3_1.3b 120 --profile 2 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=8 trainer.global_batch_size=8
    mfu bert_large 80 +model=bert_large data.seq_len=512 trainer.micro_batch_size=32 \
        trainer.global_batch_size=32
    mfu t5_large 80 +model=t5_large trainer.micro_batch_size=32 trainer.global_batch_size=32
    mfu glm_large 80 +model=glm_large trainer.micro_batch_size=16 \
        trainer.global_batch_size=16
    step lamb_foreach 40 python bench/lamb_foreach.py --device cuda
    mfu gpt3_1.3b_compile 150 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=8 trainer.global_batch_size=8 parallel.compile=true
    mfu gpt3_1.3b_selective 100 +model=gpt3_1.3b data.seq_len=2048 \
        trainer.micro_batch_size=16 trainer.global_batch_size=16 \
        parallel.activation_checkpointing=selective
    mfu bert_large_sweep 120 --micro-batches 16,64 +model=bert_large data.seq_len=512
    mfu glm_large_sweep 120 --micro-batches 8,32 +model=glm_large
    step moe_layer 40 python bench/moe_layer.py --device cuda --dtype bf16 --repeats 5
fi
