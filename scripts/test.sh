#!/usr/bin/env bash
# Every test: pytest (tests/python, and tests/stress at CI's sizes; SHARDPIPE_STRESS_LONG=1 for
# the long variants), then the GoogleTest suite (tests/cpp) built with CMake
# in build/cmake and run by ctest. Both run even if the first fails; the exit status is
# non-zero when anything failed. Sets up what it needs itself: the venv and build
# (scripts/setup_env.sh), and GoogleTest's sources (apt-get, as root or with sudo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
PY="$ROOT/.venv/bin/python"

# The C++ suite builds GoogleTest from its sources with torch's ABI flags: Debian's
# libgtest-dev ships them in /usr/src/googletest (GTEST_SOURCE_DIR points elsewhere).
# ninja comes with the venv, and CMake too where the system has none (scripts/setup_env.sh).
GTEST_SOURCE_DIR="${GTEST_SOURCE_DIR:-/usr/src/googletest}"
if [ ! -f "$GTEST_SOURCE_DIR/CMakeLists.txt" ]; then
  echo "test.sh: installing GoogleTest's sources (Debian's libgtest-dev)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if ! { $sudo apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      libgtest-dev; }; then
    echo "test.sh: could not install libgtest-dev (needs root or passwordless sudo);" \
      "install it, or set GTEST_SOURCE_DIR to GoogleTest's sources" >&2
    exit 1
  fi
fi

failed=()

echo "== pytest tests/python tests/stress (at ${SECONDS} s)"
"$PY" -m pytest tests/python tests/stress "$@" || failed+=(pytest)

# SHARDPIPE_SANITIZE=address (or thread) builds and runs the C++ suite under that sanitizer,
# in a build folder of its own.
SANITIZE="${SHARDPIPE_SANITIZE:-}"
BUILD="build/cmake${SANITIZE:+-$SANITIZE}"
echo "== GoogleTest (tests/cpp) through CMake and ctest${SANITIZE:+, under ${SANITIZE}sanitizer} (at ${SECONDS} s)"
if cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$PY" \
  -DGTEST_SOURCE_DIR="$GTEST_SOURCE_DIR" -DSHARDPIPE_SANITIZE="$SANITIZE" &&
  cmake --build "$BUILD" -j "${MAX_JOBS:-2}" &&
  (cd "$BUILD" && ctest --output-on-failure); then
  :
else
  failed+=(ctest)
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all tests passed in ${SECONDS} s"
