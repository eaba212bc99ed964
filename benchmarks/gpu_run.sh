#!/usr/bin/env bash
# On the GPU machine, from the project root: GPU tests, then the GPU benchmark.
# Compiled flashinfer kernels come back in $OUT/fi-jit.tgz; unpack into .fi-jit/ to reuse them.
# To measure exactly what is committed while the work tree is busy, export HEAD first
# (`git archive HEAD | tar x -C .gpu-src`, link .whl and .fi-jit into it), carry .gpu-src and
# run this script from inside it.
set -o pipefail
source .whl/install.sh || exit 1
export PYTHONPATH="$PWD/engine:$PWD/plugins:$PYTHONPATH"
mkdir -p .fi-jit
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 | grep -v Warning | tail -60 | tee "$OUT/bench.log"
tar czf "$OUT/fi-jit.tgz" --exclude='*.o' --exclude='*.ninja*' -C .fi-jit . 2>/dev/null
ls -la "$OUT"
