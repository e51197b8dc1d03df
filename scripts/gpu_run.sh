#!/usr/bin/env bash
# One prepared run on a machine with an NVIDIA GPU and no network: builds pymaml's extension in place
# against the torch found there (sm_90 only, to keep the build short), reports what was built, runs
# the CUDA tests, the kernel benchmark, the whole test suite, and the engine / side-by-side
# benchmarks when present, all with --device cuda. Every stage has its own log and time limit; a
# failing stage does not stop the others. Everything lands as flat files in $OUT (at most 8):
#
#   gpu_log.txt        machine, versions, each stage's command, exit status, time and log tail
#   build.log          the extension build
#   test_cuda.log      pytest tests/test_cuda.py tests/test_batch_norm.py tests/test_host_prep.py
#   kernels.md         benchmarks/bench_kernels.py --device cuda, then bench_batch_norm.py --device cuda
#   sanitize.log       compute-sanitizer memcheck, then racecheck, over tests/test_cuda.py (pymaml's kernels)
#   test_all.log       pytest -k cuda over the rest of the suite (stage test_gpu), or the whole non-slow
#                      suite (stage test_all, not in the default list)
#   engine.md          benchmarks/bench_engine.py --device cuda            (if present)
#   side_by_side.md    benchmarks/side_by_side.py --device cuda            (if present)
#   results.tar.gz     files written under benchmarks/results/ during this run (plots, tables)
#
# Usage:  scripts/gpu_run.sh [stage ...]        default: all stages, in this order:
#           env build info test_cuda sanitize test_gpu kernels engine peers side_by_side results
#         A failed build ends the run (KEEP_GOING=1 runs the other stages anyway).
# Environment:
#   OUT               output folder (default ./gpu_out)
#   GPU_RUN_BUDGET_S  wall-clock budget for the whole script in seconds (default 560); a stage gets
#                     min(its own limit, what is left) and is skipped when less than 20 s remain
#   PYTHON            interpreter (default python3)
#   TEST_CUDA_ARGS    extra pytest arguments for the test_cuda stage (e.g. a --deselect)
#   KERNELS_ARGS, ENGINE_ARGS, SBS_ARGS   extra arguments for bench_kernels.py, bench_engine.py and
#                     side_by_side.py (e.g. SBS_ARGS="--quick"); a benchmark without a --device
#                     option is not run (it would measure the CPU)
# Offline extras (carry them along; build/ is git-ignored):
#   build/gpu_wheels/        wheels for pytest (pytest, pluggy, iniconfig), installed with --no-index
#                            if pytest is missing: pip download --no-deps -d build/gpu_wheels pytest pluggy iniconfig
#   build/gpu_wheels/peers/  benchmarks/install_peers.sh --download-only build/gpu_wheels/peers
# A second call on the same machine skips the build when csrc/ and setup.py are unchanged.
set -u -o pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET_S:-560}
START=$(date +%s)
STAGES=("$@")
if [[ ${#STAGES[@]} -eq 0 ]]; then
  STAGES=(env build info test_cuda sanitize test_gpu kernels engine peers side_by_side results)
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
export PYMAML_FORCE_CUDA=${PYMAML_FORCE_CUDA:-1}  # a CUDA build failure must show, not fall back
export PYTHONUNBUFFERED=1
if [[ -z ${CUDA_HOME:-} ]]; then
  if [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    export CUDA_HOME
  fi
fi

say() { echo "$*" | tee -a "$LOG"; }

# stage NAME LIMIT_S LOGFILE CMD...: runs CMD with a time limit, output to LOGFILE, summary and the
# log's tail to $LOG. LOGFILE "-": the whole output goes into $LOG.
stage() {
  local name=$1 limit=$2 logfile=$3 whole=0
  shift 3
  if [[ $logfile == - ]]; then
    logfile=$(mktemp)
    whole=1
  fi
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  local t=$((limit < left ? limit : left))
  if ((t < 20)); then
    say "== [$name] SKIPPED: ${left}s of the ${BUDGET}s budget left"
    return 0
  fi
  say "== [$name] $(date -u +%H:%M:%S) limit ${t}s: $*"
  local s rc
  s=$(date +%s)
  timeout --signal=TERM --kill-after=15 "$t" "$@" >>"$logfile" 2>&1
  rc=$?
  local verdict=ok
  ((rc == 124 || rc == 137)) && verdict="TIMED OUT"
  ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
  if ((whole)); then
    say "== [$name] $verdict rc=$rc in $(($(date +%s) - s))s"
    sed 's/^/    /' "$logfile" >>"$LOG"
    rm -f "$logfile"
  else
    say "== [$name] $verdict rc=$rc in $(($(date +%s) - s))s (full log: $(basename "$logfile"))"
    tail -n 25 "$logfile" | sed 's/^/    /' >>"$LOG"
  fi
  return 0
}

src_hash() {
  find csrc setup.py pyproject.toml -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' \
    -o -name '*.py' -o -name '*.toml' \) -print0 | sort -z | xargs -0 cat | sha256sum | cut -d' ' -f1
}

do_env() {
  echo "date: $(date -u)"
  echo "host: $(hostname)"
  nvidia-smi || true
  nvcc --version || true
  echo "CC=${CC:-} CXX=${CXX:-}"; ${CXX:-c++} --version | head -n 1; file -L "$(command -v "${CXX:-c++}")" 2>/dev/null
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  $PY - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device 0:", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}{p.minor}",
          "SMs", p.multi_processor_count)
EOF
  $PY -c "import pytest; print('pytest', pytest.__version__)" 2>&1 || true
  $PY -c "import setuptools; print('setuptools', setuptools.__version__)" 2>&1 || true
  command -v ninja && ninja --version
}

# A C++ compiler that links shared libraries against the shared libstdc++ (as torch is): a wrapper
# that adds -static-libstdc++ gives the extension a second copy of the library, and formatting a
# number into an error message then crashes (seen on a device image whose CXX was such a wrapper).
pick_compiler() {
  local t; t=$(mktemp -d)
  printf '#include <sstream>\n#include <string>\nstd::string f(unsigned long n) { std::ostringstream s; s << n; return s.str(); }\n' >"$t/t.cpp"
  local c
  for c in "${CXX:-c++}" /usr/bin/g++ /usr/bin/c++ $(compgen -c g++- | sort -u | sed 's|^|/usr/bin/|'); do
    [[ -x $(command -v "$c" 2>/dev/null) ]] || continue
    if "$c" -shared -fPIC -o "$t/t.so" "$t/t.cpp" 2>/dev/null && readelf -d "$t/t.so" | grep -q 'libstdc++'; then
      if [[ $c != "${CXX:-c++}" ]]; then
        echo "CXX=${CXX:-c++} links libstdc++ statically; using $c"
        export CXX=$c CC=${c%++}cc
        [[ $c == */g++* ]] && CC=${c/g++/gcc}
        export CC
      fi
      echo "C++ compiler: ${CXX:-c++} ($("${CXX:-c++}" -dumpfullversion 2>/dev/null)), C compiler: ${CC:-cc}"
      rm -rf "$t"; return 0
    fi
  done
  echo "no C++ compiler here links libstdc++ dynamically; setup.py will refuse to build"
  rm -rf "$t"
}

do_build() {
  pick_compiler
  local stamp=build/gpu_run.stamp hash
  hash=$(src_hash)
  if compgen -G "pymaml/_C*.so" >/dev/null && [[ -f $stamp && $(cat "$stamp") == "$hash" ]]; then
    echo "extension up to date (sources unchanged since the last build on this machine); not rebuilding"
    return 0
  fi
  rm -f pymaml/_C*.so "$stamp"
  local s=$(date +%s)
  if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .; then
    echo "pip install -e . failed; trying python setup.py build_ext --inplace"
    $PY setup.py build_ext --inplace || return 1
  fi
  echo "build took $(($(date +%s) - s))s"
  compgen -G "pymaml/_C*.so" >/dev/null || { echo "no pymaml/_C*.so after the build"; return 1; }
  mkdir -p build && echo "$hash" >"$stamp"
}

do_info() {
  $PY -m pymaml.info || $PY -c "import pymaml; print('backend', pymaml.backend(), '-', pymaml.backend_reason())"
  $PY - <<'EOF'
import torch
import pymaml  # noqa: F401  (loads the extension if it was built)
ops = ["sgd_update", "sgd_update_lrs", "sgd_update_", "sgd_update_lrs_", "backward_step", "fd_perturb",
       "fd_quotient", "global_norm", "clip_grad_norm_", "linear_head_hvp", "batch_norm", "batch_norm_backward",
       "batch_norm_double_backward", "convolution", "convolution_backward"]
for op in ops:
    try:
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"pymaml::{op}", "CUDA")
    except RuntimeError as e:
        cuda = f"no schema ({str(e).splitlines()[0]})"
    print(f"pymaml::{op:18s} CUDA kernel: {cuda}")
EOF
}

ensure_pytest() {
  $PY -c "import pytest" 2>/dev/null && return 0
  if [[ -d build/gpu_wheels ]]; then
    say "pytest missing: installing from build/gpu_wheels"
    $PY -m pip install --no-index --no-deps --find-links build/gpu_wheels pytest pluggy iniconfig >>"$LOG" 2>&1
  else
    say "pytest missing and no build/gpu_wheels folder: test stages will fail"
  fi
}

# compute-sanitizer over tests/test_cuda.py, checking pymaml's own kernels only (kernel names hold
# "pymaml"; checking every torch kernel too would take the whole budget). The caching allocator is off
# so that an out-of-bounds access lands outside any allocation and memcheck sees it. Exit status 99
# means the sanitizer reported an error; anything else non-zero is pytest's own status.
do_sanitize() {
  local cs
  cs=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  [[ -x $cs ]] || { echo "compute-sanitizer not found"; return 1; }
  "$cs" --version | tail -n 1
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  # racecheck looks at shared memory, which only the block reductions use (norms, the step-size
  # gradient of backward_step, the loss heads): it runs over those tests.
  local rc=0 tool
  for tool in memcheck racecheck; do
    # Graph capture needs the caching allocator (cudaMalloc is refused while a stream captures), so
    # the graph tests run in test_cuda only; so does the error-message test, which launches nothing.
    local sel=(-k "not graph and not errors_name_op")
    [[ $tool == racecheck ]] && sel=(-k "(norm or backward_step or clip or head) and not graph")
    echo "---- $tool ${sel[*]}"
    local s=$(date +%s)
    timeout --signal=TERM --kill-after=10 "${SANITIZE_TOOL_S:-110}" \
      "$cs" --tool "$tool" --kernel-name kns=pymaml --error-exitcode 99 --print-limit 30 \
      $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda.py "${sel[@]}"
    local r=$?
    echo "---- $tool: exit status $r in $(($(date +%s) - s))s"
    ((r != 0)) && rc=$r
  done
  return $rc
}

# Each mixed-device call of the raw ops in its own process (a crash ends only that one), then the
# first under cuda-gdb for a host backtrace if it crashes.
do_mixed() {
  local calls=(
    "torch.ops.pymaml.sgd_update([c], [h], 0.1, 0.0)"
    "torch.ops.pymaml.sgd_update([c.requires_grad_()], [h], 0.1, 0.0)"
    "torch.ops.pymaml.sgd_update([c], [c, c], 0.1, 0.0)"
    "torch.ops.pymaml.sgd_update_lrs([c], [h], [torch.tensor(0.1, device='cuda')], 0.0)"
    "torch.ops.pymaml.sgd_update_([c], [h], 0.1, 0.0, None)"
    "torch.ops.pymaml.backward_step([c], [c], [c], [h], [], 0.0, False)"
    "torch.ops.pymaml.global_norm([c, h])"
  )
  local call r
  for call in "${calls[@]}"; do
    $PY -X faulthandler -c "import torch, pymaml
c = torch.randn(3, device='cuda'); h = torch.randn(3)
try:
    $call
    print('no error')
except Exception as e:
    print(type(e).__name__, str(e).splitlines()[0])" >/tmp/mixed.out 2>&1
    r=$?
    echo "[$r] $call -> $(tail -n 4 /tmp/mixed.out | head -c 600 | tr '\n' ' ')"
  done
  command -v cuda-gdb >/dev/null || { echo "no cuda-gdb"; return 0; }
  cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args $PY -c "import torch, pymaml
c = torch.randn(3, device='cuda'); h = torch.randn(3)
try:
    ${calls[0]}
except Exception as e:
    print(type(e).__name__, e)" 2>&1 | grep -v "^\[New Thread\|^\[Thread .* exited" | tail -n 60
}

bench() {  # bench SCRIPT LIMIT_S OUTFILE EXTRA_ARGS: benchmarks/SCRIPT --device cuda EXTRA_ARGS
  local script=benchmarks/$1
  if [[ ! -f $script ]]; then
    say "== [$1] ABSENT: $script does not exist"
    return 0
  fi
  if ! grep -q -- '"--device"' "$script"; then
    say "== [$1] NOT RUN: $script has no --device option (it would run on the CPU)"
    return 0
  fi
  # shellcheck disable=SC2086
  stage "$1" "$2" "$OUT/$3" $PY "$script" --device cuda $4
}

# Stage bodies run under `timeout`, i.e. in a child bash.
export PY ROOT
export -f src_hash pick_compiler do_build do_info do_sanitize do_mixed
START_MARK=$(mktemp)
say "gpu_run.sh: stages ${STAGES[*]}; budget ${BUDGET}s; repo $ROOT; OUT $OUT"
for st in "${STAGES[@]}"; do
  case $st in
    env) do_env >>"$LOG" 2>&1 ;;
    build)
      stage build 420 "$OUT/build.log" bash -c do_build
      if ! compgen -G "pymaml/_C*.so" >/dev/null && [[ ${KEEP_GOING:-0} != 1 ]]; then
        say "== no extension was built: stopping here (KEEP_GOING=1 runs the other stages anyway)"
        break
      fi ;;
    info) stage info 90 - bash -c do_info ;;
    test_cuda)
      ensure_pytest
      stage test_cuda 240 "$OUT/test_cuda.log" $PY -m pytest -v -rs --durations=15 -p no:cacheprovider tests/test_cuda.py tests/test_batch_norm.py tests/test_host_prep.py ${TEST_CUDA_ARGS:-} ;;
    kernels)
      bench bench_kernels.py 180 kernels.md "${KERNELS_ARGS:-}"
      bench bench_batch_norm.py 90 kernels.md "" ;;
    mixed) stage mixed 90 - bash -c do_mixed ;;
    sanitize) stage sanitize 240 "$OUT/sanitize.log" bash -c do_sanitize ;;
    test_gpu)
      ensure_pytest
      stage test_gpu 300 "$OUT/test_all.log" $PY -m pytest -q -rs -m "not slow" -k cuda --durations=20 -p no:cacheprovider \
        --ignore tests/test_cuda.py tests ;;
    test_all)
      ensure_pytest
      stage test_all 420 "$OUT/test_all.log" $PY -m pytest -q -rs -m "not slow" --durations=20 -p no:cacheprovider tests ;;
    engine) bench bench_engine.py 240 engine.md "${ENGINE_ARGS:-}" ;;
    peers)
      if [[ -d build/gpu_wheels/peers ]]; then
        stage peers 120 - bash benchmarks/install_peers.sh --from build/gpu_wheels/peers
      else
        say "== [peers] no build/gpu_wheels/peers folder: peers not installed (side_by_side reports them missing)"
      fi ;;
    side_by_side) bench side_by_side.py 420 side_by_side.md "${SBS_ARGS:-}" ;;
    results)
      if [[ -d benchmarks/results ]]; then
        files=$(find benchmarks/results -type f -newer "$START_MARK" | sort)
        if [[ -n $files ]]; then
          # shellcheck disable=SC2086
          tar czf "$OUT/results.tar.gz" $files && say "== [results] $(echo "$files" | wc -l) files in results.tar.gz"
        else
          say "== [results] nothing new under benchmarks/results"
        fi
      fi ;;
    *) say "== [$st] unknown stage (known: env build info mixed test_cuda sanitize test_gpu test_all kernels engine peers side_by_side results)" ;;
  esac
done
rm -f "$START_MARK"
say "gpu_run.sh: done in $(($(date +%s) - START))s"
