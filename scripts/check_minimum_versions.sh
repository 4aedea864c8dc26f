#!/usr/bin/env bash
# Installs the lowest version every medflare pin allows (setup.cfg: install_requires and the demo,
# tracking and test extras) into a fresh virtual environment, checks it with `pip check`, and runs
# the unit tests there: a pin that is looser than the APIs medflare uses fails here.
#
#   bash scripts/check_minimum_versions.sh [VENV_DIR [TEST_PATH ...]]
#       VENV_DIR defaults to .venv-minimum, the tests to tests/unit (CI runs the parts that call
#       the pinned libraries: training, transport, data, executors, filters, accounting)
#
# torch is the exception: its lowest allowed release (2.3) ships on PyPI only as a CUDA build of
# several GB. The environment gets TORCH_SPEC (default torch==2.13.0, the CPU build this project
# installs); set TORCH_SPEC=torch==2.3.0 on a machine that can take the CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv-minimum}
shift || true
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(tests/unit)
python=${PYTHON:-python3}
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet "${TORCH_SPEC:-torch==2.13.0}"
mapfile -t minimums < <("$venv/bin/python" - <<'PY'
import configparser, re
config = configparser.ConfigParser()
config.read("setup.cfg")
lines = config["options"]["install_requires"].splitlines()
for extra in ("demo", "tracking", "test"):
    lines += config["options.extras_require"][extra].splitlines()
seen = set()
for line in lines:
    line = line.split("#", 1)[0].strip()
    match = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)", line)
    if not match or match.group(1).lower() in seen or match.group(1).lower() == "torch":
        continue
    seen.add(match.group(1).lower())
    print(f"{match.group(1)}=={match.group(2)}")
PY
)
echo "minimum versions: ${minimums[*]}"
"$venv/bin/pip" install --quiet "${minimums[@]}"
"$venv/bin/pip" install --quiet --no-deps -e .
"$venv/bin/pip" check
"$venv/bin/python" -m medflare.data.demo_files
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/python" -m pytest -q -p no:warnings "${tests[@]}"
