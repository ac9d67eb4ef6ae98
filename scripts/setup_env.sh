#!/usr/bin/env bash
# Sets up everything shardpipe needs, and does nothing that is already done:
#   - .venv in the repository root (made with $PYTHON, default python3, when missing);
#   - the pinned torch/torchvision pair (scripts/pick_torch.py: 2.14.1/0.29.1 where those
#     wheels are on this disk, else 2.13.0+cpu/0.28.0+cpu where those are, else
#     2.14.1/0.29.1 downloaded), installed only when that exact pair is not there yet;
#   - the test/benchmark tools (pytest, ruff, clang-format, ninja, ...), only the missing ones;
#   - shardpipe._C built in place (python/shardpipe/_C*.so; ninja recompiles only what
#     changed) and a .pth file so that the venv's python imports shardpipe from python/.
# Usage: bash scripts/setup_env.sh   (MAX_JOBS=N sets the compile jobs, default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
cd "$ROOT"

if [ ! -x "$PY" ]; then
  echo "setup_env: creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# ninja, cmake and the compilers torch's build helpers call are looked up on PATH.
export PATH="$VENV/bin:$PATH"

installed_version() {  # prints the installed version of a distribution, or nothing
  "$PY" - "$1" <<'PYEOF'
import sys
from importlib import metadata
try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PYEOF
}

PAIR="$("$PY" scripts/pick_torch.py)"
read -r TORCH_REQ VISION_REQ <<<"$PAIR"
if [ "$(installed_version torch)" = "${TORCH_REQ#torch==}" ] &&
  [ "$(installed_version torchvision)" = "${VISION_REQ#torchvision==}" ]; then
  echo "setup_env: $TORCH_REQ $VISION_REQ already installed"
else
  echo "setup_env: installing $TORCH_REQ $VISION_REQ"
  "$PY" -m pip install "$TORCH_REQ" "$VISION_REQ"
fi

TOOLS=(setuptools wheel packaging pytest pytest-timeout expecttest hypothesis ninja tqdm
  matplotlib ruff clang-format)
command -v cmake >/dev/null || TOOLS+=(cmake)
MISSING=()
for tool in "${TOOLS[@]}"; do
  [ -n "$(installed_version "$tool")" ] || MISSING+=("$tool")
done
if [ "${#MISSING[@]}" -gt 0 ]; then
  echo "setup_env: installing ${MISSING[*]}"
  "$PY" -m pip install "${MISSING[@]}"
fi

echo "setup_env: building shardpipe._C (MAX_JOBS=${MAX_JOBS:-2})"
MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py --quiet build_ext --inplace

# An in-place build, importable from the venv without a second (editable) build.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PTH="$SITE/shardpipe-dev.pth"
if [ "$(cat "$PTH" 2>/dev/null)" != "$ROOT/python" ]; then
  echo "$ROOT/python" >"$PTH"
fi
(cd / && "$PY" -c 'import shardpipe; print("setup_env: shardpipe", shardpipe.__version__, "from", shardpipe.__path__[0])')
