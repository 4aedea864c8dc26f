"""One radiograph out of DICOM: a file (single- or multi-frame) or a series folder, through the display pipeline.

:func:`medflare.data.outcome_table.read_xray` calls :func:`read_dicom_radiograph` for DICOM
input. The pixel values go through DICOM's greyscale pipeline in the standard's order
(PS3.4 Annex N.2.1.1; PS3.3 C.11):

1. **Modality LUT** (PS3.3 C.11.1): ``RescaleSlope``/``RescaleIntercept`` or a Modality LUT
   Sequence, :math:`y = m x + b`;
2. **VOI LUT** (PS3.3 C.11.2): the first VOI LUT Sequence item when present, else the first
   *Window Center*/*Window Width* pair with the file's *VOI LUT Function*. For ``LINEAR``
   (C.11.2.1.2.1), with centre :math:`c` and width :math:`w`,

   .. math::

       y = \\begin{cases} y_{min} & x \\le c - 0.5 - (w-1)/2 \\\\
                        y_{max} & x > c - 0.5 + (w-1)/2 \\\\
                        \\left(\\frac{x - (c - 0.5)}{w - 1} + 0.5\\right)(y_{max} - y_{min}) + y_{min} & \\text{else}
           \\end{cases}

   ``LINEAR_EXACT`` and ``SIGMOID`` as C.11.2.1.3 (``pydicom.pixels.apply_voi_lut``). The
   window is the one the modality chose for reading the image (a CR's processing often ships
   only as a window or LUT), so applying it is what makes two vendors' files look alike;
3. **Presentation**: ``MONOCHROME1`` (low values white) is inverted, so bone is bright in both
   photometric interpretations.

Frames (the rule):

* a **multi-frame** file gives one radiograph when all its frames are equal after the
  pipeline; frames that differ (tomosynthesis, dual-energy standard/soft-tissue/bone) are
  refused unless a ``frame`` number is given, because which of them is "the X-ray" is a
  clinical choice the site makes, not one the reader should guess;
* a **series folder** holds single-frame DICOM files of one *Series Instance UID* (files of
  two series are refused naming both UIDs), ordered by *Instance Number* (a missing or
  repeated number is refused); the ordered images are then the frames, under the same rule.

``frame`` counts from 1 as DICOM does (PS3.3 C.7.6.6, the frame number; in a series: the
k-th file by Instance Number).

An enhanced multi-frame object that keeps its rescale or window in functional groups
(PS3.3 C.7.6.16) is refused rather than read without them.

References:
    1. DICOM PS3.3 C.11.1 Modality LUT Module, C.11.2 VOI LUT Module, C.7.6.3 Image Pixel Module.
    2. DICOM PS3.4 Annex N.2.1.1 Grayscale transformations.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from medflare.data.data_errors import DataListError

__all__ = ["check_frame", "read_dicom_radiograph"]

# transforms an enhanced object keeps per frame or shared, which the classic pipeline would skip
_FUNCTIONAL_TRANSFORMS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")


def check_frame(frame) -> Optional[int]:
    """``frame`` when it is None or an int >= 1; else ValueError naming it."""
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int) or frame < 1):
        raise ValueError(f"frame must be null or an int >= 1 (DICOM counts frames from 1), got {frame!r}")
    return frame


def read_dicom_radiograph(path: str, frame: Optional[int] = None) -> np.ndarray:
    """The radiograph of a DICOM file or series folder, float32 ``(H, W)``, as the module describes.

    Args:
        path: a DICOM file, or a folder holding the single-frame files of one series.
        frame: None (every frame must be the same image) or the frame number to take (from 1).

    Raises:
        ValueError: ``frame`` is not None or an int >= 1.
        DataListError: naming the file (and the frame, the series or the instance) when it
            cannot be read, is not greyscale, mixes series, or holds frames that differ.
    """
    check_frame(frame)
    if os.path.isdir(path):
        frames, names = _read_series(path)
    else:
        frames = _pipeline(_dcmread(path), path)
        names = [f"frame {k}" for k in range(1, len(frames) + 1)]
    return _one_frame(frames, names, frame, path)


def _dcmread(path: str):
    import pydicom

    try:
        return pydicom.dcmread(path)
    except Exception as e:
        raise DataListError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _pipeline(dataset, path: str) -> np.ndarray:
    """``(frames, H, W)`` float32 after the modality LUT, the VOI LUT and MONOCHROME1 inversion."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if int(getattr(dataset, "SamplesPerPixel", 1) or 1) != 1:
        raise DataListError(f"image {path} must be a greyscale DICOM (SamplesPerPixel 1), got SamplesPerPixel {dataset.SamplesPerPixel!r}")
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataListError(f"image {path} must be a greyscale DICOM (MONOCHROME1/2), got {photometric!r}")
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in dataset.get(group) or []:
            found = [name for name in _FUNCTIONAL_TRANSFORMS if name in item]
            if found:
                raise DataListError(
                    f"image {path} is an enhanced multi-frame DICOM with its rescale or window in {group} "
                    f"({', '.join(found)}), which this reader does not apply; export the radiograph as a classic image"
                )
    try:
        pixels = dataset.pixel_array
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
        pixels = pixels.reshape((frames, *pixels.shape[-2:])) if pixels.ndim == 3 or frames > 1 else pixels[None]
        pixels = apply_modality_lut(pixels, dataset)
        pixels = apply_voi_lut(pixels, dataset, index=0)
    except DataListError:
        raise
    except Exception as e:
        raise DataListError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    pixels = np.asarray(pixels, dtype=np.float32)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels  # MONOCHROME1: low values are white
    return pixels


def _read_series(folder: str) -> tuple[np.ndarray, list[str]]:
    """The folder's single-frame files as ``(frames, H, W)`` ordered by Instance Number, with a
    name for each (``instance N (file)``)."""
    entries = sorted(os.listdir(folder))
    if not entries:
        raise DataListError(f"image series {folder} is an empty folder")
    root = os.path.realpath(folder)
    found = []  # (instance number, file name, series uid, dataset)
    for name in entries:
        file = os.path.join(folder, name)
        if os.path.commonpath([root, os.path.realpath(file)]) != root or not os.path.isfile(file):
            raise DataListError(
                f"image series {folder}: {name!r} is not a file inside the folder (a series folder holds only its DICOM files)"
            )
        dataset = _dcmread(file)
        uid = str(dataset.get("SeriesInstanceUID", "") or "")
        number = dataset.get("InstanceNumber", None)
        if not uid:
            raise DataListError(f"image series {folder}: {name} has no SeriesInstanceUID")
        if isinstance(number, bool) or number is None or str(number).strip() == "":
            raise DataListError(f"image series {folder}: {name} has no InstanceNumber to order the series by")
        if "PixelData" not in dataset:
            raise DataListError(f"image series {folder}: {name} holds no image (no PixelData)")
        if int(getattr(dataset, "NumberOfFrames", 1) or 1) != 1:
            raise DataListError(f"image series {folder}: {name} is multi-frame; a series folder holds single-frame files")
        try:
            number = int(number)
        except (TypeError, ValueError):
            raise DataListError(f"image series {folder}: {name} has InstanceNumber {number!r}, not an integer") from None
        found.append((number, name, uid, dataset))
    uids = sorted({uid for _, _, uid, _ in found})
    if len(uids) > 1:
        first = {uid: next(n for _, n, u, _ in found if u == uid) for uid in uids}
        raise DataListError(
            f"image series {folder} mixes series: SeriesInstanceUID {uids[0]} ({first[uids[0]]}) and "
            f"{uids[1]} ({first[uids[1]]}); one folder must hold one series"
        )
    found.sort(key=lambda item: item[0])
    numbers = [n for n, *_ in found]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        names = [n for k, n, *_ in found if k == repeated[0]]
        raise DataListError(f"image series {folder}: InstanceNumber {repeated[0]} is repeated ({', '.join(names)})")
    frames = []
    for number, name, _, dataset in found:
        pixels = _pipeline(dataset, os.path.join(folder, name))[0]
        if frames and pixels.shape != frames[0].shape:
            raise DataListError(
                f"image series {folder}: instance {number} ({name}) is {pixels.shape}, instance {found[0][0]} is {frames[0].shape}"
            )
        frames.append(pixels)
    return np.stack(frames), [f"instance {n} ({name})" for n, name, *_ in found]


def _one_frame(frames: np.ndarray, names: list[str], frame: Optional[int], path: str) -> np.ndarray:
    if frame is not None:
        if frame > len(frames):
            raise DataListError(f"image {path} has {len(frames)} frame(s); frame {frame} was asked for")
        return frames[frame - 1]
    for k in range(1, len(frames)):
        if not np.array_equal(frames[k], frames[0]):
            raise DataListError(
                f"image {path} holds {len(frames)} different images ({names[0]} and {names[k]} differ); "
                "which one is the radiograph is the site's choice: export that one as its own file"
            )
    return frames[0]
