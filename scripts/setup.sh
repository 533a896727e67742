#!/usr/bin/env bash
# One-command setup: a virtual environment with the right torch build, then raydiff and its
# test tools. Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv; ./raydiffw calls it)
# PYTHON picks the interpreter (default python3), RAYDIFF_TORCH the torch requirement.
#
# torch is installed first and pinned, so that pip never swaps a CPU build for a multi-GB CUDA
# one: machines with an NVIDIA GPU get PyPI's CUDA build, machines without one a CPU build
# (a local CPU wheel in PIP_FIND_LINKS if there is one, else PyTorch's CPU index).
set -euo pipefail
VENV=${1:-.venv}
TORCH=${RAYDIFF_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip

local_cpu_wheel() {
  local dir
  for dir in ${PIP_FIND_LINKS:-}; do
    compgen -G "$dir/torch-${TORCH#torch==}+cpu-*.whl" >/dev/null && return 0
  done
  return 1
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  python -m pip install --quiet "$TORCH"
elif local_cpu_wheel; then
  python -m pip install --quiet "$TORCH"
else
  python -m pip install --quiet "$TORCH" --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install --quiet -e ".[test]"
python -c "import torch, ray, raydiff; print('raydiff ready: torch', torch.__version__, '| ray', ray.__version__)"
