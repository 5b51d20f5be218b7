#!/usr/bin/env bash
# One call on a lent GPU machine: build with the CUDA kernels, smoke-check
# them, run the CUDA half of the test suite, time the GPU benchmarks and run
# compute-sanitizer over a few CUDA tests.  Every stage has its own time
# limit, so a hang or a crash in one still leaves the later ones their turn,
# and everything is logged under $OUT (or ./gpu_out).
#
#   bash scripts/gpu_check.sh [STAGES]     STAGES: any of build,smoke,repro,tests,clusters,reuse,warprows,prefetch,wide,fold,percall,graphed,bench,profile,sanitize
#
# A session's device time (15 minutes, machine start included) fits about two
# calls of at most 10 minutes each on one warm machine (it goes back after 30 s
# idle: issue the second call at once). Stage times on the H100 (sessions
# 26-28): build 2 minutes (seconds when incremental on a warm machine), the
# CUDA tests 3.5 with EMULATOR=0 (the emulator's tests are CI's), the full
# benchmark about 4, `graphed` about 1.5, `clusters` and `reuse` 2-2.5 each
# with EXPERIMENT_SANITIZE=0 (compute-sanitizer over the experiments' tests
# adds about 2 each; needed before an experiment becomes the default).
# The plan for the cuda issue's open targets (its numbers are the H200's, so
# name kind nvidia-h200 where it is lent; session 32 ran the first of these
# calls on one in about 6 minutes with the machine's start, then four shorter
# ones: benchmarks/results/gpu-2026-11-28-h200). A machine's start takes a
# minute or two of the 15, and whatever a cut-short call finished is in
# session.log.
#   1. TESTS_TIMEOUT=240 TEST_WORKERS=16 EMULATOR=0 BENCH_TIMEOUT=150 GRAPHED_TIMEOUT=100 \
#        bash scripts/gpu_check.sh build,tests,bench,graphed
#      (about 6 minutes, timeout_s 600): every CUDA test; the targets' three
#      workloads (the benchmark's default selection; BENCH_ARGS="--max-time 1"
#      runs the full suite instead); the classifier steps replayed from CUDA
#      graphs, where 65536 x 10 is timed without the host. session.log ends
#      with the targets' table (benchmarks/check_targets.py).
#   2. at once: bash scripts/gpu_check.sh build,prefetch,wide
#      (about 6.5 minutes; the build is incremental on the warm machine): the
#      two open targets' experiments of session 33, each against the
#      default. prefetch (FUSED_CE_CUDA_RESIDENT_PREFETCH=1: each block stages
#      its next row in shared memory): its tests and racecheck, then 8192 x
#      32000 fp32 (1.65x the copy, 2.65x eager; the target is 1.6x and 3x),
#      16384 x 50304 bf16 (2.22x) and 65536 x 1000 fp32 (2.23x). wide
#      (FUSED_CE_CUDA_WIDE_REDUCTIONS=1: a forward of three launches instead
#      of five): its tests, each kernel of a 65536 x 10 step with its device
#      time without and with it, then the step launched and graphed (2.41x
#      eager graphed, 1.53x launched; the target is 3x).
#   3. at once, if 4 minutes are left: REUSE_ROWS=none bash scripts/gpu_check.sh build,fold,reuse,percall
#      (about 4.5 minutes): class-last logits (F.cross_entropy(x.transpose(1,
#      2), y)) and channels-last images, whose positions fold into rows since
#      session 35 (ce::fold_positions; their tests ran in call 1), against one
#      thread per position; the long-row tests and the racecheck of the
#      shared-memory ring, default for streamed 16-bit rows since session 32
#      (it ran only under the tests there); the host's cost of a step.
#   Then, in a later session: build,warprows (whether rows of 513-1024
#   float32 classes are faster held by a warp: 65536 x 1000 fp32 was 2.23x
#   the copy in blocks of 128 threads; the prefetch times the same rows).
# Sessions 26 and 28 ran
#   TESTS_TIMEOUT=260 TEST_WORKERS=16 EMULATOR=0 bash scripts/gpu_check.sh build,smoke,repro,tests
#   BENCH_TIMEOUT=280 BENCH_ARGS="--max-time 1" bash scripts/gpu_check.sh build,reuse,bench,profile
# $OUT brings back at most 8 files, so drop build.log after a good build.
# Before spending device time, `CUDA=1 scripts/test_with_torch.sh <the GPU
# machine's torch wheel>` builds and tests the same sources against that torch
# on the CPU machine.
#
# With wheels in .whl/ (scripts/peer_wheels.sh, and carry=[".whl"] in the
# device call) the benchmark also times Liger-Kernel and Cut Cross-Entropy.
#
# Environment: TEST_ARGS (extra pytest arguments, e.g. a -k expression),
# CLUSTER_ROWS, REUSE_ROWS, WARP_ROWS, PREFETCH_ROWS, WIDE_ROWS and FOLD_ROWS (the
# shapes those experiments time; "none": their tests and sanitizers only),
# BENCH_ARGS (replaces the default benchmark selection), *_TIMEOUT (seconds
# per stage), EXPERIMENT_SANITIZE=0 (no compute-sanitizer in the clusters
# and reuse stages), EMULATOR=0 (tests: leave the CPU emulator's out).
# The machine has no network: torch, pytest, xdist and hypothesis must
# already be installed there.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGES="${1:-build,smoke,repro,tests,clusters,reuse,warprows,prefetch,wide,percall,graphed,bench,profile,sanitize}"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

# Peer libraries for the benchmark, carried as wheels (scripts/peer_wheels.sh).
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peer_site \
      .whl/*.whl >/dev/null 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/peer_site"
fi

want() { [[ ",$STAGES," == *",$1,"* ]]; }
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)"; }

# fused_ce's forward + backward on the given shapes next to a copy of the
# logits (IMPLS and MODES: other implementations and benchmark modes), in a
# process of its own under the caller's environment (the FUSED_CE_CUDA_*
# settings are read once per process); the tables' rows only ($OUT brings
# back 8 files); nothing for SHAPES "none".   time_rows SHAPES NAME
time_rows() {
  [ "$1" = none ] && return 0
  timeout 150 "$PY" -m fused_ce.bench --device cuda --modes "${MODES:-fwd+bwd}" --shapes "$1" ${ROWS_ARGS:-} \
      --impls "${IMPLS:-fused_ce,copy}" --no-compile --no-memory --max-time 1 --out "/tmp/rows-$2" 2>&1 \
      | grep -E "^[0-9]+x[0-9]+|  (fused_ce|copy|eager)  " | tee -a "$LOG"
}

# An experiment's switch against its default: time_rows with VARIABLE unset
# and set to VALUE, alternating, twice (drift of the machine hits both).
#   switch_rows VARIABLE VALUE SHAPES NAME
switch_rows() {
  for round in 1 2; do
    for setting in unset "$2"; do
      echo "$1=$setting (round $round)" | tee -a "$LOG"
      ( if [ "$setting" = unset ]; then unset "$1"; else export "$1=$setting"; fi
        time_rows "$3" "$4-$setting-$round" )
    done
  done
}

{
  stage environment
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import torch, sys; print("torch", torch.__version__, "cuda", torch.version.cuda, "python", sys.version.split()[0])'
  nvcc --version | tail -n 2
  nproc
} 2>&1 | tee -a "$LOG"

if want build; then
  stage "build (sm_90)" | tee -a "$LOG"
  if ! TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-16}" timeout "${BUILD_TIMEOUT:-300}" \
      "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    tail -n 60 "$OUT/build.log" | tee -a "$LOG"
    echo "BUILD FAILED" | tee -a "$LOG"
    exit 1
  fi
  grep -E "warning|error" "$OUT/build.log" | grep -v "Wmaybe-uninitialized\|avx512" | head -n 20 | tee -a "$LOG"
  echo "built in ${SECONDS}s" | tee -a "$LOG"
fi

if want smoke; then
  stage smoke | tee -a "$LOG"
  timeout "${SMOKE_TIMEOUT:-90}" "$PY" scripts/gpu_smoke.py 2>&1 | tee -a "$LOG"
fi

if want repro; then
  # The open crash (scripts/repro_scale_gradient_crash.py runs its cases
  # from the given index on): after a crash, go on from the case after it.
  stage "repro: scale_gradient_ crash" | tee -a "$LOG"
  first=0
  while [ "$first" -lt 12 ]; do
    output=$(timeout 60 "$PY" scripts/repro_scale_gradient_crash.py "$first" 2>&1)
    status=$?
    echo "$output" | head -n 40 | tee -a "$LOG"
    echo "from case $first: exit status $status" | tee -a "$LOG"
    [ "$status" -eq 0 ] && break
    started=$(echo "$output" | grep -c "^calling:")
    first=$((first + (started > 0 ? started : 1)))
  done
  # The toolchain the extension was linked with (the GPU machine's link line
  # had Ubuntu Python's -Wl,-Bsymbolic-functions and /opt/gcc/bin/g++), the
  # C++ runtime it loads, and where its (and libc10's) iostream calls for
  # integers bind.
  { "$PY" -c 'import sysconfig; print("LDSHARED:", sysconfig.get_config_var("LDSHARED"))'
    for cxx in /opt/gcc/bin/g++ g++; do command -v "$cxx" >/dev/null && echo "$cxx: $("$cxx" --version | head -n 1)"; done
    ldd fused_ce/_C*.so | grep -E "stdc\+\+|libgcc_s|libgomp"
    nm -D --defined-only fused_ce/_C*.so | c++filt | grep -E " [TWV] (std::basic_ostream|std::basic_ios|std::locale|std::num_put|std::__ostream_insert|std::__cxx11::basic_ostringstream|std::__cxx11::basic_stringbuf|std::basic_streambuf)" | head -n 5 | sed 's/^/iostream symbol the extension defines: /'
  } 2>&1 | tee -a "$LOG"
  # The same integer formatting in a torch-free library built here with each
  # compiler, loaded beside torch: does the crash need the extension at all?
  timeout 240 "$PY" scripts/ostream_probe.py 2>&1 | tee -a "$LOG"
  rm -f /tmp/ld-bindings.*
  LD_DEBUG=bindings LD_DEBUG_OUTPUT=/tmp/ld-bindings timeout 60 "$PY" scripts/repro_scale_gradient_crash.py 2 \
      >/dev/null 2>&1
  cat /tmp/ld-bindings.* 2>/dev/null | grep -E "(fused_ce/_C|libc10\.so).*(_ZNSolsE|_ZNSo9_M_insert|num_put|_ZNSt6locale)" \
      | sed 's/^ *[0-9]*: *binding file //' | sort -u | head -n 20 | tee -a "$LOG"
fi

if want tests; then
  stage "tests (CUDA cases)" | tee -a "$LOG"
  # The CPU emulator of the CUDA kernels (tests/test_cuda_emulated.py) is
  # built once here, outside pytest: built by the first xdist worker under
  # the per-test time limit, while 13 others load the GPU, it overran that
  # limit and left its lock behind (264 setup errors on 2026-11-27).
  # EMULATOR=0 leaves the emulator out (CI runs it on the CPU; on a short
  # device budget its build is time the GPU tests need).
  emulator_args=""
  if [ "${EMULATOR:-1}" = 0 ]; then
    emulator_args="--ignore=tests/test_cuda_emulated.py"
  else
    emulator_start=$SECONDS
    timeout "${EMULATOR_TIMEOUT:-300}" "$PY" -c "import sys; sys.path.insert(0, 'tests')
from cuda_emulator import build; build.load()" >/tmp/emulator-build.log 2>&1
    echo "emulator build exit status $? in $((SECONDS - emulator_start)) s" | tee -a "$LOG"
  fi
  # -k cuda keeps the CUDA parametrisations and the CUDA-only tests.  -v
  # logs every result as it comes, and the time limit sends SIGINT, on which
  # pytest still prints its summary: a run cut short keeps its failures' names.
  FUSED_CE_TEST_LARGE=1 timeout -s INT -k 20 "${TESTS_TIMEOUT:-240}" "$PY" -m pytest tests -v \
      -p no:cacheprovider -k cuda -n "${TEST_WORKERS:-8}" --timeout 120 -rfE $emulator_args ${TEST_ARGS:-} \
      >"$OUT/tests.log" 2>&1
  echo "pytest exit status $?" | tee -a "$LOG"
  grep -cE " PASSED " "$OUT/tests.log" | sed 's/^/passed: /' | tee -a "$LOG"
  grep -E " (FAILED|ERROR) |^(FAILED|ERROR) |node down|crashed|[0-9]+ (passed|failed)" "$OUT/tests.log" \
      | cut -c1-300 | sort -u | head -n 80 | tee -a "$LOG"
fi

if want clusters; then
  # Rows split over thread-block clusters: their tests alone first; then LM
  # shapes with FUSED_CE_CUDA_CLUSTERS unset (the measured choice of
  # cluster_plan: float32 rows past one block in clusters, 16-bit ones
  # streamed), 1 (every row past one block in clusters) and all (also
  # 16-bit rows of 32k-57k classes), with the 16-bit clusters in blocks of
  # 1024 threads x 4 slots (FUSED_CE_CUDA_CLUSTER_BLOCK=1024, an experiment:
  # the 256 x 8 blocks ran one per SM; 1 with those was 1.90x the copy for
  # 16384 x 128256 bf16 in session 25), each next to a copy of the logits
  # (time_rows); then memcheck and racecheck over the cluster tests in
  # 1024-thread blocks.
  stage "cluster rows" | tee -a "$LOG"
  FUSED_CE_CUDA_CLUSTERS=1 FUSED_CE_CUDA_CLUSTER_BLOCK=1024 timeout 150 "$PY" -m pytest tests/test_long_rows.py -q \
      -p no:cacheprovider -k cuda \
      -rfE 2>&1 | tail -n 25 | cut -c1-300 | tee -a "$LOG"
  for setting in "unset -" "1 1024" "all 1024"; do
    set -- $setting
    echo "FUSED_CE_CUDA_CLUSTERS=$1 FUSED_CE_CUDA_CLUSTER_BLOCK=$2" | tee -a "$LOG"
    ( [ "$1" = unset ] && unset FUSED_CE_CUDA_CLUSTERS || export FUSED_CE_CUDA_CLUSTERS=$1
      [ "$2" = - ] || export FUSED_CE_CUDA_CLUSTER_BLOCK=$2
      time_rows "${CLUSTER_ROWS:-16384x50257:bf16,16384x128256:bf16,8192x256000:bf16}" "clusters-$1-$2" )
  done
  for tool in memcheck racecheck; do
    [ "${EXPERIMENT_SANITIZE:-1}" = 1 ] || break
    FUSED_CE_CUDA_CLUSTERS=1 FUSED_CE_CUDA_CLUSTER_BLOCK=1024 timeout 120 compute-sanitizer --tool "$tool" \
        --error-exitcode 9 "$PY" -m pytest tests/test_long_rows.py \
        -q -p no:cacheprovider -k "cuda and (128256 or 60001)" >"$OUT/clusters-$tool.log" 2>&1
    echo "$tool exit status $?" | tee -a "$LOG"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|Invalid|passed|failed" "$OUT/clusters-$tool.log" | head -n 10 \
        | tee -a "$LOG"
  done
fi

if want reuse; then
  # The streamed long rows of forward_with_grad (read, reduced, read again),
  # next to a copy of the logits (time_rows), clusters off so that the
  # float32 rows stream too: at the default block widths (384 threads a row
  # for 16-bit rows, 768 for float32, chosen from session 28's 256/384/768
  # sweep; FUSED_CE_CUDA_STREAM_BLOCK forces one), loading into registers
  # (FUSED_CE_CUDA_STREAM_STAGES=0), by default (16-bit rows through a ring
  # of 3 steps in shared memory, cp.async: more bytes in flight per thread;
  # float32 rows in registers), then with the ring forced for every row
  # (FUSED_CE_CUDA_STREAM_STAGES=3) at the default widths and at 768, each
  # after the long-row tests under that setting.
  stage "streamed rows: shared-memory stages" | tee -a "$LOG"
  rows=${REUSE_ROWS:-16384x128256:bf16,8192x256000:bf16,4096x128256:fp32}
  for stages in 0 default; do
    echo "FUSED_CE_CUDA_STREAM_STAGES=$stages" | tee -a "$LOG"
    ( [ "$stages" = default ] || export FUSED_CE_CUDA_STREAM_STAGES=$stages
      FUSED_CE_CUDA_CLUSTERS=0 time_rows "$rows" "stages-$stages" )
  done
  for threads in default 768; do
    echo "FUSED_CE_CUDA_STREAM_STAGES=3 FUSED_CE_CUDA_STREAM_BLOCK=$threads" | tee -a "$LOG"
    ( export FUSED_CE_CUDA_CLUSTERS=0 FUSED_CE_CUDA_STREAM_STAGES=3
      [ "$threads" = default ] || export FUSED_CE_CUDA_STREAM_BLOCK=$threads
      timeout 120 "$PY" -m pytest tests/test_long_rows.py -q -p no:cacheprovider -k cuda 2>&1 | tail -n 1 | tee -a "$LOG"
      time_rows "$rows" "stages-3-$threads" )
  done
  # Each thread reads back only its own ring slots, so no barrier guards
  # them; the CPU emulator runs a thread's whole pass at once and cannot see
  # two threads sharing a slot. racecheck can.
  if [ "${EXPERIMENT_SANITIZE:-1}" = 1 ]; then
    FUSED_CE_CUDA_CLUSTERS=0 FUSED_CE_CUDA_STREAM_STAGES=3 timeout 120 compute-sanitizer --tool racecheck \
        --error-exitcode 9 "$PY" -m pytest tests/test_long_rows.py -q -p no:cacheprovider -k "cuda and (128256 or 270000)" \
        >/tmp/stages-racecheck.log 2>&1
    echo "racecheck (stages) exit status $?" | tee -a "$LOG"
    grep -E "RACECHECK SUMMARY|hazard|passed|failed" /tmp/stages-racecheck.log | head -n 5 | tee -a "$LOG"
  fi
fi

if want warprows; then
  # Rows of 129-256 body slots held by one warp of 8 slots a lane
  # (FUSED_CE_CUDA_WARP_ROWS=8, an experiment) against the default block of
  # 128 threads: the parity tests under the switch, then, alternating twice,
  # float32 rows of 1000 and 768 classes and bfloat16 rows of 2048 (all
  # affected) next to bfloat16 rows of 1000 (one warp of 4 slots either way:
  # the control), each next to a copy of the logits (time_rows).
  stage "warp rows" | tee -a "$LOG"
  FUSED_CE_CUDA_WARP_ROWS=8 timeout 150 "$PY" -m pytest tests/test_parity.py tests/test_special_values.py -q \
      -p no:cacheprovider -k cuda 2>&1 | tail -n 1 | tee -a "$LOG"
  switch_rows FUSED_CE_CUDA_WARP_ROWS 8 "${WARP_ROWS:-65536x1000:fp32,32768x768:fp32,16384x2048:bf16,65536x1000:bf16}" warp
fi

if want prefetch; then
  # Rows one block of 128 or more threads holds, read through a persistent
  # grid that stages each block's next row in shared memory while it reduces
  # and writes the current one (FUSED_CE_CUDA_RESIDENT_PREFETCH=1, an
  # experiment) against the plain kernel: the tests of such rows under the
  # switch (test_more_long_rows_than_the_gpu_runs_at_once gives each block
  # several rows), a racecheck of the staging (each thread reads back only
  # its own slots: no barrier guards them), then,
  # alternating twice, the two rows furthest from the copy on the H200
  # (8192 x 32000 fp32: 1024 threads, 1.65x; 16384 x 50304 bf16: 896, 2.22x)
  # and 65536 x 1000 float32 (128 threads: 2.23x), each next to a copy of
  # the logits (time_rows).
  stage "prefetched resident rows" | tee -a "$LOG"
  FUSED_CE_CUDA_RESIDENT_PREFETCH=1 timeout 150 "$PY" -m pytest tests/test_parity.py tests/test_hardening.py \
      tests/test_long_rows.py -q -p no:cacheprovider -k "cuda and (more_long_rows or vocab or resident or long_rows)" \
      -rfE 2>&1 | tail -n 10 | cut -c1-300 | tee -a "$LOG"
  if [ "${EXPERIMENT_SANITIZE:-1}" = 1 ]; then
    FUSED_CE_CUDA_RESIDENT_PREFETCH=1 timeout 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
        "$PY" -m pytest tests/test_parity.py -q -p no:cacheprovider -k "cuda and more_long_rows and (32000 or 50257)" \
        >/tmp/prefetch-racecheck.log 2>&1
    echo "racecheck (prefetch) exit status $?" | tee -a "$LOG"
    grep -E "RACECHECK SUMMARY|hazard|passed|failed" /tmp/prefetch-racecheck.log | head -n 5 | tee -a "$LOG"
  fi
  switch_rows FUSED_CE_CUDA_RESIDENT_PREFETCH 1 "${PREFETCH_ROWS:-8192x32000:fp32,16384x50304:bf16,65536x1000:fp32}" prefetch
fi

if want wide; then
  # The 65536 x 10 step's two reductions (total_weight, reduce_loss) in one
  # block of 1024 threads each (FUSED_CE_CUDA_WIDE_REDUCTIONS=1, an
  # experiment: a forward of three launches instead of five) against their
  # partials: the tests of those sizes under the switch, each kernel of the
  # step with its device time without and with it (step_kernels.py; eager's
  # and torch.compile's too the first time), then, alternating twice, the
  # step launched and replayed from a CUDA graph, next to eager and a copy
  # (time_rows).
  stage "wide reductions" | tee -a "$LOG"
  FUSED_CE_CUDA_WIDE_REDUCTIONS=1 timeout 150 "$PY" -m pytest tests/test_reduce_loss.py tests/test_parity.py -q \
      -p no:cacheprovider -k "cuda and (many_rows_of_few or reduce_loss)" -rfE 2>&1 | tail -n 5 | cut -c1-300 \
      | tee -a "$LOG"
  timeout 150 "$PY" benchmarks/step_kernels.py --rows 65536 --classes 10 2>&1 | tee -a "$LOG"
  echo "FUSED_CE_CUDA_WIDE_REDUCTIONS=1:" | tee -a "$LOG"
  FUSED_CE_CUDA_WIDE_REDUCTIONS=1 timeout 150 "$PY" benchmarks/step_kernels.py --rows 65536 --classes 10 \
      --no-compile 2>&1 | tee -a "$LOG"
  MODES=fwd+bwd,graphed IMPLS=fused_ce,eager,copy switch_rows FUSED_CE_CUDA_WIDE_REDUCTIONS 1 \
      "${WIDE_ROWS:-65536x10:fp32,65536x10:bf16}" wide
fi

if want fold; then
  # Logits stored class axis last and passed through a transpose, (B, T, V)
  # -> (B, V, T), and channels-last images: their positions fold into rows
  # (ce::fold_positions, the default since session 35, not timed before)
  # against one thread per position and a copy of the gradient into the
  # result's layout (FUSED_CE_CUDA_FOLD_POSITIONS=0), next to eager and a
  # copy, alternating twice (time_rows).
  stage "positions folded into rows" | tee -a "$LOG"
  IMPLS=fused_ce,eager,copy ROWS_ARGS=--class-last switch_rows FUSED_CE_CUDA_FOLD_POSITIONS 0 \
      "${FOLD_ROWS:-8x32000x1024:bf16,4x21x256x256:fp32}" fold
fi

if want percall; then
  # What each step costs the host (the 10-class rows are bound by it).
  stage "per-call cost" | tee -a "$LOG"
  for rows in 4 65536; do
    timeout 120 "$PY" benchmarks/per_call_cost.py --device cuda --rows "$rows" --steps 2000 --rounds 3 \
        2>&1 | tee -a "$LOG"
  done
  # The per-element node (a masked step).
  timeout 120 "$PY" benchmarks/per_call_cost.py --device cuda --rows 4 --reduction none --steps 2000 \
      --rounds 3 2>&1 | tee -a "$LOG"
  # (The device's side, each kernel of a 65536 x 10 step with its time: the
  # wide stage.)
fi

if want graphed; then
  # The classifier workloads (65536 x 10 and x 1000), whose fwd+bwd times
  # the host's launches, also with the step replayed from CUDA graphs (the
  # kernels alone), next to the launched step; peers whose step cannot be
  # captured say so. About 1.5 minutes (torch.compile's warm-ups included).
  stage "graphed steps" | tee -a "$LOG"
  timeout "${GRAPHED_TIMEOUT:-150}" "$PY" -m fused_ce.bench --device cuda --out /tmp/graphed \
      --filter 'cls-*' --modes fwd+bwd,graphed --max-time 0.5 --no-memory --no-plot 2>&1 \
      | grep -v "^\[" | tail -n 50 | tee -a "$LOG"
fi

if want bench; then
  stage benchmarks | tee -a "$LOG"
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-240}" "$PY" -m fused_ce.bench --device cuda --out "$OUT/bench" \
      ${BENCH_ARGS:---filter lm-32k-fp32,lm-128k-bf16,cls-10-fp32 --modes fwd+bwd --max-time 1} 2>&1 \
      | grep -v "^\[" | tail -n 60 | tee -a "$LOG"
fi

if want profile; then
  # Nsight Compute on the row kernels whose speed is not understood
  # (csrc/cuda/README.md, "Known limits"): one block per bf16 row of 32000
  # classes (1024 threads x 4 slots since session 26; 512 x 8 was at 24%
  # occupancy) against one 1024-thread block per fp32 row of 32000 (1.29x the
  # copy), bf16 rows of 128256 classes in clusters of 8 (1.90x) and streamed
  # in 384-thread blocks (1.54x), loading into registers and through the
  # shared-memory ring (FUSED_CE_CUDA_STREAM_STAGES=3: do the loads still
  # stall the warps?). One launch each of the forward_with_grad kernel (-k
  # regex).
  stage "profile (ncu)" | tee -a "$LOG"
  for case in "0 bfloat16 32000 resident 256" "1 float32 32000 resident 256" "1 bfloat16 128256 resident 256" \
      "0 bfloat16 128256 forward_stream 384 0" "0 bfloat16 128256 forward_stream 384 3"; do
    set -- $case
    echo "FUSED_CE_CUDA_CLUSTERS=$1 FUSED_CE_CUDA_STREAM_BLOCK=$5 FUSED_CE_CUDA_STREAM_STAGES=${6:-0} $2 x $3 classes, kernel $4" | tee -a "$LOG"
    FUSED_CE_CUDA_CLUSTERS=$1 FUSED_CE_CUDA_STREAM_BLOCK=$5 FUSED_CE_CUDA_STREAM_STAGES=${6:-0} timeout 120 ncu -k "regex:$4" --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        "$PY" -c "import torch, fused_ce
x = torch.randn(4096, $3, device='cuda', dtype=torch.$2, requires_grad=True)
t = torch.randint(0, $3, (4096,), device='cuda')
fused_ce.cross_entropy(x, t).backward(); torch.cuda.synchronize()" >/tmp/profile.txt 2>&1
    echo "ncu exit status $?" | tee -a "$LOG"
    { echo "=== FUSED_CE_CUDA_CLUSTERS=$1 FUSED_CE_CUDA_STREAM_BLOCK=$5 FUSED_CE_CUDA_STREAM_STAGES=${6:-0} $2 x $3 classes, kernel $4"; cat /tmp/profile.txt; } >>"$OUT/profile.txt"
    grep -E "Duration|Memory Throughput|DRAM Throughput|L2 Hit|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit|Executed Ipc|Issue Slots Busy|Warp Cycles Per Issued|Stall" \
        /tmp/profile.txt | head -n 30 | tee -a "$LOG"
  done
fi

if want sanitize; then
  # memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory
  # hazards of the block reductions.  Kernels run many times slower under
  # them, so each runs over a few test files, within its own time limit
  # (without the test that makes a kernel assert on the device on purpose,
  # which memcheck counts as errors; MEMCHECK_SELECT replaces the -k
  # expression).
  stage "compute-sanitizer memcheck" | tee -a "$LOG"
  timeout "${SANITIZE_TIMEOUT:-90}" compute-sanitizer --tool memcheck --error-exitcode 9 \
      "$PY" -m pytest tests/test_special_values.py tests/test_errors.py tests/test_scale_gradient.py \
      tests/test_inplace_backward.py -q -p no:cacheprovider -k "${MEMCHECK_SELECT:-cuda and not large and not asserts_on_the_device}" >/tmp/memcheck.log 2>&1
  echo "memcheck exit status $?" | tee -a "$LOG"
  grep -E "ERROR SUMMARY|Invalid|passed|failed" /tmp/memcheck.log | head -n 20 | tee -a "$LOG"
  cat /tmp/memcheck.log >>"$OUT/sanitize.log"
  stage "compute-sanitizer racecheck" | tee -a "$LOG"
  timeout "${RACECHECK_TIMEOUT:-60}" compute-sanitizer --tool racecheck --error-exitcode 9 \
      "$PY" -m pytest tests/test_parity.py -q -p no:cacheprovider -k "cuda and vocab" >/tmp/racecheck.log 2>&1
  echo "racecheck exit status $?" | tee -a "$LOG"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|passed|failed" /tmp/racecheck.log | head -n 20 | tee -a "$LOG"
  cat /tmp/racecheck.log >>"$OUT/sanitize.log"
fi
results=$(ls "$OUT/bench/results.json" /tmp/graphed/results.json 2>/dev/null)
if [ -n "$results" ]; then
  # The cuda issue's targets against what the bench and graphed stages measured.
  stage targets | tee -a "$LOG"
  # shellcheck disable=SC2086
  "$PY" benchmarks/check_targets.py $results 2>&1 | tee -a "$LOG"
fi
stage done | tee -a "$LOG"
