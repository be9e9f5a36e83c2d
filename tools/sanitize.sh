#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the test suite.
#
# Builds the extension with -fsanitize=address,undefined,float-cast-overflow
# -fno-omit-frame-pointer (CMake option FEDRECON_SANITIZE=ON; the default build is unchanged)
# into its own virtual environment and build folder, then runs pytest with libasan preloaded
# (the Python interpreter itself is not instrumented). Any ASan or UBSan report, in the test
# process or in a subprocess a test starts (CLI runs, crash-isolation tests), fails the run:
# reports go to log files that are checked at the end, so a finding cannot hide behind a test
# that only expects "a non-zero exit status".
#
# Usage:
#   tools/sanitize.sh                      # the whole test suite (tests/)
#   tools/sanitize.sh tests/test_fuzz.py   # any pytest arguments instead
#
# Environment:
#   PYTHON                   interpreter to create the venv from (default: python3)
#   FEDRECON_SANITIZE_DIR    work folder (default: build/sanitize): venv/, cmake/, logs/
#   FEDRECON_FUZZ_EXAMPLES   hypothesis examples per fuzz test (tests/test_fuzz.py)
#
# Exit status: 0 when the tests pass and no sanitizer reported anything, non-zero otherwise.
# Needs GCC or Clang with the sanitizer runtimes (Debian/Ubuntu: libasan and libubsan come
# with g++). The optional Ray and Flower tests skip (their extras are not installed here).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${FEDRECON_SANITIZE_DIR:-$ROOT/build/sanitize}
PY=${PYTHON:-python3}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

if [[ ! -x $WORK/venv/bin/python ]]; then
  "$PY" -m venv "$WORK/venv"
fi
VPY=$WORK/venv/bin/python

# Build requirements, runtime and test dependencies (read from pyproject.toml), then the package
# itself, instrumented. The build folder is kept, so a rebuild after a change is incremental.
"$VPY" -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.12"
"$VPY" -c 'import tomllib' 2>/dev/null || "$VPY" -m pip install --quiet tomli
mapfile -t DEPS < <("$VPY" -c '
try:
    import tomllib
except ImportError:
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
')
"$VPY" -m pip install --quiet "${DEPS[@]}"

# One dispatched target is instrumented: the one this machine runs (the others are the same
# sources compiled for other SIMD widths, and each instrumented build takes minutes).
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { for f in "$@"; do [[ " $FLAGS " == *" $f "* ]] || return 1; done; }
if has avx2 fma bmi2 f16c avx512f avx512bw avx512cd avx512dq avx512vl; then TARGET=avx512
elif has avx2 fma bmi2 f16c; then TARGET=avx2
else TARGET=baseline; fi
# RelWithDebInfo: -O2 -g and no stripping, so reports show file:line.
echo "sanitize: building the instrumented extension ($TARGET) in $WORK/cmake" >&2
start=$(date +%s)
"$VPY" -m pip install --quiet --no-build-isolation --force-reinstall --no-deps \
  -Cbuild-dir="$WORK/cmake" -Ccmake.build-type=RelWithDebInfo \
  -Ccmake.define.FEDRECON_SANITIZE=ON -Ccmake.define.FEDRECON_TARGETS=$TARGET "$ROOT"
echo "sanitize: build took $(( $(date +%s) - start )) s" >&2

CXX_FOR_RUNTIME=${CXX:-$(command -v g++ || command -v c++)}
LIBASAN=$("$CXX_FOR_RUNTIME" -print-file-name=libasan.so)
# libstdc++ is preloaded too: Python does not link it, and ASan's interceptor of __cxa_throw
# must find the real one at start-up or the first C++ exception aborts the process.
LIBSTDCXX=$("$CXX_FOR_RUNTIME" -print-file-name=libstdc++.so.6)
for lib in "$LIBASAN" "$LIBSTDCXX"; do
  if [[ ! -e $lib ]]; then
    echo "sanitize: $lib not found (via $CXX_FOR_RUNTIME -print-file-name)" >&2
    exit 2
  fi
done
PRELOAD="$LIBASAN $LIBSTDCXX"

# The tests must import the installed, instrumented extension. From the repository root the
# source tree's package is not importable (it lives in python/), but check anyway.
EXT=$(LD_PRELOAD=$PRELOAD ASAN_OPTIONS=detect_leaks=0 "$VPY" -c \
      "from fedrecon_fast._native import core as c; print(c.__file__)")
case $EXT in
  "$WORK"/venv/*) ;;
  *) echo "sanitize: the native module resolves to $EXT, not the venv's build" >&2; exit 2 ;;
esac
if ! ldd "$EXT" | grep libasan >/dev/null; then
  echo "sanitize: $EXT is not linked against libasan" >&2
  exit 2
fi

LOGS=$WORK/logs
rm -rf "$LOGS"
mkdir -p "$LOGS"
export LD_PRELOAD=$PRELOAD
# detect_leaks=0: CPython's own allocations at exit are not ours. allocator_may_return_null=1:
# a huge allocation becomes MemoryError (as without ASan) instead of an abort. Reports go to
# $LOGS (one file per process that found something).
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:halt_on_error=1:exitcode=86:log_path=$LOGS/asan:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=87:log_path=$LOGS/ubsan"
export PYTHONFAULTHANDLER=1

if [[ $# -eq 0 ]]; then
  set -- tests
fi
echo "sanitize: running pytest $* (ASan + UBSan; reports go to $LOGS)" >&2
start=$(date +%s)
status=0
"$VPY" -m pytest -q -p no:cacheprovider "$@" || status=$?
echo "sanitize: tests took $(( $(date +%s) - start )) s (pytest exit status $status)" >&2

# A report is a finding when it holds an ASan/UBSan error (runtime warnings such as "failed to
# allocate 0x... bytes", which tests of huge requests provoke on purpose, are shown, not fatal).
shopt -s nullglob
findings=0
for r in "$LOGS"/*; do
  if grep -qE "ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$r"; then
    findings=$((findings + 1))
    echo "===== finding: $r" >&2
    cat "$r" >&2
  else
    echo "===== warnings only ($(wc -l < "$r") lines): $r" >&2
    sort "$r" | uniq -c | sed 's/^/  /' | head -5 >&2
  fi
done
if (( findings )); then
  echo "sanitize: FAILED: $findings sanitizer finding(s)" >&2
  exit 1
fi
if (( status != 0 )); then
  echo "sanitize: FAILED: the tests failed (pytest exit status $status)" >&2
  exit "$status"
fi
echo "sanitize: clean (no ASan/UBSan findings)" >&2
