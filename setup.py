"""Build script for the fused_ce native library.

The CPU kernels are always built. The CUDA kernels are added when the
installed torch was built with CUDA and nvcc can be found (or FORCE_CUDA=1);
the decision is made from the build environment, never from whether a GPU is
visible, so that wheels can be built on GPU-less machines.
TORCH_CUDA_ARCH_LIST selects the GPU architectures (torch's own default
otherwise).
"""

import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("FUSED_CE_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # No -std: BuildExtension adds the standard the installed torch's headers
    # need (C++17 up to torch 2.11, C++20 from 2.13; torch 2.15 refuses C++17).
    # The sources are C++17 and C++20 alike.
    cxx_flags = [
        "-O3",
        # Let a * b + c become one FMA instruction (ISO C++ mode disables it).
        "-ffp-contract=fast",
        # std::exp / std::log never set errno here; lets the compiler inline them.
        "-fno-math-errno",
        # 64-byte vector types change the calling convention between ISAs; the
        # kernels only pass them between always-inlined functions.
        "-Wno-psabi",
    ]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined from torch's headers and only spreads
        # work over threads when this extension is itself compiled with
        # OpenMP (torch's Linux wheels use OpenMP); without the flag every
        # operator silently runs on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    if want_cuda():
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        define_macros.append(("FUSED_CE_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
        return CUDAExtension(
            "fused_ce._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension("fused_ce._C", sources, define_macros=define_macros,
                        extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
