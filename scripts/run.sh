#!/usr/bin/env bash
# The project's main job, in the environment scripts/setup_env.sh makes (and reuses).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"

# The main job: the copy benchmark for now, the ResNet-50 pipeline example later.
python benchmarks/copy_bench.py --max-bytes 16M "$@"
