"""Build of the spikeops extension (``spikeops._C``).

The CUDA kernels are compiled when the installed torch was built with CUDA *and* a CUDA toolkit is
found (torchao's rule; ``torch.cuda.is_available()`` would need a GPU at build time).
``SPIKEOPS_CUDA=0`` forces a CPU-only build, ``SPIKEOPS_CUDA=1`` demands the CUDA build.
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The runtime check lives in scripts/ so that scripts/gpu_check.sh runs the same one.
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from check_runtime import check as check_runtime  # noqa: E402


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
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda():
        return CppExtension("spikeops._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for Ampere and Hopper, plus PTX for later chips.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # --fmad=false for the same reason as -ffp-contract=off on the host.
    nvcc = ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]
    return CUDAExtension("spikeops._C", sources, include_dirs=include_dirs,
                         define_macros=[("SPIKEOPS_WITH_CUDA", None)],
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


def static_runtime(flag: str) -> bool:
    return flag in ("-static-libstdc++", "-static-libgcc") or flag.endswith("libstdc++.a")


class BuildWithSharedRuntime(BuildExtension):
    """Links the C++ runtime dynamically, as torch does, and fails when the built extension still
    holds its own copy of it: two runtimes in one process crash every error message holding a
    number (scripts/check_runtime.py; docs/performance.md, "GPU status")."""

    def build_extensions(self):
        # setuptools folds sysconfig's LDSHARED and the environment's LDSHARED, LDFLAGS, CFLAGS,
        # CXXFLAGS and CPPFLAGS into these command lists. The C++ link runs compiler_cxx with
        # linker_so_cxx's flags (older setuptools, e.g. 65: linker_so's); nvcc only compiles,
        # the CUDA objects are linked by the same command.
        for key in self.compiler.executables:
            cmd = getattr(self.compiler, key, None) or []
            removed = [f for f in cmd if static_runtime(f)]
            if removed:
                print(f"spikeops setup: removed {' '.join(removed)} from the {key} command: "
                      "the C++ runtime must be the shared one torch uses", file=sys.stderr)
                setattr(self.compiler, key, [f for f in cmd if not static_runtime(f)])
        super().build_extensions()

    def run(self):
        super().run()
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            # A failing library is kept: gpu_check.sh's build stage diagnoses it.
            try:
                if check_runtime(path):
                    print(f"spikeops setup: {path} holds no C++ runtime of its own",
                          file=sys.stderr)
            except RuntimeError as e:
                raise SystemExit(f"error: {e}") from None


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    # The embedded default model, its calibration and held-out text (python/spikeops/data).
    package_data={"spikeops": ["data/*.txt", "data/*.md", "data/*/*"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithSharedRuntime},
)
