#!/usr/bin/env bash
# Every test: pytest (tests/python), then the GoogleTest suite (tests/cpp) built with CMake
# in build/cmake and run by ctest. Both run even if the first fails; the exit status is
# non-zero when anything failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"
PY="$ROOT/.venv/bin/python"

failed=()

echo "== pytest tests/python"
"$PY" -m pytest tests/python "$@" || failed+=(pytest)

echo "== GoogleTest (tests/cpp) through CMake and ctest"
if cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE="$PY" &&
  cmake --build build/cmake -j "${MAX_JOBS:-2}" &&
  (cd build/cmake && ctest --output-on-failure); then
  :
else
  failed+=(ctest)
fi

if [ "${#failed[@]}" -gt 0 ]; then
  echo "test.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test.sh: all tests passed"
