#!/usr/bin/env bash
# One command for a lent GPU machine: build in place, run the gpu tests, then a benchmark subset,
# and print a short table. Meant to finish inside about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
echo "== build (CUDA kernels required)"
ALPHADIV_CUDA=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . > build.log 2>&1 \
  || { tail -40 build.log; exit 1; }
echo "   built in $(( $(date +%s) - start )) s"
echo "== gpu tests"
timeout 200 python -m pytest tests/test_gpu.py tests/test_cuda_build.py -q -x -p no:cacheprovider 2>&1 | tail -15
echo "== benchmarks (bf16, forward+backward): row in registers (16384) and streamed (128256)"
timeout 150 python -m benchmarks --device cuda --shapes 256x1000 4096x16384 8192x128256 --modes fwd+bwd \
  --repeats 10 --budget 5 --out "${OUT:-results}/gpu-check-bf16" 2>&1 | grep -v "^cases" | tail -20
echo "== benchmarks (fp32, forward+backward)"
timeout 45 python -m benchmarks --device cuda --dtype float32 --shapes 256x1000 --modes fwd+bwd --repeats 10 \
  --budget 3 --out "${OUT:-results}/gpu-check-fp32" 2>&1 | grep -v "^cases" | tail -8
echo "== total $(( $(date +%s) - start )) s"
