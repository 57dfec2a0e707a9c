"""Builds the one extension dagfm_ext._C.

C++ always; the CUDA sources only when a CUDA toolkit and a CUDA build of torch are both present.
DAGFM_USE_CUDA=0/1 forces the choice; TORCH_CUDA_ARCH_LIST picks the architectures as usual.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
except ModuleNotFoundError:  # pip's build isolation builds in an environment without torch
    sys.exit("dagfm_ext builds against the torch it will run with: install torch first, then "
             "pip install --no-build-isolation .")
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("DAGFM_USE_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "False", "no")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    use_cuda = _want_cuda()
    # csrc/cuda/*.cpp are plain ATen code (the GEMM backward): built everywhere so that the CPU
    # tests check them; the .cu files need nvcc.
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    # -fopenmp: at::parallel_for is header code that parallelises through OpenMP pragmas (torch's
    # CPU builds use the OpenMP backend); without it the CPU kernels silently run on one thread.
    if sys.platform == "win32":
        cxx_flags, link_flags = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        cxx_flags, link_flags = ["-O3", "-std=c++20"], []
    else:
        # -fno-wrapv undoes the -fwrapv of Python's own compile flags: with wrapping int overflow
        # the compiler may not widen the tile loops' int indices, and those loops run 7-20% slower.
        cxx_flags, link_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-wrapv"], ["-fopenmp"]
    define_macros = []
    extra = {"cxx": cxx_flags}
    ext_cls = cpp_extension.CppExtension
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("DAGFM_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        ext_cls = cpp_extension.CUDAExtension
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if use_cuda else ""
    define_macros.append(("DAGFM_CUDA_ARCH_LIST", '"%s"' % arch_list.replace('"', "")))
    return ext_cls(
        name="dagfm_ext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
