#!/usr/bin/env bash
# Compile check of the extension's host sources (and, with nvcc, the CUDA
# binding) against the headers of another torch release, without installing
# it: e.g. the torch of the GPU machine (2.11, CUDA 13.0) from a machine with
# torch 2.13. Catches API differences before a GPU session's build does
# (torch 2.13 holds autograd nodes in c10::intrusive_ptr, 2.11 in
# std::shared_ptr).
#
#   bash scripts/check_torch_headers.sh 2.11.0          # downloads the wheel (~530 MB) once
#   bash scripts/check_torch_headers.sh path/to/torch-*.whl
#
# Syntax and semantic checks only (g++ -fsyntax-only; nvcc -ptx for the
# binding): nothing is linked or run. Needs pip (for a version number),
# unzip, g++, and nvcc for the binding (skipped without it).
set -u
cd "$(dirname "$0")/.." || exit 1
spec="${1:?usage: check_torch_headers.sh VERSION|WHEEL}"
cache="${TORCH_HEADERS_CACHE:-/tmp/fused_ce_torch_headers}"
mkdir -p "$cache"

if [ -f "$spec" ]; then
  wheel="$spec"
else
  wheel=$(ls "$cache"/torch-"$spec"-*.whl 2>/dev/null | head -n 1)
  if [ -z "$wheel" ]; then
    python3 -m pip download "torch==$spec" --no-deps -d "$cache" -q || exit 1
    wheel=$(ls "$cache"/torch-"$spec"-*.whl | head -n 1)
  fi
fi
root="$cache/$(basename "$wheel" .whl)"
if [ ! -d "$root/torch/include" ]; then
  unzip -q -o "$wheel" 'torch/include/*' 'torch/version.py' -d "$root" || exit 1
fi
inc="$root/torch/include"
version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$root/torch/version.py")
python_inc=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
# The standard the extension build would use with this torch (setup.py leaves
# it to torch): C++20 where the headers demand it (torch 2.15), else C++17.
std=c++17
grep -q "C++20 or later" "$inc/ATen/ATen.h" && std=c++20
flags=(-std=$std -D_GLIBCXX_USE_CXX11_ABI=1 -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -I"$inc" -I"$inc/torch/csrc/api/include" -I"$python_inc" -Icsrc)
echo "== torch $version headers from $(basename "$wheel") (-std=$std)"

status=0
# Every host source that includes torch (the CPU kernel files do not).
for src in csrc/*.cpp $(grep -l -E "ATen|torch/" csrc/cpu/*.cpp); do
  if g++ -fsyntax-only -Wall "${flags[@]}" "$src" 2>"$cache/one.log"; then
    echo "ok    $src"
  else
    echo "FAIL  $src"; grep -E "error" "$cache/one.log" | head -n 10; status=1
  fi
done
if command -v nvcc >/dev/null 2>&1 && [ -f "$inc/c10/cuda/CUDAStream.h" ]; then
  src=csrc/cuda/cross_entropy_cuda.cu
  if nvcc -ptx -arch=compute_90 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ \
      -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
      "${flags[@]}" "$src" -o "$cache/binding.ptx" 2>"$cache/one.log"; then
    echo "ok    $src (nvcc, compute_90)"
  else
    echo "FAIL  $src"; grep -E "error" "$cache/one.log" | head -n 10; status=1
  fi
else
  echo "skip  csrc/cuda/cross_entropy_cuda.cu (no nvcc, or a CPU-only wheel without the CUDA headers)"
fi
exit $status
