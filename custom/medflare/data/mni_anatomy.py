"""Real brain anatomy for synthetic sites: MNI152 tissue maps resampled onto a small grid.

The ICBM 2009a MNI152 T1, grey-matter and white-matter templates ship inside the nilearn
wheel, so they are read here with nibabel straight from the installed package (importing
nilearn itself costs seconds and is not needed). Cerebrospinal fluid is what remains of the
brain mask once grey and white matter are taken away.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["TissueMaps", "load_tissue_maps", "mni_template_dir"]

_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"


@dataclass(frozen=True)
class TissueMaps:
    """Partial-volume tissue probabilities on a cubic grid, each of shape ``(size, size, size)``.

    Attributes:
        gm: grey-matter probability in [0, 1].
        wm: white-matter probability in [0, 1].
        csf: cerebrospinal-fluid probability in [0, 1].
        brain: brain mask probability (gm + wm + csf, at most 1).
        spacing_mm: isotropic voxel size of the grid in millimetres.
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    spacing_mm: float


def mni_template_dir() -> str:
    """Folder of the MNI152 templates inside the installed nilearn wheel.

    Raises:
        RuntimeError: nilearn is not installed or its wheel lacks the templates.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        from medflare.optional_dependencies import DEMO_EXTRA_HINT, MissingDependency

        raise MissingDependency(f"the BraTS demo sites need nilearn (it ships the MNI152 templates), which is not installed: {DEMO_EXTRA_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    missing = [name for name in (_T1, _GM, _WM) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise RuntimeError(f"MNI152 templates missing from {folder}: {missing}")
    return folder


@functools.lru_cache(maxsize=4)
def load_tissue_maps(size: int) -> TissueMaps:
    """Load the MNI152 tissue maps, crop to the brain, pad to a cube and resample to ``size``³.

    Args:
        size: edge length of the output grid in voxels (16 to 256).

    Returns:
        The tissue maps; cached per ``size`` within a process. Treat the arrays as read-only.
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 256:
        raise ValueError(f"size must be an int in [16, 256], got {size!r}")
    import nibabel as nib
    from scipy import ndimage

    folder = mni_template_dir()
    t1 = np.asarray(nib.load(os.path.join(folder, _T1)).dataobj, dtype=np.float32)
    gm = np.asarray(nib.load(os.path.join(folder, _GM)).dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(nib.load(os.path.join(folder, _WM)).dataobj, dtype=np.float32) / 255.0
    brain = (t1 > 10.0).astype(np.float32)

    # crop to the brain's bounding box with a small margin, then pad to a cube
    idx = np.argwhere(brain > 0)
    lo = np.maximum(idx.min(axis=0) - 4, 0)
    hi = np.minimum(idx.max(axis=0) + 5, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    edge = int((hi - lo).max())

    def to_grid(vol: np.ndarray) -> np.ndarray:
        vol = vol[crop]
        pad = [((edge - n) // 2, edge - n - (edge - n) // 2) for n in vol.shape]
        vol = np.pad(vol, pad)
        out = ndimage.zoom(vol, size / edge, order=1, grid_mode=True, mode="grid-constant")
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    brain_s, gm_s, wm_s = to_grid(brain), to_grid(gm), to_grid(wm)
    tissue = gm_s + wm_s
    over = tissue > 1.0
    gm_s[over] /= tissue[over]
    wm_s[over] /= tissue[over]
    brain_s = np.maximum(brain_s, np.minimum(gm_s + wm_s, 1.0))
    csf_s = np.clip(brain_s - gm_s - wm_s, 0.0, 1.0)
    for arr in (gm_s, wm_s, csf_s, brain_s):
        arr.setflags(write=False)
    return TissueMaps(gm=gm_s, wm=wm_s, csf=csf_s, brain=brain_s, spacing_mm=float(edge) / size)
