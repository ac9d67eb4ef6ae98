"""Builds shardpipe._C with torch.utils.cpp_extension.

CUDA sources are compiled when torch is a CUDA build and nvcc is found; the
variable SHARDPIPE_WITH_CUDA=1/0 forces it on or off. The decision never asks
for a GPU, so a machine without one still compiles (and so checks) the CUDA code.
"""

import glob
import os
import shlex
import shutil
import subprocess

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
    # Python's own CFLAGS add -g: debug info for torch's headers makes each object ~40x
    # larger and its compile a third slower, for symbols nobody reads in a release build.
    cxx = ["-O2", "-g0", "-fvisibility=hidden"]
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


PRECOMPILED = os.path.join(ROOT, "csrc", "shardpipe", "precompiled.h")


def make_depfile_inputs(path):
    """The prerequisites listed in a make-style depfile (gcc -MMD), or None when unreadable."""
    try:
        with open(path) as f:
            text = f.read().replace("\\\n", " ")
    except OSError:
        return None
    _, _, inputs = text.partition(":")
    return inputs.split()


def is_gcc(compiler):
    """Whether `compiler` is GCC (the .gch lookup below is GCC's; clang's differs)."""
    try:
        macros = subprocess.run([compiler, "-dM", "-E", "-x", "c++", os.devnull],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return "__GNUC__" in macros and "__clang__" not in macros


def precompile(compiler, cflags, post_cflags, build_dir):
    """Compiles precompiled.h with exactly the flags of the C++ sources, unless the .gch there
    is newer than everything it includes and was made by the same command; returns the path
    to force-include (GCC finds <path>.gch beside it) and whether the .gch was rebuilt."""
    pch_dir = os.path.join(build_dir, "precompiled")
    os.makedirs(pch_dir, exist_ok=True)
    header = os.path.join(pch_dir, "shardpipe_precompiled.h")
    with open(PRECOMPILED) as f:
        text = f.read()
    if not os.path.exists(header) or open(header).read() != text:
        with open(header, "w") as f:
            f.write(text)
    gch, depfile, stamp = header + ".gch", header + ".d", header + ".cmd"
    command = ([compiler, "-MMD", "-MF", depfile] + shlex.split(" ".join(cflags))
               + ["-x", "c++-header", header, "-o", gch] + shlex.split(" ".join(post_cflags)))
    inputs = make_depfile_inputs(depfile)
    if (os.path.exists(gch) and inputs is not None
            and os.path.exists(stamp) and open(stamp).read() == shlex.join(command)
            and all(os.path.getmtime(i) <= os.path.getmtime(gch) for i in inputs)):
        return header, False
    print("shardpipe: precompiling torch's headers (csrc/shardpipe/precompiled.h)", flush=True)
    subprocess.run(command, check=True)
    with open(stamp, "w") as f:
        f.write(shlex.join(command))
    return header, True


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja), with torch's headers parsed once instead of per file.

    torch offers no hook for a precompiled header, so this wraps the private function that
    receives the exact C++ flags. Where it is missing or the compiler is not GCC, the build
    runs as torch's own does, only slower.
    """

    def build_extensions(self):
        original = getattr(cpp_extension, "_write_ninja_file_and_compile_objects", None)
        if original is None or self.compiler.compiler_type != "unix":
            return super().build_extensions()

        def compile_objects(**kwargs):
            compiler = cpp_extension.get_cxx_compiler()
            needed = {"cflags", "post_cflags", "build_directory", "sources", "objects"}
            if not needed <= kwargs.keys() or not is_gcc(compiler):
                return original(**kwargs)
            header, rebuilt = precompile(compiler, kwargs["cflags"], kwargs["post_cflags"],
                                         kwargs["build_directory"])
            if rebuilt:
                # Objects built against an older .gch do not list its headers in their
                # depfiles (GCC leaves them out), so ninja would not rebuild them by itself.
                for source, obj in zip(kwargs["sources"], kwargs["objects"]):
                    if not source.endswith(".cu") and os.path.exists(obj):
                        os.remove(obj)
            kwargs["post_cflags"] = list(kwargs["post_cflags"]) + [
                "-include", shlex.quote(header), "-Winvalid-pch"]
            return original(**kwargs)

        cpp_extension._write_ninja_file_and_compile_objects = compile_objects
        try:
            super().build_extensions()
        finally:
            cpp_extension._write_ninja_file_and_compile_objects = original


setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
