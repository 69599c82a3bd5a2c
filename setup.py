"""Builds alphadiv_kernels._C, the fused CPU kernels of the adaptive alpha-divergence KD op.

Environment:
  ALPHADIV_CPU_CAPABILITY  auto (default) | avx512 | avx2 | default
      Instruction set of the CPU kernels. `auto` uses the best one the build machine has (the
      extension then needs that instruction set at run time; choose `avx2` or `default` to build
      for other machines). The kernels refuse to run on a CPU without it, with a message.
  MAX_JOBS                 bounds the parallel compile jobs (ninja).
"""
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

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
    sources=["csrc/python_module.cpp", "csrc/registration.cpp", "csrc/cpu/adaptive_kd_cpu.cpp"],
    extra_compile_args={"cxx": ["-O3", "-fopenmp"]
                        + CPU_CAPABILITY_FLAGS[capability]},
)

setup(
    packages=find_packages(include=["alphadiv_kernels*", "supernet*", "benchmarks*"]),
    ext_modules=[cpu_extension],
    cmdclass={"build_ext": BuildExtension},
)
