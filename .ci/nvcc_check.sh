#!/usr/bin/env bash
# Compile check of the CUDA backend on machines without a GPU.
#
#  1. csrc/cuda/launchers_*.cu (torch-free: every kernel and launcher, one
#     file per dtype, exactly what the extension build compiles) for sm_80
#     and sm_90, warnings as errors, with the
#     half/bfloat16 macros torch's extension build defines.  Prints registers
#     and spills per kernel; fails on a compile error or on a kernel spilling
#     more than SPILL_LIMIT (64) bytes.  Up to a few dozen spilled bytes are
#     per-row scalars (pointers, coefficients) or registers saved around the
#     device-assert call, touched a handful of times per row, which costs
#     nothing measurable (checked in the SASS of the largest register-resident
#     configuration); a spilling per-element loop shows up as hundreds.
#     Then the bfloat16 file for sm_75, sm_100 and sm_120, the other
#     architectures a user may build for: it must compile, within the limit.
#  2. When torch is importable, csrc/cuda/cross_entropy_cuda.cu (the torch
#     binding) against its headers, sm_90 only.  CPU wheels ship the c10/ATen
#     CUDA headers but not the CMake-generated cuda_cmake_macros.h, so an
#     empty stand-in is supplied.  A failure is only reported as ours when a
#     probe with the same torch headers alone compiles.  PTX only (no ptxas):
#     the kernels were checked in step 1.
#
# Usage (from anywhere): bash .ci/nvcc_check.sh
# Exits 0 with a message when nvcc is not installed.  Takes about 2-4 (sm_80
# and sm_90) + 0.5 (the other architectures) + 1.5 minutes on 2 cores;
# NVCC_CHECK_BINDING=0 skips step 2.
set -u

cd "$(dirname "$0")/.." || exit 1

if ! command -v nvcc >/dev/null 2>&1; then
  echo "nvcc not found, skipping CUDA compile check"
  exit 0
fi

SPILL_LIMIT="${SPILL_LIMIT:-64}"
PYTHON="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# What torch.utils.cpp_extension passes to nvcc for every CUDA source, plus
# the extension's own nvcc flags from setup.py (keep in sync), so register
# counts match the real build.
TORCH_NVCC_FLAGS=(
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  --use_fast_math -lineinfo
)

echo "== nvcc: $(nvcc --version | tail -n 1)"

# --- 1. kernels --------------------------------------------------------------
echo "== compiling csrc/cuda/launchers_*.cu for sm_80 and sm_90"
start=$SECONDS
: >"$tmp/kernels.log"
for src in csrc/cuda/launchers_*.cu; do
  if ! nvcc --threads 2 -std=c++17 -O3 -c "$src" -o "$tmp/$(basename "$src" .cu).o" \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xptxas -v --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
      "${TORCH_NVCC_FLAGS[@]}" >"$tmp/one.log" 2>&1; then
    grep -v '^ptxas info' "$tmp/one.log" | grep -v 'bytes stack frame'
    echo "FAIL: $src does not compile"
    exit 1
  fi
  cat "$tmp/one.log" >>"$tmp/kernels.log"
done
echo "   compiled in $((SECONDS - start)) s"

# ptxas -v prints, per entry function and architecture:
#   Compiling entry function 'NAME' for 'sm_XX'
#   Function properties for NAME
#       S bytes stack frame, SS bytes spill stores, SL bytes spill loads
#   Used R registers, ...
# (properties of non-entry helpers can be interleaved, hence the name match).
ptxas_table() {
  awk '
    /Compiling entry function/ {
      match($0, /\047[^\047]+\047/); entry = substr($0, RSTART + 1, RLENGTH - 2)
      match($0, /for \047sm_[0-9a-z]+\047/); arch = substr($0, RSTART + 5, RLENGTH - 6)
      stores = "?"; loads = "?"; next
    }
    /Function properties for/ { props = $NF; next }
    /bytes stack frame/ { if (props == entry) { stores = $5; loads = $9 }; next }
    /Used [0-9]+ registers/ {
      match($0, /Used [0-9]+/); regs = substr($0, RSTART + 5, RLENGTH - 5)
      print arch, regs, stores, loads, entry
    }
  ' "$1"
}
ptxas_table "$tmp/kernels.log" >"$tmp/table.txt"

if command -v c++filt >/dev/null 2>&1; then
  demangle() { c++filt; }
else
  demangle() { cat; }
fi

echo "== registers and spills per kernel (arch regs spill-stores spill-loads kernel)"
while read -r arch regs stores loads name; do
  pretty="$(printf '%s\n' "$name" | demangle | sed -e 's/fused_ce::cuda:://g' -e 's/(.*$//' -e 's/^void //')"
  printf '   %-6s %3s regs  %4s B spill st  %4s B spill ld  %s\n' "$arch" "$regs" "$stores" "$loads" "$pretty"
done <"$tmp/table.txt" | sort -k9 -k1

kernels=$(wc -l <"$tmp/table.txt")
spilling=$(awk '$3 != "?" && $3 > 0' "$tmp/table.txt" | wc -l)
over=$(awk -v limit="$SPILL_LIMIT" '$3 == "?" || $3 > limit' "$tmp/table.txt" | wc -l)
echo "== $kernels kernel builds, $spilling with spill stores, $over above the ${SPILL_LIMIT}-byte limit"
if [ "$kernels" -eq 0 ]; then
  echo "FAIL: no ptxas statistics found"
  exit 1
fi
if [ "$over" -gt 0 ]; then
  echo "FAIL: kernels spill more than $SPILL_LIMIT bytes (or report no statistics):"
  awk -v limit="$SPILL_LIMIT" '$3 == "?" || $3 > limit' "$tmp/table.txt" | while read -r arch regs stores loads name; do
    echo "   $arch $regs regs, $stores B spill stores: $(printf '%s\n' "$name" | demangle)"
  done
  exit 1
fi

# --- 1b. the other architectures CUDA 13 builds for --------------------------
# Turing (sm_75: T4s; no cp.async, L2 hints or native bfloat16), datacenter
# Blackwell (sm_100) and consumer Blackwell (sm_120: 99 KB of shared memory
# per block): the kernels are tuned on sm_90, but a user's
# TORCH_CUDA_ARCH_LIST may name any of these, so they must compile, within
# the same spill limit. One dtype's file: the code that depends on the
# architecture is shared by all four.
echo "== compiling csrc/cuda/launchers_bfloat16.cu for sm_75, sm_100 and sm_120"
start=$SECONDS
if ! nvcc --threads 3 -std=c++17 -O3 -c csrc/cuda/launchers_bfloat16.cu -o "$tmp/other_archs.o" \
    -gencode arch=compute_75,code=sm_75 -gencode arch=compute_100,code=sm_100 \
    -gencode arch=compute_120,code=sm_120 \
    -Xptxas -v --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
    "${TORCH_NVCC_FLAGS[@]}" >"$tmp/other_archs.log" 2>&1; then
  grep -v '^ptxas info' "$tmp/other_archs.log" | grep -v 'bytes stack frame'
  echo "FAIL: csrc/cuda/launchers_bfloat16.cu does not compile for sm_75, sm_100 or sm_120"
  exit 1
fi
ptxas_table "$tmp/other_archs.log" >"$tmp/other_table.txt"
for arch in sm_75 sm_100 sm_120; do
  awk -v arch="$arch" -v limit="$SPILL_LIMIT" '$1 == arch {
    n++; if ($3 != "?" && $3 > 0) spilling++; if ($3 == "?" || $3 > limit) over++; if ($3 > most) most = $3 }
    END { printf "   %-6s %d kernel builds, %d with spill stores (at most %d B), %d above the limit\n",
          arch, n, spilling, most, over }' "$tmp/other_table.txt"
done
echo "   compiled in $((SECONDS - start)) s"
if awk -v limit="$SPILL_LIMIT" '$3 == "?" || $3 > limit { bad = 1 } END { exit !bad }' "$tmp/other_table.txt" \
    || [ ! -s "$tmp/other_table.txt" ]; then
  echo "FAIL: kernels spill more than $SPILL_LIMIT bytes (or report no statistics) on sm_75, sm_100 or sm_120"
  exit 1
fi

# --- 2. torch binding --------------------------------------------------------
if [ "${NVCC_CHECK_BINDING:-1}" = "0" ]; then
  echo "== NVCC_CHECK_BINDING=0: skipping the binding compile check"
  echo "nvcc_check: OK"
  exit 0
fi
torch_dir="$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"
if [ -z "$torch_dir" ] || [ ! -f "$torch_dir/include/c10/cuda/CUDAStream.h" ]; then
  echo "== torch (with c10 CUDA headers) not found, skipping the binding compile check"
  echo "nvcc_check: OK"
  exit 0
fi
mkdir -p "$tmp/stub/c10/cuda/impl"
touch "$tmp/stub/c10/cuda/impl/cuda_cmake_macros.h"
# The stub directory comes last so a real cuda_cmake_macros.h (CUDA wheels) wins.
BINDING_FLAGS=(
  -O2 -c -gencode arch=compute_90,code=compute_90
  -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" -I"$tmp/stub"
  -Icsrc/cuda -Icsrc -diag-suppress 3306 "${TORCH_NVCC_FLAGS[@]}"
)
# Recent torch headers want C++20; fall back to C++17 for older ones.
echo "== compiling csrc/cuda/cross_entropy_cuda.cu against torch $("$PYTHON" -c 'import torch; print(torch.__version__)') headers (compute_90)"
start=$SECONDS
ok=0
for std in c++20 c++17; do
  if nvcc -std=$std "${BINDING_FLAGS[@]}" csrc/cuda/cross_entropy_cuda.cu -o "$tmp/binding.o" \
      >"$tmp/binding_$std.log" 2>&1; then
    ok=1
    echo "   compiled with -std=$std in $((SECONDS - start)) s"
    grep -E 'csrc/cuda/.*(warning|error)' "$tmp/binding_$std.log" || true
    break
  fi
done
if [ "$ok" -eq 0 ]; then
  cat >"$tmp/probe.cu" <<'EOF'
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
EOF
  probe_ok=0
  for std in c++20 c++17; do
    if nvcc -std=$std "${BINDING_FLAGS[@]}" "$tmp/probe.cu" -o "$tmp/probe.o" >/dev/null 2>&1; then
      probe_ok=1
      break
    fi
  done
  if [ "$probe_ok" -eq 0 ]; then
    echo "== these torch headers do not compile here on their own; binding check skipped"
    echo "nvcc_check: OK"
    exit 0
  fi
  grep -E 'error' "$tmp/binding_c++20.log" | head -n 40
  echo "FAIL: cross_entropy_cuda.cu does not compile against the installed torch headers"
  exit 1
fi

echo "nvcc_check: OK"
