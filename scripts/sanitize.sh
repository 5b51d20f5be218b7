#!/usr/bin/env bash
# Build the fused_ce CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer
# and run the fuzz / special-value / error tests against that build.
#
# Usage:   bash scripts/sanitize.sh [extra pytest args]
#          e.g. bash scripts/sanitize.sh -x -k "not hardening"
#
# What it does (nothing in the repository is modified):
#   1. copies the sources (setup.py, pyproject.toml, csrc/, fused_ce/*.py, tests/) into a
#      scratch directory $WORK (default /tmp/fused_ce_asan; wiped first), so the in-place build
#      /work/main/fused_ce/_C*.so and /work/main/build/ are never touched;
#   2. builds the CPU extension there in place (FUSED_CE_CPU_ONLY=1, MAX_JOBS=1) with
#      CFLAGS/CXXFLAGS/LDFLAGS = -fsanitize=address,undefined -fno-omit-frame-pointer -g
#      (-fno-sanitize=vptr: UBSan's vptr check needs RTTI from torch's uninstrumented
#      libraries and gives false reports across DSO boundaries; every other UBSan check is on);
#   3. checks that the built _C.so really is instrumented and that `import fused_ce`
#      (run from $WORK with PYTHONPATH=$WORK) resolves to the copy, not to the editable install;
#   4. runs pytest on the copied tests with
#        LD_PRELOAD=$(gcc -print-file-name=libasan.so)      (python itself is not instrumented)
#        ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:...   (CPython "leaks" at exit by design)
#        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
#      Test files: test_hypothesis.py, the fuzz test of test_hardening.py, test_special_values.py,
#      test_errors.py (override with TESTS="tests/x.py ..." in the environment).
#
#   libstdc++ is preloaded right after libasan: python is not linked against it, and without it
#   ASan's __cxa_throw interceptor finds no real __cxa_throw and aborts on the first C++ exception
#   ("CHECK failed: asan_interceptors.cpp ... real___cxa_throw != 0"), i.e. on every TORCH_CHECK.
#   Sanitizer reports are also written to $WORK/sanitizer.log.<pid> (pytest captures stderr).
#
# Environment: PYTHON (default python3), CC/CXX (default gcc/g++), WORK, TESTS, KEEP=1 keeps the
# build temp dir, REUSE_BUILD=1 skips the (slow, ~6 min on 2 cores) compilation when $WORK already
# holds a sanitized _C*.so built from identical csrc/ and setup.py (Python files and tests are
# always re-copied).
# Exit status: pytest's (non-zero also when a sanitizer aborts the process).
# Runtime: ~2-4 min build + a few minutes of tests on 2 cores.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3}
export CC=${CC:-gcc}
export CXX=${CXX:-g++}
WORK=${WORK:-/tmp/fused_ce_asan}
TESTS=${TESTS:-"tests/test_hypothesis.py tests/test_hardening.py::test_fuzz_differential tests/test_special_values.py tests/test_errors.py"}

case "$WORK" in
  ""|/|"$REPO"|"$REPO"/*) echo "sanitize.sh: refusing WORK=$WORK (must be a scratch dir outside the repo)" >&2; exit 2;;
esac

LIBASAN="$("$CC" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" || "$LIBASAN" == "libasan.so" ]]; then
  echo "sanitize.sh: libasan.so not found for $CC (install libasan / gcc's sanitizer runtime)" >&2
  exit 2
fi

echo "== fused_ce sanitizer run: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "== compiler: $("$CXX" --version | head -1)"
echo "== python:   $("$PYTHON" -c 'import sys; print(sys.version.split()[0])')  torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
echo "== libasan:  $LIBASAN"
echo "== scratch:  $WORK"

# ---- 1. copy the sources ---------------------------------------------------------------
REUSE=0
if [[ "${REUSE_BUILD:-0}" == 1 ]] && ls "$WORK"/fused_ce/_C*.so >/dev/null 2>&1 \
   && diff -rq "$REPO/csrc" "$WORK/csrc" >/dev/null && cmp -s "$REPO/setup.py" "$WORK/setup.py"; then
  REUSE=1
  echo "== REUSE_BUILD=1: keeping $(ls "$WORK"/fused_ce/_C*.so) (csrc/ and setup.py unchanged)"
  find "$WORK/fused_ce" "$WORK/tests" -name '*.py' -delete
  rm -f "$WORK"/sanitizer.log.* "$WORK/pytest.log"
else
  rm -rf "$WORK"
  mkdir -p "$WORK/fused_ce" "$WORK/tests"
  cp "$REPO/setup.py" "$REPO/pyproject.toml" "$WORK/"
  [[ -f "$REPO/README.md" ]] && cp "$REPO/README.md" "$WORK/"
  cp -r "$REPO/csrc" "$WORK/csrc"
fi
mkdir -p "$WORK/fused_ce" "$WORK/tests"
# Python sources of the package (no compiled objects, no caches).
(cd "$REPO" && find fused_ce -name '*.py' -print0) | while IFS= read -r -d '' f; do
  mkdir -p "$WORK/$(dirname "$f")"; cp "$REPO/$f" "$WORK/$f"
done
cp "$REPO"/tests/*.py "$WORK/tests/"
find "$WORK/tests" "$WORK/fused_ce" -name '__pycache__' -prune -exec rm -rf {} +

# ---- 2. build with the sanitizers ------------------------------------------------------
SAN_FLAGS="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g"
echo "== building with: $SAN_FLAGS"
[[ $REUSE == 1 ]] || (
  cd "$WORK"
  export CFLAGS="$SAN_FLAGS" CXXFLAGS="$SAN_FLAGS" LDFLAGS="-fsanitize=address,undefined"
  export FUSED_CE_CPU_ONLY=1 MAX_JOBS=${MAX_JOBS:-1}
  "$PYTHON" setup.py -q build_ext --inplace --build-temp "$WORK/build_tmp" > "$WORK/build.log" 2>&1 \
    || { tail -50 "$WORK/build.log"; echo "sanitize.sh: build failed (log: $WORK/build.log)" >&2; exit 3; }
)
SO=$(ls "$WORK"/fused_ce/_C*.so)
echo "== built $SO"
# grep reads all of nm's output (no -q): with pipefail, a grep -q that exits at the first match
# leaves nm to die of SIGPIPE on a large symbol table, and the pipeline reads as a failure.
if ! nm -D "$SO" | grep '__asan_' > /dev/null; then
  echo "sanitize.sh: $SO has no __asan_ symbols: the flags were not applied" >&2; exit 3
fi
if ! nm -D "$SO" | grep '__ubsan_' > /dev/null; then
  echo "sanitize.sh: $SO has no __ubsan_ symbols: the flags were not applied" >&2; exit 3
fi
echo "== instrumentation: $(nm -D "$SO" | grep -c '__asan_') asan and $(nm -D "$SO" | grep -c '__ubsan_') ubsan symbol references"

# ---- 3./4. run the tests against the sanitized build -----------------------------------
cd "$WORK"
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
LIBSTDCXX="$("$CXX" -print-file-name=libstdc++.so.6)"
[[ -e "$LIBSTDCXX" ]] || LIBSTDCXX="$("$CXX" -print-file-name=libstdc++.so)"
PRELOAD="$LIBASAN $LIBSTDCXX"
export ASAN_OPTIONS="log_path=$WORK/sanitizer.log:log_exe_name=0:detect_leaks=0:abort_on_error=1:strict_init_order=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/sanitizer.log"
export PYTHONDONTWRITEBYTECODE=1
LD_PRELOAD="$PRELOAD" "$PYTHON" - "$WORK" <<'EOF'
import os, sys
import fused_ce
path = os.path.realpath(fused_ce._ops._C.__file__)
assert path.startswith(os.path.realpath(sys.argv[1])), f"fused_ce._C resolved to {path}, not the sanitized copy"
print(f"== import check: fused_ce._C = {path} (cpu_capability={fused_ce.cpu_capability()})")
EOF

echo "== LD_PRELOAD=\"$PRELOAD\" ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS"
# The RSS leak test is left to the optimised build: ASan's quarantine holds freed blocks back
# from reuse, so RSS grows by design here (20.7 MB over its 5000 steps in one run, just above
# its allowance), and leaks proper are LSan's job, which CPython rules out (detect_leaks=0).
NOT_UNDER_ASAN="--deselect tests/test_hardening.py::test_no_leak_rss"
echo "== python -m pytest -q -p no:cacheprovider $NOT_UNDER_ASAN $TESTS $*"
set +e
# shellcheck disable=SC2086
LD_PRELOAD="$PRELOAD" "$PYTHON" -m pytest -q -p no:cacheprovider $NOT_UNDER_ASAN $TESTS "$@" 2>&1 | tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
set -e
if ls "$WORK"/sanitizer.log.* >/dev/null 2>&1; then
  for f in "$WORK"/sanitizer.log.*; do echo "---- $f"; head -60 "$f"; done
fi
# grep reads the files itself: behind a pipe, pipefail would take cat's complaint about a missing
# sanitizer.log.* (or a SIGPIPE) for "no report".
if grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer|CHECK failed' \
   "$WORK/pytest.log" "$WORK"/sanitizer.log.* 2>/dev/null; then
  echo "== SANITIZER REPORT FOUND (see above / $WORK/pytest.log)"
  [[ $rc -eq 0 ]] && rc=1
else
  echo "== no sanitizer reports"
fi
echo "== pytest exit status: $rc"
[[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK/build_tmp"
exit $rc
