"""Tiny site data for the preparation tests, built in tmp_path: BraTS-like 12^3 cases and X-rays."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
EDGE = 12


def write_volume(path, data, affine=None) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


def brain_volume(seed: int, modality_index: int) -> np.ndarray:
    """A 12^3 volume: background 0 in the first two slices, a brain of values in [1, 101) elsewhere."""
    data = (np.random.default_rng(seed * 10 + modality_index).random((EDGE, EDGE, EDGE)) * 100 + 1).astype(np.float32)
    data[:2] = 0
    return data


def tumour_label(empty: bool = False) -> np.ndarray:
    label = np.zeros((EDGE, EDGE, EDGE), np.uint8)
    if not empty:
        label[4:7, 4:7, 4:7] = 2
        label[5, 5, 5] = 4
        label[4, 4, 4] = 1
    return label


def write_case(root, case_id: str, seed: int, modalities=MODALITIES, label=None, affine=None) -> dict:
    for i, m in enumerate(modalities):
        write_volume(os.path.join(root, case_id, f"{case_id}_{m}.nii.gz"), brain_volume(seed, i), affine)
    write_volume(os.path.join(root, case_id, f"{case_id}_seg.nii.gz"), tumour_label() if label is None else label, affine)
    return {
        "subject": case_id,
        "image": [f"{case_id}/{case_id}_{m}.nii.gz" for m in modalities],
        "label": f"{case_id}/{case_id}_seg.nii.gz",
    }


def brats_site(root) -> tuple[str, str]:
    """Five cases: good-1, good-2 (training), good-3 (validation), corrupt (truncated t1ce),
    three-modalities (no flair), with-nan (a NaN in t2). Returns (datalist, data_root)."""
    root = str(root)
    good = [write_case(root, f"good-{i}", i) for i in (1, 2, 3)]
    corrupt = write_case(root, "corrupt", 4)
    path = os.path.join(root, "corrupt", "corrupt_t1ce.nii.gz")
    with open(path, "rb") as f:
        head = f.read()
    with open(path, "wb") as f:
        f.write(head[: len(head) // 2])
    three = write_case(root, "three-modalities", 5)
    three["image"] = three["image"][:3]
    nan = write_case(root, "with-nan", 6)
    data = brain_volume(6, 2)
    data[6, 6, 6] = np.nan
    write_volume(os.path.join(root, "with-nan", "with-nan_t2.nii.gz"), data)
    datalist = os.path.join(root, "datalist.json")
    with open(datalist, "w") as f:
        json.dump({"name": "tiny", "training": [good[0], good[1], corrupt, three], "validation": [good[2], nan]}, f)
    return datalist, root


def write_png(path, pixels: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def write_dicom(path, pixels: np.ndarray, monochrome1: bool = False) -> None:
    """A minimal single-frame greyscale DICOM file (uint16)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.6"
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def radiograph(seed: int, shape=(20, 24)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 200 + 20).astype(np.uint8)


def xray_site(root) -> tuple[str, str]:
    """Rows: p1 (PNG), p2 (DICOM), p3 (constant PNG), p4 (corrupt PNG), p5 (too small, 8x8),
    p6 (path escape), p1 again (duplicate), p7 (nan clinical value). Returns (table, data_root)."""
    root = str(root)
    write_png(os.path.join(root, "images", "p1.png"), radiograph(1))
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    write_dicom(os.path.join(root, "images", "p2.dcm"), radiograph(2).astype(np.uint16) * 100)
    write_png(os.path.join(root, "images", "p3.png"), np.full((20, 20), 7, np.uint8))
    with open(os.path.join(root, "images", "p4.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nnot really")
    write_png(os.path.join(root, "images", "p5.png"), radiograph(5, (8, 8)))
    write_png(os.path.join(root, "images", "p7.png"), radiograph(7))
    rows = [
        ("p1", "train", "images/p1.png", "71", "1"),
        ("p2", "test", "images/p2.dcm", "45", "0"),
        ("p3", "train", "images/p3.png", "50", "0"),
        ("p4", "train", "images/p4.png", "60", "1"),
        ("p5", "train", "images/p5.png", "61", "1"),
        ("p6", "train", "../outside.png", "62", "1"),
        ("p1", "test", "images/p1.png", "71", "1"),
        ("p7", "train", "images/p7.png", "nan", "1"),
    ]
    table = os.path.join(root, "table.csv")
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "split", "image", "age", "o2_24h"])
        writer.writerows(rows)
    return table, root
