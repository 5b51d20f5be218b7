#!/usr/bin/env bash
# Runs the CUDA kernels on the CPU emulator (tests/cuda_emulator) built with
# AddressSanitizer + UndefinedBehaviorSanitizer: out-of-bounds reads and
# writes of the tensors, and undefined behaviour, in the device code, on a
# machine without a GPU (what compute-sanitizer's memcheck does on one).
#
# Usage:   bash scripts/sanitize_cuda_emulator.sh [extra pytest args]
#
# The emulator is built into its own folder under build/cuda_emulator/ (named
# after a digest of the sources and these flags; about 2.5 min on 2 cores the
# first time), python is not instrumented, so libasan (and libstdc++, for
# ASan's __cxa_throw interceptor) are preloaded. Reports go to
# $LOG_DIR/asan.<pid> (default /tmp/fused_ce_emulator_asan): pytest captures
# stderr, and an ASan abort takes the process down before it could print.
# Exit status: pytest's, or 1 when a report was written.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-/tmp/fused_ce_emulator_asan}

LIBASAN="$(gcc -print-file-name=libasan.so)"
LIBSTDCXX="$(gcc -print-file-name=libstdc++.so)"
if [[ ! -e "$LIBASAN" || "$LIBASAN" == "libasan.so" ]]; then
  echo "sanitize_cuda_emulator.sh: libasan.so not found for gcc" >&2
  exit 2
fi
rm -rf "$LOG_DIR" && mkdir -p "$LOG_DIR"

echo "== fused_ce CUDA emulator under ASan + UBSan: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(g++ --version | head -1)"
status=0
FUSED_CE_EMULATOR_CFLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g" \
LD_PRELOAD="$LIBASAN $LIBSTDCXX" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$LOG_DIR/asan" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOG_DIR/ubsan" \
  "$PYTHON" -m pytest tests/test_cuda_emulated.py -q -p no:cacheprovider "$@" || status=$?

# ASan's warning that it does not fully support swapcontext (the fibers) is
# not a finding.
reports=$(grep -l -E "ERROR: AddressSanitizer|runtime error" "$LOG_DIR"/* 2>/dev/null || true)
if [[ -n "$reports" ]]; then
  echo "== sanitizer reports:"
  for r in $reports; do head -n 30 "$r"; done
  exit 1
fi
echo "== no sanitizer report; pytest exit status $status"
exit "$status"
