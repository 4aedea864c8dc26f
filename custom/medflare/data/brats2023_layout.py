"""The BraTS 2023/2024 folder layout (GLI, MEN, MET, PED, SSA cohorts).

A subject is a folder ``BraTS-GLI-00000-000/`` holding ``BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f}.nii.gz``
and, for training data, ``BraTS-GLI-00000-000-seg.nii.gz``; the cohorts of 2023 (adult glioma
GLI, meningioma MEN, metastases MET, paediatric PED, Sub-Saharan Africa SSA) share the scheme
with their code in place of ``GLI``. The modalities are mapped to medflare's channel order
(:data:`~medflare.data.modality_names.MODALITIES`): t1n -> t1, t1c -> t1ce, t2w -> t2,
t2f -> flair. Labels follow the ``brats2023`` convention (1 necrotic core, 2 oedema / SNFH,
3 enhancing tumour; :mod:`medflare.data.tumour_label_conventions`).

A cohort that numbers otherwise (BraTS 2024's post-treatment glioma adds 4 = resection cavity;
2024 PED renumbered) is refused by the label check, naming the file and the values, not
trained on with the wrong regions.
"""

from __future__ import annotations

import os
import re

from medflare.data.brats_layout import BratsSubject
from medflare.data.data_errors import DataListError
from medflare.data.modality_names import MODALITIES

__all__ = ["COHORTS", "MODALITY_SUFFIXES", "LABEL_CONVENTION", "find_brats2023_subjects", "brats2023_cohort"]

#: Cohort codes accepted in ``BraTS-<cohort>-<case>-<timepoint>``.
COHORTS = ("GLI", "MEN", "MET", "PED", "SSA")

#: File suffix of each of :data:`MODALITIES`, in that order.
MODALITY_SUFFIXES = ("t1n", "t1c", "t2w", "t2f")

#: The label numbering of these data sets.
LABEL_CONVENTION = "brats2023"

_SID = rf"BraTS-(?P<cohort>{'|'.join(COHORTS)})-\d+-\d+"
_MODALITY_FILE = re.compile(rf"^(?P<sid>{_SID})-(?P<mod>{'|'.join(MODALITY_SUFFIXES)})\.nii(\.gz)?$", re.IGNORECASE)
_LABEL_FILE = re.compile(rf"^(?P<sid>{_SID})-seg\.nii(\.gz)?$", re.IGNORECASE)
_TO_MODALITY = dict(zip(MODALITY_SUFFIXES, MODALITIES))


def brats2023_cohort(subject_id: str) -> str:
    """The cohort code (``"GLI"``, ...) of a subject id ``BraTS-GLI-00000-000``."""
    return subject_id.split("-")[1].upper()


def find_brats2023_subjects(root: str) -> list[BratsSubject]:
    """Every BraTS 2023-style subject folder below ``root`` holding all four modalities, sorted
    by subject id; images in :data:`MODALITIES` order, ``label`` None when the folder has no
    ``-seg`` file.

    Raises:
        DataListError: ``root`` is not a folder, or a folder holds files of two subjects.
    """
    if not os.path.isdir(root):
        raise DataListError(f"BraTS data folder not found: {root}")
    subjects = []
    for folder, _, files in os.walk(root):
        found: dict[str, str] = {}
        label = None
        ids = set()
        for name in sorted(files):
            m = _MODALITY_FILE.match(name)
            if m:
                found[_TO_MODALITY[m.group("mod").lower()]] = os.path.join(folder, name)
                ids.add(m.group("sid"))
                continue
            m = _LABEL_FILE.match(name)
            if m:
                label = os.path.join(folder, name)
                ids.add(m.group("sid"))
        if len(ids) > 1:
            raise DataListError(f"folder {folder} holds the files of several BraTS subjects {sorted(ids)}; one subject per folder is expected")
        if all(mod in found for mod in MODALITIES):
            subjects.append(BratsSubject(ids.pop(), tuple(found[mod] for mod in MODALITIES), label))
    return sorted(subjects, key=lambda s: s.subject_id)
