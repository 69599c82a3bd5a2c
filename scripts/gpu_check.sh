#!/usr/bin/env bash
# One command for a lent GPU machine: build in place, run the gpu tests, then a benchmark subset,
# and print a short table. Meant to finish inside about 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # the interpreter that holds a CUDA build of torch
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
start=$(date +%s)
echo "== build (CUDA kernels required)"
ALPHADIV_CUDA=1 MAX_JOBS=16 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . > build.log 2>&1 \
  || { tail -40 build.log; exit 1; }
echo "   built in $(( $(date +%s) - start )) s"
echo "== gpu tests"
timeout 180 "$PYTHON" -m pytest tests/test_gpu.py tests/test_cuda_build.py -q -x -p no:cacheprovider 2>&1 | tail -15
echo "== benchmarks (bf16, forward+backward): row in registers (16384) and streamed (128256)"
timeout 210 "$PYTHON" -m benchmarks --device cuda --shapes 256x1000 4096x16384 8192x128256 --modes fwd+bwd \
  --repeats 7 --budget 3 --out "${OUT:-results}/gpu-check-bf16" 2>&1 | grep -v "^cases" | tail -20
echo "== benchmarks (fp32, forward+backward)"
timeout 45 "$PYTHON" -m benchmarks --device cuda --dtype float32 --shapes 256x1000 --modes fwd+bwd --repeats 10 \
  --budget 3 --out "${OUT:-results}/gpu-check-fp32" 2>&1 | grep -v "^cases" | tail -8
echo "== the op under torch.compile (bf16, forward+backward): default, max-autotune-no-cudagraphs, reduce-overhead"
timeout 240 "$PYTHON" -m benchmarks --device cuda --shapes 1x10 32x1000 8192x128256 --modes fwd+bwd --repeats 50 \
  --budget 2 --no-memory --providers fused-cuda "fused-compile (default)" "fused-compile (max-autotune-no-cudagraphs)" \
  "fused-compile (reduce-overhead)" alphanet-compile "kl-eager (alpha 1,1)" --out "${OUT:-results}/gpu-check-compile" \
  2>&1 | grep -v "^cases" | tail -16
echo "== lm suite (bf16): projection + loss, materialised logits vs token-chunked torch.compile vs fused-linear;"
echo "   a top-k teacher (k = 32, 128, 1024): eager gather + tail vs its torch.compile vs fused_linear_sparse_adaptive_kd"
timeout 240 "$PYTHON" -m benchmarks --suite lm --device cuda --linear-shapes 8192x2048x128256 --topk 32 128 1024 \
  --repeats 5 --budget 2 --out "${OUT:-results}/gpu-check-lm" 2>&1 | tail -15
echo "== supernet on the GPU: a 1-epoch digits run, eval, a short search, fp16 distill and finetune with --device cuda"
if "$PYTHON" -c "import sklearn, yaml, tqdm, matplotlib, torchvision" 2>/dev/null; then
  run="${OUT:-results}/gpu-check-digits"
  rm -rf "$run" "$run-distill" "$run-finetune"
  for step in "train --epochs 1 --device cuda --out $run" \
              "eval --checkpoint $run --arch random:4 --split test --device cuda" \
              "search --checkpoint $run --iterations 2 --device cuda" \
              "distill --student supernet:$run:min --teacher supernet:$run:max --epochs 1 --amp fp16 --device cuda --out $run-distill" \
              "finetune --model supernet:$run:min --holdout 0 --epochs 1 --device cuda --out $run-finetune"; do
    began=$(date +%s%N)
    timeout 120 "$PYTHON" -m supernet.cli $step 2>&1 | grep -v "step/s" | tail -3
    elapsed=$(( ($(date +%s%N) - began) / 1000000 ))
    printf '   alphanet %s: %d.%03d s\n' "${step%% *}" $((elapsed / 1000)) $((elapsed % 1000))
  done
else
  echo "   skipped: the supernet extra (scikit-learn, pyyaml, tqdm, matplotlib, torchvision) is not installed"
fi
echo "== total $(( $(date +%s) - start )) s"
