"""Build of the spikeops extension (``spikeops._C``).

The CUDA kernels are compiled when the installed torch was built with CUDA *and* a CUDA toolkit is
found (torchao's rule; ``torch.cuda.is_available()`` would need a GPU at build time).
``SPIKEOPS_CUDA=0`` forces a CPU-only build, ``SPIKEOPS_CUDA=1`` demands the CUDA build.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    can = torch.version.cuda is not None and CUDA_HOME is not None
    forced = os.environ.get("SPIKEOPS_CUDA")
    if forced is None:
        return can
    if forced not in ("0", "1"):
        raise ValueError(f"SPIKEOPS_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and not can:
        raise RuntimeError(
            f"SPIKEOPS_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}")
    return forced == "1"


def extension():
    # Relative paths: setuptools refuses absolute source paths in editable builds.
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -ffp-contract=off: no fused multiply-adds, so float32 arithmetic is exactly docs/ops.md's.
    # -fopenmp: at::parallel_for is a header template that runs serially without it.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "cuda")]
    if not want_cuda():
        return CppExtension("spikeops._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for Ampere and Hopper, plus PTX for later chips.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    sources += sorted(glob.glob("cuda/*.cu"))
    # --fmad=false for the same reason as -ffp-contract=off on the host.
    nvcc = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]
    return CUDAExtension("spikeops._C", sources, include_dirs=include_dirs,
                         define_macros=[("SPIKEOPS_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    # The embedded default model, its calibration and held-out text (python/spikeops/data).
    package_data={"spikeops": ["data/*.txt", "data/*.md", "data/*/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
