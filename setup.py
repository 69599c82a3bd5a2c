"""Builds alphadiv_kernels._C (the op's schema and CPU kernels) and, with CUDA, _C_cuda.

Environment:
  ALPHADIV_CUDA            auto (default) | 0 | 1
      auto builds the CUDA kernels when torch is a CUDA build and nvcc is found; 1 requires them
      (and fails, saying why, when they cannot be built); 0 skips them.
  TORCH_CUDA_ARCH_LIST     GPU architectures (default without a visible GPU: 8.0;9.0+PTX).
  CUDA_HOME                the CUDA toolkit (default: found from /usr/local/cuda or nvcc).
  ALPHADIV_CPU_CAPABILITY  auto (default) | avx512 | avx2 | default
      Instruction set of the CPU kernels. `auto` uses the best one the build machine has (the
      extension then needs that instruction set at run time; choose `avx2` or `default` to build
      for other machines). The kernels refuse to run on a CPU without it, with a message.
  MAX_JOBS                 bounds the parallel compile jobs (ninja).
"""
import os
import platform
import shutil


def find_cuda_home():
    """A toolkit folder with bin/nvcc and include/cuda_runtime.h. An `nvcc` on PATH may be a wrapper
    script outside the toolkit (as in /usr/local/bin), so the usual places come first."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in candidates:
        if folder and os.path.exists(os.path.join(folder, "bin", "nvcc")) and \
                os.path.exists(os.path.join(folder, "include", "cuda_runtime.h")):
            return folder
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # before torch.utils.cpp_extension guesses it

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def host_cpu_capability() -> str:
    if platform.machine() not in ("x86_64", "AMD64"):
        return "default"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "default"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "avx512"
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2"
    return "default"


def cpu_capability() -> str:
    requested = os.environ.get("ALPHADIV_CPU_CAPABILITY", "auto").lower()
    if requested == "auto":
        return host_cpu_capability()
    if requested not in CPU_CAPABILITY_FLAGS:
        raise SystemExit(f"ALPHADIV_CPU_CAPABILITY={requested!r}: choose auto, {', '.join(CPU_CAPABILITY_FLAGS)}")
    return requested


capability = cpu_capability()
print(f"alphadiv_kernels: building CPU kernels for {capability}")
cpu_extension = CppExtension(
    name="alphadiv_kernels._C",
    sources=["csrc/python_module.cpp", "csrc/registration.cpp", "csrc/adaptive_kd_autograd.cpp",
             "csrc/cpu/adaptive_kd_cpu.cpp", "csrc/cpu/sparse_adaptive_kd_cpu.cpp"],
    extra_compile_args={"cxx": ["-O3", "-fopenmp"]
                        + CPU_CAPABILITY_FLAGS[capability]},
)



def cuda_extensions():
    mode = os.environ.get("ALPHADIV_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"ALPHADIV_CUDA={mode!r}: choose auto, 0 or 1")
    if mode == "0":
        return []
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        missing = "no CUDA toolkit (set CUDA_HOME to a folder with bin/nvcc)"
    if missing:
        if mode == "1":
            raise SystemExit(f"ALPHADIV_CUDA=1 but the CUDA kernels cannot be built: {missing}")
        print(f"alphadiv_kernels: skipping the CUDA kernels ({missing})")
        return []
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    print(f"alphadiv_kernels: building CUDA kernels with {CUDA_HOME} for {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    return [CUDAExtension(
        name="alphadiv_kernels._C_cuda",
        sources=["csrc/cuda/python_module.cpp", "csrc/cuda/adaptive_kd_cuda.cu",
                 "csrc/cuda/sparse_adaptive_kd_cuda.cu"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )]


setup(
    packages=find_packages(include=["alphadiv_kernels*", "supernet*"]),
    ext_modules=[cpu_extension] + cuda_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
