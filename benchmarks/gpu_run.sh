#!/usr/bin/env bash
# On the GPU machine, from the project root: GPU tests, then the GPU benchmark.
# Compiled flashinfer kernels come back in $OUT/fi-jit.tgz (all of .fi-jit: objects and ninja
# logs too); unpack into .fi-jit/ and carry it to reuse them. Run from the same folder each time:
# the cached build commands name the cache's absolute path.
# To measure exactly what is committed while the work tree is busy, export HEAD first
# (`git archive HEAD | tar x -C .gpu-src`, link .whl and .fi-jit into it), carry .gpu-src and
# run this script from inside it.
set -o pipefail
source .whl/install.sh || exit 1
# pip gives the installed headers (tvm_ffi's among them) the install time as mtime, newer than
# every carried object file, so ninja silently rebuilt all kernels (~100 s on a fresh H200).
find /tmp/site -exec touch -h -d @315532800 {} +
export PYTHONPATH="$PWD/engine:$PWD/plugins:$PYTHONPATH"
mkdir -p .fi-jit
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -s -x -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} --json "$OUT/bench_gpu.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log" | tail -60
# all of the kernel cache: flashinfer's ninja rebuilds any kernel whose .o or .ninja_log is missing
tar czf "$OUT/fi-jit.tgz" -C .fi-jit . 2>/dev/null
grep -c "Building JIT module" "$OUT"/*.log | sed 's/^/JIT builds in /'
ls -la "$OUT"
