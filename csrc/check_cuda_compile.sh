#!/usr/bin/env bash
# Compile every CUDA source of catfast with this machine's nvcc, compile only (`nvcc -c` to a throwaway
# object), for each architecture in CATFAST_CUDA_CHECK_ARCHS (default "80 90": A100 and H100/H200), and
# syntax-check the torch binding (csrc/cuda/ops_cuda.cpp, and bindings.cpp with CATFAST_WITH_CUDA) against
# the installed torch's headers. Fails on the first source that does not compile, so CUDA code that does not
# build cannot land even though CI has no GPU. Called by .ci/run.
#
# The kernels (csrc/cuda/*.cu) include only the CUDA toolkit's headers, so what nvcc compiles here is
# exactly the kernel code of a real build. A CPU wheel of torch lacks one generated header that the
# binding's c10/cuda includes need; csrc/cuda_stub_include/ provides it (used by this check only).
# Environment: NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), CUDA_HOME, PYTHON (default: python3),
# CXX (default: c++).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
python=${PYTHON:-python3}
if [ ! -x "$nvcc" ]; then
  echo "check_cuda_compile: nvcc not found (set NVCC or install the CUDA toolkit)" >&2
  exit 1
fi
# the toolkit's headers, for the binding: CUDA_HOME, else next to nvcc, else /usr/local/cuda (nvcc may be a wrapper)
cuda_home=${CUDA_HOME:-$(cd "$(dirname "$(readlink -f "$nvcc")")/.." && pwd)}
[ -f "$cuda_home/include/cuda_runtime.h" ] || cuda_home=/usr/local/cuda
if [ ! -f "$cuda_home/include/cuda_runtime.h" ]; then
  echo "check_cuda_compile: cuda_runtime.h not found (set CUDA_HOME)" >&2
  exit 1
fi
archs=${CATFAST_CUDA_CHECK_ARCHS:-"80 90"}
gencode=()
for a in $archs; do gencode+=(-gencode "arch=compute_$a,code=sm_$a"); done
out=$(mktemp -d "${TMPDIR:-/tmp}/catfast-cuda-check.XXXXXX")
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
shopt -s nullglob
sources=("$here"/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "check_cuda_compile: no .cu files under $here/cuda" >&2
  exit 1
fi
# the flags torch's CUDAExtension gives nvcc in a real build (no implicit half / bf16 conversions, ...)
mapfile -t torch_nvcc < <("$python" -c "from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as f; print('\n'.join(f))")
for src in "${sources[@]}"; do
  echo "+ nvcc -c $(basename "$src") (sm: $archs)"
  "$nvcc" -std=c++17 -O3 -Werror all-warnings "${torch_nvcc[@]}" --compiler-options -fPIC -DCATFAST_WITH_CUDA=1 \
    "${gencode[@]}" -I"$here/cuda" -c "$src" -o "$out/$(basename "$src").o"
done
mapfile -t torch_inc < <("$python" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
inc=(-I"$here" -I"$here/cuda" -I"$here/cuda_stub_include" -I"$cuda_home/include")
for p in "${torch_inc[@]}"; do inc+=(-I"$p"); done
py_inc=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for src in "$here/cuda/ops_cuda.cpp" "$here/bindings.cpp"; do
  echo "+ c++ -fsyntax-only $(basename "$src") (CATFAST_WITH_CUDA)"
  "${CXX:-c++}" -std=c++20 -fsyntax-only -DCATFAST_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    -w "${inc[@]}" -I"$py_inc" "$src" &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
if [ $status -ne 0 ]; then
  echo "check_cuda_compile: the torch binding does not compile" >&2
  exit 1
fi
echo "check_cuda_compile: ${#sources[@]} .cu files and the binding compile ($(( $(date +%s) - start )) s)"
