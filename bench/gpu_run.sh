#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100/H200): the gpu test tier, then the MFU
# benchmarks of the four families with a profile of the first, each writing under $OUT.
# Run from the repository root, with the wheels Loom must carry in .whl/ (hydra-core,
# omegaconf and a locally built antlr4-python3-runtime 4.9.3 wheel):
#     OUT=/tmp/out bash bench/gpu_run.sh
# Every step has its own time limit, so a slow one cannot use up the machine.
set -uo pipefail
OUT=${OUT:-/tmp/loom_gpu}
mkdir -p "$OUT" /tmp/site
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 LOOM_CACHE=/tmp/loom_cache
python -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
nvidia-smi -L | tee "$OUT/device.log"

timeout 240 python -m pytest -q -rs -m gpu --timeout 120 -p no:cacheprovider tests/gpu \
    2>&1 | tee "$OUT/gpu_tests.log"

mfu() {  # name, then launch/train.py overrides
    local name=$1
    shift
    timeout 150 python bench/mfu.py --steps 10 --warmup 3 "$@" precision=bf16 \
        trainer.out_dir="$OUT/mfu_$name" 2>&1 | grep -v INFO | tee "$OUT/mfu_$name.log"
}
mfu gpt3_1.3b --profile 2 +model=gpt3_1.3b data.seq_len=2048 trainer.micro_batch_size=8 \
    trainer.global_batch_size=8
mfu gpt3_1.3b_compile +model=gpt3_1.3b data.seq_len=2048 trainer.micro_batch_size=8 \
    trainer.global_batch_size=8 parallel.compile=true
mfu gpt3_1.3b_selective +model=gpt3_1.3b data.seq_len=2048 trainer.micro_batch_size=16 \
    trainer.global_batch_size=16 parallel.activation_checkpointing=selective
mfu bert_large --micro-batches 16,32 +model=bert_large data.seq_len=512
mfu t5_large --micro-batches 16,32 +model=t5_large
mfu glm_large --micro-batches 8,16 +model=glm_large
