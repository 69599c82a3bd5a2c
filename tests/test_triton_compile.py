"""The Triton kernel compiles for an H100 (sm_90) here, without a GPU.

Under TRITON_INTERPRET=1 the kernel runs as Python on CPU tensors, which checks its arithmetic but
not Triton's compiler: type, shape and lowering errors would first show on a GPU. This test compiles
the kernel to a cubin in a fresh interpreter (without TRITON_INTERPRET) for every branch pair, both
the single-block and the streamed form, masks, the surrogate and each input dtype, and checks that
contiguous rows are read with vector loads (128-bit where a thread holds 16 bytes; Triton
specialises unit strides and 16-divisible arguments at launch, and the compile here is given the
same facts).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

COMPILE_SCRIPT = r"""
import json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alphadiv_kernels import _constants as codes
from alphadiv_kernels import triton_adaptive_kd as tk

kernel = tk.adaptive_kd_kernel
names = kernel.arg_names
FORWARD, REVERSE, GENERAL, NEG_ONE = (codes.BRANCH_FORWARD_KL, codes.BRANCH_REVERSE_KL, codes.BRANCH_GENERAL,
                                      codes.BRANCH_NEG_ONE)
# (dtype, single block, BLOCK, num_warps, lo, hi, same alpha, mask, surrogate, gradient)
CASES = [
    ("bf16", True, 1024, 4, NEG_ONE, FORWARD, False, False, False, True),
    ("bf16", False, tk.MAX_STREAMED_BLOCK, 8, NEG_ONE, FORWARD, False, True, True, True),
    ("fp32", True, tk.MAX_SINGLE_BLOCK, 16, GENERAL, GENERAL, False, True, False, True),
    ("fp16", False, tk.MAX_STREAMED_BLOCK, 8, REVERSE, FORWARD, False, False, True, False),
    ("fp32", True, 256, 4, FORWARD, GENERAL, False, False, True, True),
    ("bf16", True, 8192, 8, GENERAL, GENERAL, True, False, False, True),
    ("fp32", False, tk.MAX_STREAMED_BLOCK, 8, FORWARD, FORWARD, True, True, True, True),
]
results = []
for dtype, single, block, warps, lo, hi, same, mask, surrogate, grad in CASES:
    types = dict(S=f"*{dtype}", T=f"*{dtype}", G=f"*{dtype}", ROW_VALUES="*fp32", MASK="*i1" if mask else "*fp32",
                 DEVICE_ROW_WEIGHT="*fp32", s_stride_row="i64", t_stride_row="i64", C="i32", inv_t="fp32",
                 temperature="fp32", t_squared="fp32", row_weight="fp32", alpha_lo="fp32", alpha_hi="fp32",
                 clip="fp32", log_clip="fp32")
    constexprs = dict(s_stride_col=1, t_stride_col=1, BRANCH_LO=lo, BRANCH_HI=hi, SAME_ALPHA=same,
                      NEED_LO=lo != FORWARD, NEED_HI=hi != FORWARD and not same, HAS_MASK=mask,
                      HAS_DEVICE_ROW_WEIGHT=mask, COMPUTE_GRAD=grad, SURROGATE=surrogate, SINGLE_BLOCK=single,
                      BLOCK=block)
    signature = {name: types.get(name, "constexpr") for name in names}
    divisible = ["S", "T", "G", "s_stride_row", "t_stride_row", "C"]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(k),): [["tt.divisibility", 16]] for k in divisible})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ptx = compiled.asm["ptx"]
    results.append(dict(case=[dtype, single, block, lo, hi, same, mask, surrogate, grad],
                        cubin_bytes=len(compiled.asm["cubin"]),
                        vector_loads=len(re.findall(r"ld\.global(?:\.nc)?\.v[24]", ptx))))
print(json.dumps(results))
"""


def test_triton_kernel_compiles_to_sm90_cubin_with_128_bit_loads():
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton build has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"Triton could not compile the kernel for sm_90:\n{done.stderr[-4000:]}"
    results = json.loads(done.stdout.splitlines()[-1])
    assert len(results) == 7
    for result in results:
        assert result["cubin_bytes"] > 0, result
        assert result["vector_loads"] > 0, f"no vector loads in {result}"


SPARSE_COMPILE_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from alphadiv_kernels import _constants as codes
from alphadiv_kernels import triton_sparse_adaptive_kd as tk

def compile_kernel(kernel, types, constexprs, warps):
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr") for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return len(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["cubin"])

sizes = [compile_kernel(tk._mark_topk_kernel, dict(IDX=index, LP=lp, BITMAP="*i32", BAD="*i32", i_stride_row="i64",
                                                    i_stride_col="i64", l_stride_row="i64", l_stride_col="i64",
                                                    K="i32", C="i32", WORDS="i32"), dict(BLOCK_K=block_k), 4)
         for index, lp, block_k in (("*i32", "*fp16", 64), ("*i64", "*fp32", 1024))]
# (student dtype, logprob dtype, lo, hi, same alpha, mask, surrogate, gradient, tail empty, BLOCK, BLOCK_K)
CASES = [("bf16", "fp16", codes.BRANCH_NEG_ONE, codes.BRANCH_FORWARD_KL, False, True, False, True, False, 4096, 128),
         ("fp32", "fp32", codes.BRANCH_GENERAL, codes.BRANCH_REVERSE_KL, False, False, True, True, True, 1024, 1024),
         ("fp16", "bf16", codes.BRANCH_FORWARD_KL, codes.BRANCH_FORWARD_KL, True, True, False, False, False, 4096, 32)]
for s, lp, lo, hi, same, mask, surrogate, grad, tail_empty, block, block_k in CASES:
    types = dict(S=f"*{s}", IDX="*i32", LP=f"*{lp}", G=f"*{s}", ROW_VALUES="*fp32", MASK="*i1" if mask else "*fp32",
                 BITMAP="*i32", BAD="*i32", DEVICE_ROW_WEIGHT="*fp32", s_stride_row="i64", s_stride_col="i64",
                 i_stride_row="i64", i_stride_col="i64", l_stride_row="i64", l_stride_col="i64", C="i32", K="i32",
                 WORDS="i32", inv_t="fp32", temperature="fp32", t_squared="fp32", row_weight="fp32", alpha_lo="fp32",
                 alpha_hi="fp32", log_clip="fp32")
    constexprs = dict(BRANCH_LO=lo, BRANCH_HI=hi, SAME_ALPHA=same, HAS_MASK=mask, HAS_DEVICE_ROW_WEIGHT=mask,
                      COMPUTE_GRAD=grad, SURROGATE=surrogate, TAIL_EMPTY=tail_empty, BLOCK=block, BLOCK_K=block_k)
    sizes.append(compile_kernel(tk.sparse_adaptive_kd_kernel, types, constexprs, 8))
print(json.dumps(sizes))
"""


def test_sparse_triton_kernels_compile_to_sm90_cubin():
    # the bins' fp64 exp / log included: the interpreter cannot show a lowering error
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton build has no NVIDIA backend")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SPARSE_COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"Triton could not compile the sparse kernels for sm_90:\n{done.stderr[-4000:]}"
    sizes = json.loads(done.stdout.splitlines()[-1])
    assert len(sizes) == 5 and all(size > 0 for size in sizes)
