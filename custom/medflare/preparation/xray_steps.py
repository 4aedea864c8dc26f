"""The steps one chest radiograph goes through: read, check, scale, resize, write a PNG.

Read by :func:`medflare.data.outcome_table.read_xray` (PNG/JPEG/DICOM, modality and VOI LUT,
MONOCHROME1 inverted: bone bright, scaled to [0, 1] by its own range). Then:

* scaling ``"percentile"``: :math:`x' = \\mathrm{clip}((x - p_{lo}) / (p_{hi} - p_{lo}), 0, 1)`
  with :math:`p` the image's percentiles (numpy's linear interpolation), so a burnt-in marker or
  a collimator edge does not set the range; ``"minmax"``: :math:`x` as read;
* resizing to ``size`` x ``size`` (torch bilinear with antialiasing, CPU), or none;
* quantising :math:`q = \\mathrm{round}(x' (2^b - 1))` to ``b`` = 8 or 16 bits, written as a
  greyscale PNG by Pillow (no timestamp chunk: the same input gives the same bytes).
"""

from __future__ import annotations

import os

import numpy as np

from medflare.data.data_errors import DataListError
from medflare.preparation.case_qc import CaseFailed, CaseVerdict
from medflare.preparation.file_hashes import sha256_file
from medflare.preparation.recipe import XrayPreparation

__all__ = ["input_sha256", "prepare_xray_case"]


def input_sha256(path: str):
    """sha256 of a file; of a DICOM series folder, sha256 over its files' names and digests; None if unreadable."""
    import hashlib

    try:
        if not os.path.isdir(path):
            return sha256_file(path)
        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            member = os.path.join(path, name)
            if os.path.isfile(member):
                digest.update(f"{name}\0{sha256_file(member)}\n".encode())
        return digest.hexdigest()
    except OSError:
        return None


def _read(path: str) -> np.ndarray:
    from medflare.data.outcome_table import read_xray

    try:
        return read_xray(path)
    except DataListError as e:
        text = str(e)
        code = "non_finite" if "non-finite" in text else "wrong_dimensions" if "2D greyscale" in text or "2-D" in text else "unreadable_file"
        raise CaseFailed(code, text) from None


def _scaled(pixels: np.ndarray, recipe: XrayPreparation, path: str) -> np.ndarray:
    if float(pixels.max()) == float(pixels.min()):
        raise CaseFailed("constant_image", f"image {path} holds one value in every pixel")
    if recipe.scaling == "minmax":
        return pixels.astype(np.float64)
    low, high = np.percentile(pixels.astype(np.float64), recipe.percentiles)
    if not high > low:
        raise CaseFailed(
            "constant_image",
            f"image {path} holds one value between its {recipe.percentiles[0]:g}th and {recipe.percentiles[1]:g}th percentiles",
        )
    return np.clip((pixels - low) / (high - low), 0.0, 1.0)


def _resized(pixels: np.ndarray, size) -> np.ndarray:
    if size is None or pixels.shape == (size, size):
        return pixels
    import torch

    image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    out = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return np.clip(out[0, 0].numpy().astype(np.float64), 0.0, 1.0)


def _write_png(pixels: np.ndarray, bit_depth: int, path: str) -> str:
    from PIL import Image

    top = (1 << bit_depth) - 1
    quantised = np.rint(pixels * top).astype(np.uint8 if bit_depth == 8 else np.uint16)
    Image.fromarray(quantised).save(path, format="PNG")
    return sha256_file(path)


def prepare_xray_case(case_id: str, image: str, recipe: XrayPreparation, out_root: str, verdict: CaseVerdict) -> dict:
    """Check one radiograph and, when it passes, write ``<out_root>/images/<case_id>.png``.

    Returns:
        ``{"shape", "output_shape", "outputs": [{role, path, sha256}]}`` (no outputs when it fails;
        the reason is added to ``verdict``).
    """
    record = {"shape": None, "spacing": None, "output_shape": None, "output_spacing": None, "outputs": []}
    try:
        pixels = _read(image)
        record["shape"] = list(pixels.shape)
        if min(pixels.shape) < recipe.min_input_size:
            raise CaseFailed("image_too_small", f"image {image} is {pixels.shape[0]}x{pixels.shape[1]}; min_input_size is {recipe.min_input_size}")
        scaled = _scaled(pixels, recipe, image)
    except CaseFailed as e:
        verdict.failures.append(e.finding)
        return record
    if recipe.size is not None and max(pixels.shape) < recipe.size:
        verdict.warn("upsampled", f"image {image} is {pixels.shape[0]}x{pixels.shape[1]}, smaller than the output size {recipe.size}")
    resized = _resized(scaled, recipe.size)
    relative = f"images/{case_id}.png"
    os.makedirs(os.path.join(out_root, "images"), exist_ok=True)
    record["output_shape"] = list(resized.shape)
    record["outputs"].append({"role": "image", "path": relative, "sha256": _write_png(resized, recipe.bit_depth, os.path.join(out_root, relative))})
    return record
