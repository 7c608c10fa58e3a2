"""Build script for the optional C++ extension `catfast._C`. Metadata and dependencies live in
pyproject.toml; this file only decides whether the extension can be built, and never lets a
failed or impossible build break the install: it prints why and installs pure Python.

Environment knobs:
  CATFAST_SKIP_EXT=1     do not try to build catfast._C
  CATFAST_REQUIRE_EXT=1  fail the install if catfast._C cannot be built (CI uses this)
  CATFAST_DEBUG_EXT=1    build with -O0 -g instead of -O3
  CATFAST_SKIP_CUDA=1    build the CPU ops only, even where CUDA could be built

The CUDA kernels (csrc/cuda/*.cu and their torch binding csrc/cuda/ops_cuda.cpp) are built into the same
module when torch is a CUDA build and the CUDA toolkit (nvcc, found as torch finds it: CUDA_HOME or PATH)
is present; torch's own knobs apply: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"; default: the visible GPUs)
and MAX_JOBS (parallel compile jobs). Otherwise setup says why it skipped them and builds the CPU ops.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(HERE, "catfast", "_build_info.json")


def _say(msg: str) -> None:
    print(f"catfast setup: {msg}", file=sys.stderr, flush=True)


def _write_build_info(info: dict, build_lib: str | None = None) -> None:
    """Record the build for catfast._ext, in the source tree and (for wheels) in build_lib."""
    paths = [BUILD_INFO]
    if build_lib and os.path.isdir(os.path.join(build_lib, "catfast")):
        paths.append(os.path.join(build_lib, "catfast", "_build_info.json"))
    for path in paths:
        with open(path, "w") as f:
            json.dump(info, f, indent=2)


def _cuda_or_reason(torch) -> str | None:
    """None when the CUDA kernels can be built here, else why not (one sentence)."""
    if os.environ.get("CATFAST_SKIP_CUDA") == "1":
        return "CATFAST_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install a CUDA build of torch first)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit found (nvcc; set CUDA_HOME)"
    return None


def _extension_or_reason():
    """(list of extensions, cmdclass, None) when the extension can be built, else ([], {}, reason)."""
    if os.environ.get("CATFAST_SKIP_EXT") == "1":
        return [], {}, "CATFAST_SKIP_EXT=1"
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing in an isolated build env is the common case
        return (
            [],
            {},
            (
                f"torch is not importable in the build environment ({type(e).__name__}: {e}); "
                "install torch first and build with `pip install --no-build-isolation .`"
            ),
        )
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return [], {}, "no C++ compiler found (set CXX or install g++)"

    debug = os.environ.get("CATFAST_DEBUG_EXT") == "1"
    cxx_flags = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    if sys.platform != "darwin":
        cxx_flags.append("-fopenmp")  # at::parallel_for is an inline OpenMP loop; without this it runs serially
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    link_args = ["-fopenmp"] if sys.platform != "darwin" else []
    cuda_reason = _cuda_or_reason(torch)
    if cuda_reason is None:
        from torch.utils.cpp_extension import CUDAExtension

        cuda_dir = os.path.join(HERE, "csrc", "cuda")
        sources += sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(cuda_dir, "*.cu")))
        sources.append(os.path.relpath(os.path.join(cuda_dir, "ops_cuda.cpp"), HERE))
        nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-DNDEBUG"]
        _say(
            f"building the CUDA kernels too (TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', 'unset')}, "
            f"MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')})"
        )
        ext = CUDAExtension(
            "catfast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc"), cuda_dir],
            define_macros=[("CATFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    else:
        _say(f"building catfast._C without its CUDA kernels: {cuda_reason}")
        ext = CppExtension(
            "catfast._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_args,
        )

    class TolerantBuildExt(BuildExtension):
        """Builds catfast._C; on failure installs without it unless CATFAST_REQUIRE_EXT=1."""

        def run(self):
            try:
                super().run()
            except Exception as e:
                self._give_up(e)
                return
            info = {"built": True, "torch": torch.__version__, "compiler": compiler, "debug": debug}
            info["cuda"] = cuda_reason is None
            if cuda_reason is not None:
                info["cuda_skipped"] = cuda_reason
            _write_build_info(info, None if self.inplace else self.build_lib)

        def _give_up(self, err):
            reason = f"compiling catfast._C failed ({type(err).__name__}: {err})"
            if os.environ.get("CATFAST_REQUIRE_EXT") == "1":
                raise SystemExit(f"catfast setup: {reason} and CATFAST_REQUIRE_EXT=1")
            _say(reason + "; installing without it")
            _write_build_info({"built": False, "reason": reason}, None if self.inplace else self.build_lib)

    return [ext], {"build_ext": TolerantBuildExt}, None


ext_modules, cmdclass, reason = _extension_or_reason()
if reason is not None:
    if os.environ.get("CATFAST_REQUIRE_EXT") == "1":
        raise SystemExit(f"catfast setup: cannot build catfast._C: {reason} and CATFAST_REQUIRE_EXT=1")
    _say(f"building without the C++ extension: {reason}")
    _write_build_info({"built": False, "reason": reason})

setup(ext_modules=ext_modules, cmdclass=cmdclass)
