#!/usr/bin/env bash
# The project's main job, in the environment scripts/setup_env.sh makes (and reuses).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export PATH="$ROOT/.venv/bin:$PATH"

# The main job: train torchvision's ResNet-50 as a pipeline and compare with one device.
python examples/resnet50_pipeline.py "$@"
