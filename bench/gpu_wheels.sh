#!/usr/bin/env bash
# Fills .whl/ (untracked: .git/info/exclude lists it) with the wheels bench/gpu_run.sh
# installs on a lent GPU machine, whose image (Python 3.12, torch preinstalled) reaches no
# package index: Hydra and OmegaConf (the versions the tests run with), and
# antlr4-python3-runtime 4.9.3, OmegaConf's pin, which the index has only as a source
# archive, so it is built here (pure Python).
# DeepSpeed is left out: the gpu tests that need it skip without it.
#     bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1
python3 -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
