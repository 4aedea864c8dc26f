"""Synthetic BraTS-like hospitals: real MNI152 brain anatomy with generated gliomas.

Each subject is the MNI152 brain under a random smooth deformation, imaged in the four BraTS
MR contrasts (T1, T1ce, T2, FLAIR) with a generated tumour: a necrotic core (label 1) inside an
enhancing rim (label 4) inside peritumoural oedema (label 2) that spreads preferentially along
white matter. Sites differ the way hospitals do: scanner contrast, intensity scale and storage
type, noise, bias field, tumour sizes and number of cases. Everything is drawn from
``numpy.random.Generator`` seeded by ``(seed, site, subject)``, so a seed reproduces the data.

The files are written in the BraTS 2018-2021 folder layout, so the same loader reads them and
real BraTS data (see :mod:`medflare.data.brats_layout`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from medflare.data.brats_layout import MODALITIES, make_datalist, write_data_config
from medflare.data.mni_anatomy import TissueMaps, load_tissue_maps

__all__ = [
    "SiteProfile",
    "make_site_profiles",
    "generate_subject",
    "write_site",
    "generate_sites",
    "BRATS_LABELS",
]

#: BraTS 2018-2021 label values.
BRATS_LABELS = {"background": 0, "necrotic_core": 1, "oedema": 2, "enhancing_tumour": 4}

# Relative signal of each tissue per contrast, in BraTS modality order (t1, t1ce, t2, flair):
# columns are CSF, grey matter, white matter, necrosis, oedema, enhancing tumour.
_BASE_SIGNAL = np.array(
    [
        [0.25, 0.55, 0.80, 0.30, 0.45, 0.55],  # T1: WM bright, CSF dark, tumour hypointense
        [0.25, 0.55, 0.80, 0.22, 0.45, 1.00],  # T1ce: gadolinium lights the enhancing rim
        [1.00, 0.60, 0.40, 0.95, 0.85, 0.70],  # T2: fluid and oedema bright
        [0.10, 0.55, 0.45, 0.50, 0.95, 0.80],  # FLAIR: CSF suppressed, oedema bright
    ],
    dtype=np.float32,
)


@dataclass(frozen=True)
class SiteProfile:
    """How one hospital's scanners and patients look.

    Attributes:
        name: site name, as the FLARE client is called (``site-1``...).
        num_cases: number of subjects at the site.
        signal: per-contrast tissue signal table, ``_BASE_SIGNAL`` with site jitter (4 x 6).
        gamma: per-contrast exponent of the scanner's intensity curve.
        intensity_scale: scanner units of the stored images (multiplies the signal).
        storage_dtype: ``"float32"`` or ``"int16"``, as different PACS exports do.
        noise_sigma: Rician noise level relative to the signal range.
        bias_strength: amplitude of the smooth multiplicative bias field (log scale).
        tumour_radius_mm: range of the whole-tumour (oedema) radius.
    """

    name: str
    num_cases: int
    signal: tuple = field(repr=False)
    gamma: tuple
    intensity_scale: float
    storage_dtype: str
    noise_sigma: float
    bias_strength: float
    tumour_radius_mm: tuple


def make_site_profiles(num_sites: int, cases_per_site: int, seed: int = 0) -> list[SiteProfile]:
    """Draw ``num_sites`` distinct hospital profiles.

    Args:
        num_sites: how many sites (1 to 64).
        cases_per_site: typical number of subjects per site (at least 4); each site gets
            between 60% and 140% of it, so sites differ in size too.
        seed: seed of the draw.
    """
    _check_int("num_sites", num_sites, 1, 64)
    _check_int("cases_per_site", cases_per_site, 4, 10_000)
    _check_int("seed", seed, 0, 2**32 - 1)
    profiles = []
    for i in range(num_sites):
        rng = np.random.default_rng([seed, 7919, i])
        jitter = 1.0 + rng.uniform(-0.12, 0.12, size=_BASE_SIGNAL.shape)
        signal = np.clip(_BASE_SIGNAL * jitter, 0.02, 1.2)
        lo = rng.uniform(16.0, 24.0)
        profiles.append(
            SiteProfile(
                name=f"site-{i + 1}",
                num_cases=max(4, int(round(cases_per_site * rng.uniform(0.6, 1.4)))),
                signal=tuple(tuple(float(v) for v in row) for row in signal),
                gamma=tuple(float(g) for g in rng.uniform(0.75, 1.35, size=4)),
                intensity_scale=float(rng.choice([1.0, 255.0, 1000.0, 4095.0]) * rng.uniform(0.8, 1.2)),
                storage_dtype=str(rng.choice(["float32", "int16"])),
                noise_sigma=float(rng.uniform(0.01, 0.06)),
                bias_strength=float(rng.uniform(0.0, 0.3)),
                tumour_radius_mm=(float(lo), float(lo + rng.uniform(8.0, 16.0))),
            )
        )
    return profiles


def _check_int(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")


def _smooth_noise(rng: np.random.Generator, shape: tuple, cells: int) -> np.ndarray:
    """Zero-mean, unit-std noise that varies over about ``cells`` cells per axis.

    White noise low-passed with a Gaussian in the Fourier domain (periodic, which is harmless
    for bias fields, textures and shape perturbations).
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spectrum = np.fft.rfftn(white)
    sigma = [n / cells / 2.0 for n in shape]  # spatial std of the smoothing kernel, in voxels
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    gain = np.ones(spectrum.shape, dtype=np.float32)
    for axis, (f, s) in enumerate(zip(freqs, sigma)):
        view = [1] * len(shape)
        view[axis] = -1
        gain = gain * np.exp(-2.0 * (np.pi * f * s) ** 2).astype(np.float32).reshape(view)
    smooth = np.fft.irfftn(spectrum * gain, s=shape).astype(np.float32)
    return (smooth - smooth.mean()) / (smooth.std() + 1e-6)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _deformed_anatomy(tissue: TissueMaps, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The template under a random rotation, scaling and smooth elastic displacement."""
    from scipy import ndimage

    shape = tissue.gm.shape
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    matrix = _rotation(rng, 8.0) * rng.uniform(0.92, 1.08)
    coords = (matrix @ grid).reshape((3,) + shape) + centre[:, None, None, None]
    amplitude = 1.5 * shape[0] / 64
    for axis in range(3):
        coords[axis] += amplitude * _smooth_noise(rng, shape, 5)
    warp = [ndimage.map_coordinates(m, coords, order=1, mode="constant") for m in (tissue.csf, tissue.gm, tissue.wm)]
    brain = ndimage.map_coordinates(tissue.brain, coords, order=1, mode="constant")
    return warp[0], warp[1], warp[2], brain


def _tumour_labels(
    gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, spacing_mm: float, radius_mm: tuple, rng: np.random.Generator
) -> np.ndarray:
    """BraTS label volume (0, 1, 2, 4) of one generated glioma, seeded in deep white matter."""
    from scipy import ndimage

    shape = gm.shape
    parenchyma = gm + wm
    r_whole = rng.uniform(*radius_mm) / spacing_mm
    r_enh = r_whole * rng.uniform(0.45, 0.65)
    r_nec = r_enh * rng.uniform(0.4, 0.7)
    depth = ndimage.distance_transform_edt(brain > 0.5)
    candidates = np.argwhere((wm > 0.5) & (depth > r_enh + 1.0))
    if len(candidates) == 0:
        candidates = np.argwhere(depth >= depth.max() - 1.0)
    centre = candidates[rng.integers(len(candidates))].astype(np.float32)
    axes = _rotation(rng, 90.0) * rng.uniform(0.75, 1.3, size=3)[:, None]
    offsets = np.indices(shape, dtype=np.float32).reshape(3, -1) - centre[:, None]
    dist = np.linalg.norm(axes @ offsets, axis=0).reshape(shape)
    core_dist = dist * (1.0 + 0.18 * _smooth_noise(rng, shape, 6))
    oedema_dist = dist * (1.0 + 0.30 * _smooth_noise(rng, shape, 7))

    labels = np.zeros(shape, dtype=np.uint8)
    inside = brain > 0.5
    oedema = (oedema_dist < r_whole * (0.75 + 0.5 * wm)) & (parenchyma > 0.25)
    labels[(oedema | (core_dist < r_enh * 1.25)) & inside] = BRATS_LABELS["oedema"]
    labels[(core_dist < r_enh) & inside] = BRATS_LABELS["enhancing_tumour"]
    labels[(core_dist < r_nec) & inside] = BRATS_LABELS["necrotic_core"]
    return labels


def generate_subject(
    tissue: TissueMaps, profile: SiteProfile, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one subject as a site images it.

    Args:
        tissue: template tissue maps (:func:`medflare.data.mni_anatomy.load_tissue_maps`).
        profile: the site's scanner and population.
        rng: generator for this subject.

    Returns:
        ``(image, label)``: image of shape ``(4, D, H, W)`` in BraTS modality order and the
        site's scanner units (float32), label of shape ``(D, H, W)`` with values {0, 1, 2, 4}.
    """
    from scipy import ndimage

    csf, gm, wm, brain = _deformed_anatomy(tissue, rng)
    labels = _tumour_labels(gm, wm, brain, tissue.spacing_mm, profile.tumour_radius_mm, rng)
    brain_mask = brain > 0.5
    shape = gm.shape
    tumour_parts = [labels == BRATS_LABELS[k] for k in ("necrotic_core", "oedema", "enhancing_tumour")]
    soft = [ndimage.gaussian_filter(p.astype(np.float32), 0.6) for p in tumour_parts]
    tumour_weight = np.clip(sum(soft), 0.0, 1.0)

    signal = np.asarray(profile.signal, dtype=np.float32)
    image = np.empty((len(MODALITIES),) + shape, dtype=np.float32)
    for m in range(len(MODALITIES)):
        healthy = csf * signal[m, 0] + gm * signal[m, 1] + wm * signal[m, 2]
        tumour = sum(s * signal[m, 3 + k] for k, s in enumerate(soft)) / np.maximum(tumour_weight, 1e-6)
        img = (1.0 - tumour_weight) * healthy + tumour_weight * tumour
        img *= 1.0 + 0.04 * _smooth_noise(rng, shape, 16)  # tissue texture
        img *= np.exp(profile.bias_strength * _smooth_noise(rng, shape, 3))  # coil bias field
        img = np.clip(img, 0.0, None) ** profile.gamma[m]
        real = img + profile.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
        imag = profile.noise_sigma * rng.standard_normal(shape, dtype=np.float32)
        img = np.sqrt(real * real + imag * imag)  # magnitude images carry Rician noise
        image[m] = img * brain_mask * profile.intensity_scale
    if profile.storage_dtype == "int16":
        image = np.clip(np.rint(image), 0, 32767)
    return image, labels


def _save_nifti(path: str, array: np.ndarray, spacing_mm: float, dtype: str) -> None:
    import nibabel as nib

    affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    affine[:3, 3] = -spacing_mm * (np.array(array.shape) - 1) / 2
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def write_site(
    out_dir: str, profile: SiteProfile, size: int = 64, seed: int = 0, val_fraction: float = 0.25
) -> str:
    """Write one site in the BraTS folder layout with its datalist and data configuration.

    Layout::

        out_dir/<site>/MedflareSyn_<site>_000/MedflareSyn_<site>_000_{t1,t1ce,t2,flair,seg}.nii.gz
        out_dir/<site>/datalist.json      MONAI decathlon-style training/validation split
        out_dir/<site>/data_config.json   what a site's ``local/`` would point at

    Returns:
        The path of the site's ``data_config.json``.
    """
    tissue = load_tissue_maps(size)
    site_dir = os.path.join(out_dir, profile.name)
    os.makedirs(site_dir, exist_ok=True)
    site_index = int(profile.name.rsplit("-", 1)[-1]) if profile.name.rsplit("-", 1)[-1].isdigit() else 0
    subjects = []
    for case in range(profile.num_cases):
        subject_id = f"MedflareSyn_{profile.name}_{case:03d}"
        subject_dir = os.path.join(site_dir, subject_id)
        os.makedirs(subject_dir, exist_ok=True)
        image, labels = generate_subject(tissue, profile, np.random.default_rng([seed, site_index, case]))
        for m, modality in enumerate(MODALITIES):
            _save_nifti(
                os.path.join(subject_dir, f"{subject_id}_{modality}.nii.gz"),
                image[m],
                tissue.spacing_mm,
                profile.storage_dtype,
            )
        _save_nifti(os.path.join(subject_dir, f"{subject_id}_seg.nii.gz"), labels, tissue.spacing_mm, "uint8")
        subjects.append(subject_dir)

    from medflare.data.brats_layout import find_brats_subjects

    datalist = make_datalist(find_brats_subjects(site_dir), base_dir=site_dir, val_fraction=val_fraction, seed=seed)
    datalist["generator"] = generator_signature(profile, size, seed, val_fraction)
    with open(os.path.join(site_dir, "datalist.json"), "w") as f:
        json.dump(datalist, f, indent=2)
    return write_data_config(site_dir, data_root=".", datalist="datalist.json")


def generator_signature(profile: SiteProfile, size: int, seed: int, val_fraction: float) -> dict:
    """What determines a generated site's content; equal signatures mean reusable data."""
    return {
        "tool": "medflare.data.brats_synthetic",
        "size": size,
        "seed": seed,
        "val_fraction": val_fraction,
        "profile": asdict(profile),
    }


def generate_sites(
    out_dir: str,
    num_sites: int,
    cases_per_site: int = 16,
    size: int = 64,
    seed: int = 0,
    val_fraction: float = 0.25,
    reuse: bool = True,
    log=None,
) -> dict[str, str]:
    """Generate (or reuse, when already generated with the same settings) ``num_sites`` sites.

    Returns:
        ``{site_name: path of its data_config.json}``.
    """
    _check_int("size", size, 16, 256)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    configs = {}
    for profile in make_site_profiles(num_sites, cases_per_site, seed):
        site_dir = os.path.join(out_dir, profile.name)
        wanted = json.loads(json.dumps(generator_signature(profile, size, seed, val_fraction)))
        existing = _read_signature(os.path.join(site_dir, "datalist.json"))
        config_path = os.path.join(site_dir, "data_config.json")
        if reuse and existing == wanted and os.path.isfile(config_path):
            if log:
                log(f"{profile.name}: reusing {site_dir}")
        else:
            if log:
                log(f"{profile.name}: generating {profile.num_cases} subjects at {size}^3 in {site_dir}")
            config_path = write_site(out_dir, profile, size=size, seed=seed, val_fraction=val_fraction)
        configs[profile.name] = config_path
    return configs


def _read_signature(path: str):
    try:
        with open(path) as f:
            return json.load(f).get("generator")
    except (OSError, ValueError, AttributeError):
        return None
