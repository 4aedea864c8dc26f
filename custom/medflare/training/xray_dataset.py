"""A site's radiographs read per batch: MONAI datasets over its cases, for the outcome trainer.

:class:`~medflare.training.outcome_trainer.OutcomeTrainer` holds clinical values and labels as
small tensors; with ``data_loading="stream"`` the images come from a MONAI dataset built here
(:func:`xray_dataset`), read through :func:`medflare.data.outcome_table.read_xray` and resized
to the job's ``image_size`` by :class:`LoadXrayd` when a batch asks for them:

* ``cache_rate = 0`` (default): MONAI ``Dataset``, nothing is kept; memory is one batch (per
  loader worker, times its prefetch);
* ``0 < cache_rate <= 1``: MONAI ``CacheDataset``, the first ``cache_rate`` share of the cases is
  read and resized once, when the trainer is built, and kept in RAM
  (:math:`\\lfloor r N \\rfloor \\cdot H W \\cdot 4` bytes), the rest is read per batch;
* ``cache_dir``: MONAI ``PersistentDataset``, the resized images are written to that folder
  once and read from there afterwards. An entry's key holds the image's path, size,
  modification time and the ``image_size``, so a changed file or size is read afresh (for a
  DICOM series folder: the folder's, which changes when a file is added or removed, not when
  one is rewritten in place; clear the cache after editing a series).

:func:`check_xrays` is the quality-control pass the streamed trainer runs by default: every
image is read once (in ``num_workers`` processes) and dropped, so a corrupt file is refused
before training starts, naming the file and the case, without keeping the pixels.

MONAI wraps an error raised inside a transform in ``RuntimeError("applying transform ...")``;
the datasets here re-raise the :class:`~medflare.data.data_errors.DataListError` underneath,
so a bad image met mid-training still fails as the data's fault and names the file.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import OutcomeCase, read_xray

__all__ = [
    "DATA_LOADINGS",
    "MAX_NUM_WORKERS",
    "AugmentedDataset",
    "LoadXrayd",
    "StreamedImages",
    "check_loading_arguments",
    "check_xrays",
    "collate_xrays",
    "read_resized_xray",
    "xray_dataset",
    "xray_items",
]

DATA_LOADINGS = ("memory", "stream")
MAX_NUM_WORKERS = 64


def check_loading_arguments(data_loading, cache_rate, cache_dir, num_workers, check_images) -> None:
    """Refuse out-of-range data-loading arguments, naming the argument, its value and what is
    allowed (bool is refused for numbers, NaN and inf too).

    Raises:
        ValueError: as described.
    """
    if data_loading not in DATA_LOADINGS:
        raise ValueError(f"data_loading must be one of {list(DATA_LOADINGS)}, got {data_loading!r}")
    if isinstance(cache_rate, bool) or not isinstance(cache_rate, (int, float)) or not math.isfinite(cache_rate) or not 0 <= cache_rate <= 1:
        raise ValueError(f"cache_rate must be a finite number in [0, 1], got {cache_rate!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_NUM_WORKERS:
        raise ValueError(f"num_workers must be an int in [0, {MAX_NUM_WORKERS}], got {num_workers!r}")
    if cache_dir is not None and (not isinstance(cache_dir, str) or not cache_dir or "\x00" in cache_dir):
        raise ValueError(f"cache_dir must be a folder path or null, got {cache_dir!r}")
    if cache_dir is not None and os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"cache_dir {cache_dir!r} exists and is not a folder")
    if not isinstance(check_images, bool):
        raise ValueError(f"check_images must be true or false, got {check_images!r}")
    if data_loading == "memory":
        for name, value, default in (("cache_rate", cache_rate, 0), ("num_workers", num_workers, 0), ("cache_dir", cache_dir, None)):
            if value != default:
                raise ValueError(f"{name}={value!r} applies to data_loading='stream' only (data_loading='memory' holds every image)")
    if cache_dir is not None and cache_rate > 0:
        raise ValueError(f"give cache_rate or cache_dir, not both (cache_rate={cache_rate!r}, cache_dir={cache_dir!r})")


def read_resized_xray(path: str, image_size: Sequence[int]) -> torch.Tensor:
    """``read_xray(path)`` area-resized to ``image_size``: float32 ``(1, H, W)``."""
    pixels = torch.from_numpy(read_xray(path))[None, None]
    return torch.nn.functional.interpolate(pixels, size=tuple(image_size), mode="area")[0]


def xray_items(cases: Sequence[OutcomeCase], image_size: Sequence[int], with_file_stamp: bool = False) -> list[dict]:
    """The dataset's items: ``{"index", "case_id", "image" (path), "image_size"}`` per case, plus the
    file's ``size`` and ``mtime_ns`` when ``with_file_stamp`` (a persistent cache's key)."""
    items = []
    for i, case in enumerate(cases):
        item = {"index": i, "case_id": case.case_id, "image": case.image, "image_size": list(image_size)}
        if with_file_stamp:
            try:
                stat = os.stat(case.image)
            except OSError as e:
                raise DataListError(f"case {case.case_id!r}: cannot read image {case.image}: {e}") from None
            item.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        items.append(item)
    return items


class LoadXrayd:
    """MONAI-style dict transform: an item's ``"image"`` path becomes its resized ``(1, H, W)``
    tensor (the other keys are kept). A bad image raises DataListError naming the case and file."""

    def __init__(self, image_size: Sequence[int]):
        self.image_size = tuple(image_size)

    def __call__(self, item: dict) -> dict:
        out = dict(item)
        try:
            out["image"] = read_resized_xray(item["image"], self.image_size)
        except DataListError as e:
            raise DataListError(f"case {item.get('case_id')!r}: {e}") from None
        return out


def _data_error(error: BaseException) -> Optional[DataListError]:
    """The DataListError under MONAI's ``RuntimeError("applying transform ...")`` wrappers, if any."""
    seen = error
    while seen is not None:
        if isinstance(seen, DataListError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class _DataErrorsUnwrapped:
    """Mixin for MONAI datasets: re-raise the data error MONAI wrapped in a RuntimeError."""

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except RuntimeError as e:
            found = _data_error(e)
            if found is None:
                raise
            raise found from None


def xray_dataset(
    cases: Sequence[OutcomeCase],
    image_size: Sequence[int],
    cache_rate: float = 0.0,
    cache_dir: Optional[str] = None,
):
    """A MONAI dataset of ``cases`` whose items are ``{"index", "image": (1, H, W), ...}``.

    Args:
        cases: with an image path each.
        image_size: ``(H, W)``.
        cache_rate: share of the cases held resized in RAM (``CacheDataset``), 0 for none.
        cache_dir: folder of a ``PersistentDataset`` cache, or None.

    Raises:
        DataListError: with ``cache_rate > 0``, an image of the cached share is bad (naming it).
    """
    classes = _dataset_classes()
    transform = classes["MonaiLoadXrayd"](image_size)  # a MONAI Transform: the caches hold its output
    if cache_dir is not None:
        return classes["PersistentXrayDataset"](xray_items(cases, image_size, with_file_stamp=True), transform, cache_dir=cache_dir)
    if cache_rate > 0:
        try:
            return classes["CachedXrayDataset"](
                xray_items(cases, image_size), transform, cache_rate=cache_rate, num_workers=1, progress=False, copy_cache=False
            )
        except RuntimeError as e:
            found = _data_error(e)
            if found is None:
                raise
            raise found from None
    return classes["XrayDataset"](xray_items(cases, image_size), transform)


def _dataset_classes() -> dict:
    """MONAI's datasets with data errors unwrapped, made on first use (importing ``monai.data``
    takes seconds) and bound as this module's attributes, so loader workers can unpickle them."""
    if "XrayDataset" not in globals():
        from monai.data import CacheDataset, Dataset, PersistentDataset
        from monai.transforms import Transform

        made = {
            "MonaiLoadXrayd": (LoadXrayd, Transform),
            "XrayDataset": (_DataErrorsUnwrapped, Dataset),
            "CachedXrayDataset": (_DataErrorsUnwrapped, CacheDataset),
            "PersistentXrayDataset": (_DataErrorsUnwrapped, PersistentDataset),
        }
        for name, bases in made.items():
            globals()[name] = type(name, bases, {"__module__": __name__, "__qualname__": name})
    return {name: globals()[name] for name in ("MonaiLoadXrayd", "XrayDataset", "CachedXrayDataset", "PersistentXrayDataset")}


class AugmentedDataset(torch.utils.data.Dataset):
    """``dataset`` with ``augment`` applied to each item's image: the random part lives here, not
    in the (shared, possibly cached) dataset. ``set_random_state`` re-seeds ``augment`` (MONAI's
    loader-worker seeding finds it)."""

    def __init__(self, dataset, augment):
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        item["image"] = self.augment(item["image"])
        return item

    def set_random_state(self, seed: Optional[int] = None, state=None):
        self.augment.set_random_state(seed, state)
        return self


def collate_xrays(items: Sequence[dict]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(indices, images)`` of a batch; ``(empty, None)`` for an empty batch (a DP-SGD step that
    sampled no patient)."""
    if not items:
        return torch.zeros(0, dtype=torch.long), None
    images = [item["image"].as_tensor() if hasattr(item["image"], "as_tensor") else item["image"] for item in items]
    return torch.tensor([item["index"] for item in items], dtype=torch.long), torch.stack(images)


class StreamedImages:
    """The images of a streamed split, indexed like a tensor: ``images[index]`` reads those cases
    through the dataset and stacks them ``(len(index), 1, H, W)`` on the CPU. Nothing is kept."""

    def __init__(self, dataset, image_size: Sequence[int]):
        self.dataset = dataset
        self.shape = (len(dataset), 1, *image_size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        indices = torch.as_tensor(index).reshape(-1).tolist()
        return collate_xrays([self.dataset[i] for i in indices])[1] if indices else torch.zeros(0, *self.shape[1:])


class _XrayCheck(torch.utils.data.Dataset):
    def __init__(self, cases: Sequence[OutcomeCase], where: str):
        self.cases = list(cases)
        self.where = where

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> int:
        case = self.cases[index]
        try:
            read_xray(case.image)
        except DataListError as e:
            raise DataListError(f"{self.where} case {case.case_id!r}: {e}") from None
        return index


def check_xrays(cases: Sequence[OutcomeCase], where: str = "", num_workers: int = 0) -> int:
    """Read every case's image once and drop it (the streamed trainer's quality-control pass).

    Args:
        cases: with an image path each.
        where: the split, for the message (``"train"``).
        num_workers: reader processes (0: in this process).

    Returns:
        the number of images read.

    Raises:
        DataListError: the first bad image met, naming the split, the case and the file.
    """
    loader = torch.utils.data.DataLoader(_XrayCheck(cases, where), batch_size=64, num_workers=num_workers, collate_fn=len)
    return sum(loader)
