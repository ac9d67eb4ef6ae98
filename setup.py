"""Builds shardpipe._C with torch.utils.cpp_extension.

CUDA sources are compiled when torch is a CUDA build and nvcc is found; the
variable SHARDPIPE_WITH_CUDA=1/0 forces it on or off. The decision never asks
for a GPU, so a machine without one still compiles (and so checks) the CUDA code.
"""

import glob
import os
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root holding cuda_runtime_api.h, when CUDA_HOME/CUDA_PATH are unset.

    torch guesses the root from nvcc's folder, which is wrong when nvcc is a wrapper
    script in /usr/local/bin; look for the headers instead.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = root
            return


find_cuda_home()

from setuptools import find_packages, setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def want_cuda():
    forced = os.environ.get("SHARDPIPE_WITH_CUDA", "").strip().lower()
    if forced in ("1", "on", "true", "yes"):
        return True
    if forced in ("0", "off", "false", "no"):
        return False
    if forced:
        raise SystemExit(f"SHARDPIPE_WITH_CUDA must be 1 or 0, got {forced!r}")
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(with_cuda):
    """bindings.cpp and every core source under csrc/shardpipe/; files inside a cuda/ folder
    (stream code and kernels of each product) only with CUDA."""
    found = glob.glob(os.path.join(ROOT, "csrc/shardpipe/**/*.cpp"), recursive=True)
    found += glob.glob(os.path.join(ROOT, "csrc/shardpipe/**/*.cu"), recursive=True)
    srcs = []
    for path in sorted(os.path.relpath(p, ROOT) for p in found):
        in_cuda = "cuda" in path.split(os.sep)[:-1]
        if with_cuda or not (in_cuda or path.endswith(".cu")):
            srcs.append(path)
    return ["csrc/bindings.cpp"] + srcs


def extension():
    with_cuda = want_cuda()
    cxx = ["-O2", "-fvisibility=hidden"]
    kwargs = dict(
        name="shardpipe._C",
        sources=sources(with_cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx},
    )
    if with_cuda:
        # One architecture keeps a 2-core build short; set TORCH_CUDA_ARCH_LIST for others.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        kwargs["define_macros"] = [("SHARDPIPE_WITH_CUDA", "1")]
        kwargs["extra_compile_args"]["nvcc"] = ["-O2"]
        return cpp_extension.CUDAExtension(**kwargs)
    return cpp_extension.CppExtension(**kwargs)


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
