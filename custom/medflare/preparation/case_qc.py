"""Per-case quality control verdicts: pass, or fail with reasons; warnings either way.

A reason is a stable code (counted by the report, matched by tests) and a message naming the
file and what was found. The codes:

=========================  ==========================================================  =======
code                       meaning                                                     kind
=========================  ==========================================================  =======
``missing_file``           a file the datalist or table names does not exist           fail
``path_outside_data_root`` a path resolves outside the data root (``..``, symlink)     fail
``unreadable_file``        a file does not load (corrupt, truncated, not an image)     fail
``malformed_entry``        an entry lacks its image or label, or has an unsafe id      fail
``duplicate_case``         a case id appears twice                                     fail
``modality_count``         not one image per modality (or a 4-D image without 4)       fail
``wrong_dimensions``       an image is not 3-D (2-D for an X-ray)                      fail
``grid_mismatch``          the modalities differ in shape or affine                    fail
``spacing_out_of_range``   a voxel edge outside the recipe's ``spacing_range``         fail
``anisotropy``             longest / shortest voxel edge above ``max_anisotropy``      fail
``non_finite``             NaN or infinite intensities (or table values)               fail
``constant_image``         an image (or its percentile window) holds one value         fail
``negative_intensity``     a negative MR voxel where magnitude images cannot have one  fail
``image_too_small``        an X-ray edge below ``min_input_size``                      fail
``unknown_split``          a table row's split is neither train nor test               fail
``label_grid_mismatch``    the label's shape or affine differs from the images'       fail
``label_values``           label values outside the convention, or not integers        fail
``empty_tumour``           a label with no tumour voxel                                warning
``upsampled``              an X-ray smaller than the output size                       warning
=========================  ==========================================================  =======
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FAIL", "FAIL_CODES", "PASS", "QCFinding", "CaseVerdict", "CaseFailed", "WARNING_CODES"]

PASS = "pass"
FAIL = "fail"

FAIL_CODES = (
    "missing_file",
    "path_outside_data_root",
    "unreadable_file",
    "malformed_entry",
    "duplicate_case",
    "modality_count",
    "wrong_dimensions",
    "grid_mismatch",
    "spacing_out_of_range",
    "anisotropy",
    "non_finite",
    "constant_image",
    "negative_intensity",
    "image_too_small",
    "unknown_split",
    "label_grid_mismatch",
    "label_values",
)
WARNING_CODES = ("empty_tumour", "upsampled")


@dataclass(frozen=True)
class QCFinding:
    """One reason: a code of :data:`FAIL_CODES` or :data:`WARNING_CODES`, and the message."""

    code: str
    message: str

    def __post_init__(self):
        if self.code not in FAIL_CODES + WARNING_CODES:
            raise ValueError(f"QC code must be one of {list(FAIL_CODES + WARNING_CODES)}, got {self.code!r}")

    def as_json(self) -> dict:
        return {"code": self.code, "message": self.message}


class CaseFailed(Exception):
    """Raised inside a case's steps to stop them with a failing finding."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.finding = QCFinding(code, message)


@dataclass
class CaseVerdict:
    """The verdict on one case: failures (none: pass) and warnings."""

    case_id: str
    failures: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return FAIL if self.failures else PASS

    def fail(self, code: str, message: str) -> None:
        self.failures.append(QCFinding(code, message))

    def warn(self, code: str, message: str) -> None:
        self.warnings.append(QCFinding(code, message))

    def as_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "reasons": [f.as_json() for f in self.failures],
            "warnings": [f.as_json() for f in self.warnings],
        }
