"""Measure, at a site, what each privacy scope lets an attacker learn from the site's update.

For every scope of the site's installed ``privacy.json`` (and, as the reference, no site filter
at all) the job's own executor trains on the site's data, the scope's real filter chain (built
by NVFlare from the site's policy, against a scratch copy of the ledger:
:mod:`medflare.audit.scratch_site`) decides what leaves, and the attacks of
:mod:`medflare.attacks` are run on what left:

* **worst case**: one step on one patient (the job's executor with ``batch_size=1``,
  ``local_steps=1`` on a one-case datalist; a segmentation job takes one step of one crop of the
  whole volume, ``roi_size`` = the volume's shape unless the job resamples), for ``cases`` patients;
* **as configured**: the job's executor unchanged on all the site's training cases (its local
  epochs or steps, batch size and optimizer); the attacker inverts it as one batch of
  ``min(batch_size, 4)`` images, each scored against its most similar training case.

Scores (per scope and setting): SSIM and PSNR of each reconstruction against the true image
beside those of the prior baseline (the mean image of the site's other cases); the fraction of
cases where the attack beats the prior; re-identification (is the site case most similar to
the reconstruction the true one: worst case, chance ``1/N``; or a training case: as configured,
chance ``N_train/N``); label inference from the output layer's bias update (worst case: the
patient's labels; as configured: which labels the site's training set held) against the best
constant guess; how BatchNorm running statistics leave; the scope's epsilon from its privacy
record; and the utility cost of the scope: the key metric after ``utility_rounds`` rounds of
single-site training through the scope (the released update applied to the model each round)
against the same rounds unfiltered.

Threat model (stated in every report, :data:`THREAT_MODEL`): an honest-but-curious server.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FilterKey, ReturnCode
from nvflare.apis.signal import Signal

from medflare.audit.filter_round_trip import RoundTrip, train_round_trip, weights_task
from medflare.audit.job_under_audit import JobUnderAudit, load_job
from medflare.audit.scratch_site import AuditError, SiteUnderAudit, changed_files, open_site, scratch_copy, workspace_fingerprint

__all__ = ["AuditOptions", "run_audit", "THREAT_MODEL", "NOT_COVERED", "UNFILTERED", "SETTINGS", "ATTACKS"]

UNFILTERED = "(no site filter)"
SETTINGS = ("worst_case", "as_configured")
ATTACKS = ("inverting-gradients",)
AS_CONFIGURED_BATCH = 4

THREAT_MODEL = (
    "An honest-but-curious server (or anyone reading the update on the wire) that follows the protocol. It knows "
    "the architecture, the global weights it sent, the update that came back after the site's filters, the job's "
    "learning rate, optimizer and local steps, and the input shape. The reconstruction attack is also given each "
    "attacked case's labels and clinical values (as the site's trainer normalised them): a stronger attacker than "
    "one who must guess them. It sees one round, does not send crafted weights, and knows the site's patients "
    "only through the update."
)
NOT_COVERED = (
    "A malicious server sending crafted ('trap') weights; attacks across many rounds or on the aggregate; "
    "membership inference and attribute inference on the clinical table; reconstruction of the clinical values; "
    "3D segmentation volumes (label inference only, see docs/privacy.md); stronger attacks with more iterations "
    "or restarts than this run used. A failed attack bounds nothing: only a scope's epsilon does."
)


SEGMENTATION_INVERSION = (
    "not attempted for 3D segmentation: the attacker would have to rebuild four 3D modalities (4 x 32^3 = 131k "
    "unknowns per crop) and is not given the voxel label map an inversion needs, through a Dice loss and a random "
    "crop it does not know; label inference of the tumour regions is measured instead"
)


@dataclass(frozen=True)
class AuditOptions:
    """What the audit runs.

    Args:
        scopes: scope names to audit (``None``: every scope of the site's policy).
        cases: patients attacked in the worst case (>= 1).
        settings: a subset of :data:`SETTINGS`.
        attack: one of :data:`ATTACKS`.
        iterations, restarts: the inversion's budget (see
            :class:`~medflare.attacks.inverting_gradients.InversionSettings`).
        utility_rounds: rounds of the utility run (0: skip it).
        seed: which cases are attacked, and the attack's starting images.
        device: ``"auto"`` (the site's GPU when present), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    """

    scopes: Optional[Sequence[str]] = None
    cases: int = 5
    settings: Sequence[str] = SETTINGS
    attack: str = "inverting-gradients"
    iterations: int = 300
    restarts: int = 1
    utility_rounds: int = 3
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        from medflare.privacy.argument_checks import check_int

        check_int("cases", self.cases, low=1)
        check_int("iterations", self.iterations, low=1)
        check_int("restarts", self.restarts, low=1)
        check_int("utility_rounds", self.utility_rounds, low=0)
        check_int("seed", self.seed, low=0)
        if not self.settings or any(s not in SETTINGS for s in self.settings):
            raise ValueError(f"settings must be a non-empty subset of {list(SETTINGS)}, got {list(self.settings)!r}")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {list(ATTACKS)}, got {self.attack!r}")
        if self.scopes is not None and (not self.scopes or any(not isinstance(s, str) or not s for s in self.scopes)):
            raise ValueError(f"scopes must be null (all) or a non-empty list of scope names, got {self.scopes!r}")


# the site's cases as the network sees them ----------------------------------------------------


@dataclass
class SiteCases:
    """The site's cases as the job's trainer prepared them (CPU tensors; train first, then test)."""

    ids: list
    split: list
    images: Optional[torch.Tensor]  # (N, 1, H, W) in [0, 1], or None for a table-only model
    clinical: Optional[torch.Tensor]
    labels: torch.Tensor  # (N, K)
    rows: list = field(default_factory=list)  # the CSV rows (datalist items), for one-case datalists
    header: list = field(default_factory=list)  # the CSV's columns
    shapes: list = field(default_factory=list)  # a segmentation case's volume shape
    datalist: Optional[dict] = None  # a segmentation site's datalist JSON, for one-case datalists

    @property
    def train_indices(self) -> list:
        return [i for i, s in enumerate(self.split) if s == "train"]


def _outcome_cases(executor, datalist: str) -> SiteCases:
    trainer = executor._trainer
    with open(datalist, newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), list(reader.fieldnames or [])
    ordered = [r for r in rows if (r.get("split") or "").strip() == "train"] + [r for r in rows if (r.get("split") or "").strip() == "test"]

    def joined(key):
        parts = [trainer.train_data[key], trainer.test_data[key]]
        return None if parts[0] is None else torch.cat([p.detach().cpu() for p in parts])

    # read through the trainer, so a site that streams its images is audited the same way
    images = [trainer.read_images(split, range(n)) for split, n in (("train", trainer.num_train_cases), ("test", trainer.num_test_cases))]
    return SiteCases(
        ids=[r["case_id"].strip() for r in ordered],
        split=[r["split"].strip() for r in ordered],
        images=None if images[0] is None else torch.cat(images),
        clinical=joined("clinical"),
        labels=joined("labels"),
        rows=ordered,
        header=header,
    )


#: the tumour regions the segmentation head predicts (medflare.data.tumour_label_conventions.tumour_regions)
BRATS_REGIONS = ("tumour core", "whole tumour", "enhancing tumour")


def _segmentation_cases(datalist: str, data_root: str) -> SiteCases:
    """The site's training subjects, with which tumour regions each label volume holds (in the
    label convention of the site's datalist, as the trainer converts them)."""
    import json

    import nibabel as nib

    from medflare.data.brats_layout import load_datalist
    from medflare.data.tumour_label_conventions import DEFAULT_CONVENTION, get_convention, tumour_regions

    training, _ = load_datalist(datalist, data_root, check_files=True)
    with open(datalist) as f:
        content = json.load(f)
    labels, shapes = [], []
    for item in training:
        volume = np.asarray(nib.load(item["label"]).dataobj)
        convention = get_convention(item.get("label_convention", DEFAULT_CONVENTION))
        labels.append([bool(c.any()) for c in tumour_regions(volume, convention)])
        shapes.append([int(n) for n in volume.shape[:3]])
    ids = [str(item.get("subject", os.path.basename(item["label"]))) for item in content["training"]]
    return SiteCases(
        ids, ["train"] * len(ids), None, None, torch.tensor(labels, dtype=torch.float32), list(content["training"]),
        shapes=shapes, datalist=content,
    )


def _one_case_datalist(cases: SiteCases, index: int, folder: str) -> str:
    """A copy of the site's datalist with one training case (and all the test/validation cases)."""
    if cases.datalist is not None:  # a BraTS datalist
        import json

        content = dict(cases.datalist, training=[cases.rows[index]])
        path = os.path.join(folder, f"one_case_{index}.json")
        with open(path, "w") as f:
            json.dump(content, f)
        return path
    path = os.path.join(folder, f"one_case_{index}.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cases.header)
        writer.writeheader()
        writer.writerow(cases.rows[index])
        for row in cases.rows:
            if row["split"].strip() == "test":
                writer.writerow(row)
    return path


# attacks on one released update ---------------------------------------------------------------


def _output_bias(model: torch.nn.Module, num_outputs: int) -> Optional[str]:
    """The name of the output layer's bias: the last parameter named ``*bias`` of ``(K,)``."""
    found = None
    for name, p in model.named_parameters():
        if name.endswith("bias") and tuple(p.shape) == (num_outputs,):
            found = name
    return found


def _label_attack(trip: RoundTrip, bias_name: Optional[str], truth: np.ndarray, single: bool, constant: np.ndarray, dice: bool = False) -> dict:
    from medflare.attacks.label_inference import infer_labels, infer_regions_dice, label_accuracy

    baseline = float((constant == truth).mean())
    if trip.released is None or bias_name is None or bias_name not in trip.released:
        return {"accuracy": None, "baseline_accuracy": baseline, "note": "nothing released" if trip.released is None else "no output bias released"}
    if dice:
        inferred = infer_regions_dice(trip.released[bias_name])
    else:
        inferred = infer_labels(trip.released[bias_name], "sigmoid", "weight_difference", single_sample=single)
    return {
        "accuracy": label_accuracy(inferred, truth),
        "baseline_accuracy": baseline,
        "predicted": inferred.present.astype(int).tolist(),
        "truth": truth.astype(int).tolist(),
    }


def _batchnorm_leak(trip: RoundTrip) -> Optional[dict]:
    """How the running statistics (per-channel moments of the patients' activations) left."""
    if trip.raw is None:
        return None
    names = [k for k in trip.raw if k.endswith(("running_mean", "running_var"))]
    if not names:
        return {"entries": 0, "released_fraction": 0.0, "exact_fraction": 0.0}
    total = sum(trip.raw[k].size for k in names)
    if trip.released is None:
        return {"entries": int(total), "released_fraction": 0.0, "exact_fraction": 0.0}
    sent = exact = 0
    for k in names:
        out = trip.released.get(k)
        if out is None:
            continue
        sent += int(np.count_nonzero(out))
        exact += int(np.count_nonzero((out == trip.raw[k]) & (trip.raw[k] != 0)))
    return {"entries": int(total), "released_fraction": sent / total, "exact_fraction": exact / total}


def _released_fraction(trip: RoundTrip) -> Optional[float]:
    if trip.released is None:
        return None
    total = sum(v.size for v in trip.released.values())
    return sum(int(np.count_nonzero(v)) for v in trip.released.values()) / total if total else 0.0


@dataclass
class _Attacker:
    job: JobUnderAudit
    weights: dict
    options: AuditOptions
    parameters: frozenset

    @classmethod
    def of(cls, job: JobUnderAudit, weights: dict, options: AuditOptions) -> "_Attacker":
        model = job.network(weights)
        return cls(job, weights, options, frozenset(n for n, _ in model.named_parameters()))

    def invert(self, trip: RoundTrip, labels: torch.Tensor, clinical: Optional[torch.Tensor], shape: tuple, seed: int):
        from medflare.attacks.inverting_gradients import InversionSettings, invert_gradients

        args = self.job.executor_args
        update = {k: torch.as_tensor(v) for k, v in trip.released.items() if k in self.parameters}
        sparse = trip.masks is not None and any(not m.all() for m in trip.masks.values())
        released = {k: torch.as_tensor(trip.masks[k]) for k in update} if sparse else "nonzero"
        settings = InversionSettings(iterations=self.options.iterations, restarts=self.options.restarts, seed=seed)
        return invert_gradients(
            self.job.network(self.weights),
            update,
            labels,
            shape,
            loss="bce_with_logits",
            update_kind="weight_difference",
            learning_rate=float(args.get("learning_rate", 1e-3)),
            released=released,
            extra_inputs={"clinical": clinical} if clinical is not None else (),
            settings=settings,
            device=self.options.device,
            gradient_transform="adam_step" if args.get("optimizer", "adam") == "adam" else "none",
        )


def _image_scores(recon: torch.Tensor, truth: torch.Tensor, prior: torch.Tensor) -> dict:
    from medflare.attacks.image_scores import psnr, ssim

    return {
        "ssim": float(ssim(recon, truth, 1.0)[0]),
        "psnr": float(psnr(recon, truth, 1.0)[0]),
        "prior_ssim": float(ssim(prior, truth, 1.0)[0]),
        "prior_psnr": float(psnr(prior, truth, 1.0)[0]),
    }


def _summary(case_rows: list, chance: float) -> dict:
    scored = [c for c in case_rows if c.get("ssim") is not None]
    out = {"cases": case_rows, "chance": chance}
    if not case_rows:
        return out
    out["attacked"] = len(scored)
    out["beat_prior_fraction"] = sum(bool(c.get("beats_prior")) for c in case_rows) / len(case_rows)
    out["reidentification_rate"] = sum(bool(c.get("reidentified")) for c in case_rows) / len(case_rows)
    if scored:
        for key in ("ssim", "psnr", "prior_ssim", "prior_psnr"):
            values = [c[key] for c in scored if math.isfinite(c[key])]
            out[f"mean_{key}"] = float(np.mean(values)) if values else None
    return out


# the audit ------------------------------------------------------------------------------------


class _Run:
    def __init__(self, site: SiteUnderAudit, job: JobUnderAudit, options: AuditOptions, log: Callable[[str], None], folder: str):
        self.site, self.job, self.options, self.log, self.folder = site, job, options, log, folder
        self.weights = job.global_weights()
        self.filters = job.build_filters()
        self.attacker = _Attacker.of(job, self.weights, options)
        self.montage: dict = {}  # (scope, case index) -> reconstruction
        self.timings: list = []

    def _trip(self, scope: Optional[str], data=None, rounds: int = 1, validate: bool = False, **overrides):
        """A fresh scratch site and executor; ``rounds`` train tasks (the utility run chains them)."""
        trips = []
        # the same randomness (dropout masks, crops) for every scope: the scopes' differences are the filters'
        with torch.random.fork_rng(devices=[]), scratch_copy(self.site, data) as scratch:
            torch.manual_seed(self.options.seed)
            scratch.use_scope(scope)
            executor = self.job.build_executor(**overrides)
            executor.handle_event(EventType.START_RUN, scratch.fl_ctx)
            weights = self.weights
            filters = self.filters if scope is not None else {}
            for r in range(rounds):
                trip = train_round_trip(executor, scratch.fl_ctx, weights, filters, r, self.job.num_rounds)
                trips.append(trip)
                if trip.released is not None and validate:
                    weights = {k: (np.asarray(weights[k]) + trip.released[k]).astype(np.asarray(weights[k]).dtype) if k in trip.released else weights[k] for k in weights}
            metric = None
            if validate:
                reply = executor.execute("validate", weights_task(weights, rounds, self.job.num_rounds), scratch.fl_ctx, Signal())
                if reply.get_return_code(ReturnCode.OK) == ReturnCode.OK:
                    metric = from_shareable(reply).data.get(executor.key_metric)
            trainer = executor._trainer
            executor.handle_event(EventType.END_RUN, scratch.fl_ctx)
        return trips, metric, trainer

    def site_cases(self) -> SiteCases:
        if self.job.kind == "segmentation":
            return _segmentation_cases(self.site.data.datalist, self.site.data.data_root)
        with scratch_copy(self.site) as scratch:
            executor = self.job.build_executor()
            executor.handle_event(EventType.START_RUN, scratch.fl_ctx)
            if executor._trainer is None:
                raise AuditError(f"the job's executor cannot load the site's data: {executor._setup_error}")
            cases = _outcome_cases(executor, self.site.data.datalist)
            executor.handle_event(EventType.END_RUN, scratch.fl_ctx)
        return cases

    def scope_row(self, scope: Optional[str], setting: str, trip: RoundTrip) -> dict:
        filters = []
        if scope is not None:
            s = next(x for x in self._policy_scopes if x.get("name") == scope)
            filters = [f["path"].rsplit(".", 1)[-1] for f in s.get("task_result_filters", [])]
            filters += [f"{f.__class__.__name__} (job)" for f in self.filters.get(f"train{FilterKey.DELIMITER}{FilterKey.OUT}", [])]
        return {
            "scope": scope or UNFILTERED,
            "setting": setting,
            "filters": filters,
            "released": trip.released is not None,
            "blocked": trip.blocked,
            "released_fraction": _released_fraction(trip),
            "epsilon": trip.epsilon,
            "privacy_records": trip.privacy_records,
            "batchnorm_statistics": _batchnorm_leak(trip),
            "encrypted": trip.encrypted,
        }

    @functools.cached_property
    def _policy_scopes(self) -> list:
        import json

        with open(self.site.privacy_file) as f:
            return json.load(f)["scopes"]

    # worst case: one step on one case
    def worst_case(self, scopes, cases: SiteCases, chosen: list) -> list:
        args = self.job.executor_args
        if self.job.kind == "segmentation":
            overrides = {"batch_size": 1, "local_epochs": 1, "max_steps_per_round": 1}
        else:
            overrides = {"batch_size": 1, "local_steps": 1, "local_epochs": 1}
        if args.get("dp_sgd"):
            overrides["dp_sgd"] = {"expected_patients_per_step": 1}
        num_outputs = cases.labels.shape[1]
        bias = _output_bias(self.attacker.job.network(self.weights), num_outputs)
        constant = (cases.labels[cases.train_indices].float().mean(0) >= 0.5).numpy()
        rows = {s: self.scope_row(s, "worst_case", RoundTrip()) for s in scopes}
        per_scope = {s: {"cases": [], "labels": []} for s in scopes}
        with tempfile.TemporaryDirectory(prefix="medflare-audit-data-") as data_folder:
            for n, index in enumerate(chosen):
                datalist = _one_case_datalist(cases, index, data_folder)
                if self.job.kind == "segmentation" and not args.get("pixdim") and cases.shapes:
                    # the whole volume as the one crop: the update then holds every region the case has
                    overrides["roi_size"] = cases.shapes[index]
                for scope in scopes:
                    start = time.perf_counter()
                    (trip,), _, trainer = self._trip(scope, data=(self.site.data.data_root, datalist), **overrides)
                    if n == 0:
                        rows[scope] = self.scope_row(scope, "worst_case", trip)
                    truth_labels = cases.labels[index].numpy() > 0.5
                    per_scope[scope]["labels"].append(_label_attack(trip, bias, truth_labels, True, constant, self.job.kind == "segmentation"))
                    per_scope[scope]["cases"].append(self._invert_one(scope, trip, trainer, cases, index))
                    self.timings.append({"setting": "worst_case", "scope": scope or UNFILTERED, "seconds": time.perf_counter() - start})
                    self.log(f"  worst case, case {cases.ids[index]}, scope {scope or UNFILTERED}: {self._brief(per_scope[scope]['cases'][-1], trip)}")
        out = []
        for scope in scopes:
            row = rows[scope]
            row["inversion"] = _summary(per_scope[scope]["cases"], 1.0 / len(cases.ids)) if cases.images is not None else {"skipped": self._no_inversion()}
            row["labels"] = _label_summary(per_scope[scope]["labels"])
            out.append(row)
        return out

    def _no_inversion(self) -> str:
        if self.job.kind == "segmentation":
            return SEGMENTATION_INVERSION
        return "the model takes no image (a clinical table): reconstructing table values is not covered"

    def _brief(self, case: dict, trip: RoundTrip) -> str:
        if trip.released is None:
            return f"blocked ({(trip.blocked or '')[:120]})"
        if case.get("ssim") is None:
            return case.get("note", "released")
        return f"SSIM {case['ssim']:.3f} vs prior {case['prior_ssim']:.3f}, re-identified {case['reidentified']}"

    def _invert_one(self, scope, trip: RoundTrip, trainer, cases: SiteCases, index: int) -> dict:
        from medflare.attacks.image_scores import prior_baseline, reidentification

        row = {"case_id": cases.ids[index]}
        if cases.images is None:
            return {**row, "ssim": None, "note": "no image attack for this model"}
        truth = cases.images[index : index + 1]
        prior = prior_baseline(cases.images, index)
        if trip.released is None:
            return {**row, "ssim": None, "beats_prior": False, "reidentified": False, "note": "nothing released"}
        labels = trainer.train_data["labels"][:1].detach().cpu()
        clinical = trainer.train_data["clinical"][:1].detach().cpu() if trainer.train_data["clinical"] is not None else None
        try:
            inversion = self.attacker.invert(trip, labels, clinical, tuple(truth.shape), self.options.seed + index)
        except ValueError as e:
            return {**row, "ssim": None, "beats_prior": False, "reidentified": False, "note": f"nothing to match: {e}"}
        recon = inversion.reconstruction
        scores = _image_scores(recon, truth, prior)
        reid = reidentification(recon, cases.images, [index], 1.0)
        self.montage[(scope or UNFILTERED, index)] = recon[0, 0].numpy()
        return {
            **row,
            **scores,
            "beats_prior": scores["ssim"] > scores["prior_ssim"],
            "reidentified": bool(reid.correct[0]),
            "matching_loss": inversion.matching_loss,
        }

    # as configured: the job's executor unchanged
    def as_configured(self, scopes, cases: SiteCases) -> list:
        from medflare.attacks.image_scores import ssim

        train = cases.train_indices
        num_outputs = cases.labels.shape[1]
        bias = _output_bias(self.attacker.job.network(self.weights), num_outputs)
        truth = (cases.labels[train] > 0.5).any(0).numpy()
        constant = np.ones_like(truth)  # a site's training set holds every label: the best constant guess
        k = min(int(self.job.executor_args.get("batch_size", 1)), AS_CONFIGURED_BATCH, len(train))
        attacked = train[:k]
        out = []
        for scope in scopes:
            start = time.perf_counter()
            (trip,), _, trainer = self._trip(scope)
            row = self.scope_row(scope, "as_configured", trip)
            row["labels"] = _label_summary([_label_attack(trip, bias, truth, False, constant, self.job.kind == "segmentation")])
            if cases.images is None:
                row["inversion"] = {"skipped": self._no_inversion()}
            else:
                mean_image = cases.images.mean(0, keepdim=True)
                case_rows = []
                if trip.released is None:
                    case_rows = [{"case_id": None, "ssim": None, "beats_prior": False, "reidentified": False, "note": "nothing released"}] * k
                else:
                    try:
                        inversion = self.attacker.invert(
                            trip, cases.labels[attacked], cases.clinical[attacked] if cases.clinical is not None else None,
                            (k, *cases.images.shape[1:]), self.options.seed,
                        )
                    except ValueError as e:
                        inversion = None
                        case_rows = [{"case_id": None, "ssim": None, "beats_prior": False, "reidentified": False, "note": f"nothing to match: {e}"}] * k
                    if inversion is not None:
                        train_images = cases.images[train]
                        from medflare.attacks.image_scores import psnr

                        # the prior's best match among the training cases, as the reconstruction's
                        prior_best = float(ssim(mean_image, train_images, 1.0).max())
                        prior_best_psnr = float(np.max(psnr(mean_image, train_images, 1.0)))
                        for m in range(k):
                            recon = inversion.reconstruction[m : m + 1]
                            against_train = ssim(recon, train_images, 1.0)
                            best = int(np.argmax(against_train))
                            against_all = ssim(recon, cases.images, 1.0)
                            nearest = int(np.argmax(against_all))
                            scores = _image_scores(recon, train_images[best : best + 1], mean_image)
                            scores["prior_ssim"], scores["prior_psnr"] = prior_best, prior_best_psnr
                            case_rows.append({
                                "case_id": cases.ids[train[best]],
                                **scores,
                                "beats_prior": scores["ssim"] > prior_best,
                                "reidentified": cases.split[nearest] == "train",
                                "matching_loss": inversion.matching_loss,
                            })
                            if m == 0:
                                self.montage[(scope or UNFILTERED, "as_configured")] = recon[0, 0].numpy()
                row["inversion"] = _summary(case_rows, len(train) / len(cases.ids))
            self.timings.append({"setting": "as_configured", "scope": scope or UNFILTERED, "seconds": time.perf_counter() - start})
            self.log(f"  as configured, scope {scope or UNFILTERED}: {'blocked' if trip.released is None else 'released'}")
            out.append(row)
        return out

    def utility(self, scopes) -> dict:
        rounds = self.options.utility_rounds
        results = {}
        for scope in scopes:
            trips, metric, _ = self._trip(scope, rounds=rounds, validate=True)
            released = sum(t.released is not None for t in trips)
            last = next((t.epsilon for t in reversed(trips) if t.epsilon), None)
            results[scope or UNFILTERED] = {
                "rounds": rounds,
                "released_rounds": released,
                "metric": metric,
                "epsilon_site_after": last.get("epsilon_site") if last else None,
                "blocked": next((t.blocked for t in trips if t.blocked), None),
            }
            self.log(f"  utility, scope {scope or UNFILTERED}: {metric} after {rounds} rounds ({released} released)")
        reference = results.get(UNFILTERED, {}).get("metric")
        for value in results.values():
            m = value["metric"]
            value["cost"] = (reference - m) if isinstance(reference, float) and isinstance(m, float) else None
        return results


def _label_summary(rows: list) -> dict:
    scored = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
    return {
        "accuracy": float(np.mean(scored)) if scored else None,
        "baseline_accuracy": float(np.mean([r["baseline_accuracy"] for r in rows])) if rows else None,
        "cases": rows,
    }


def _verdict(row: dict, reference: Optional[dict]) -> str:
    if not row["released"]:
        return "nothing released"
    if row.get("encrypted"):
        return "released as CKKS ciphertexts: the server reads nothing; " + _verdict({**row, "encrypted": False}, reference) + (
            ", as measured here on what a holder of the federation's key (any site, e.g. one colluding with the server) reads"
        )
    inversion = row.get("inversion", {})
    beats = inversion.get("beat_prior_fraction")
    if beats is None:
        return "released (no image attack for this model)"
    if beats > 0:
        return f"attack beats the prior on {beats:.0%} of cases"
    ref = (reference or {}).get("inversion", {}).get("beat_prior_fraction")
    if row["scope"] != UNFILTERED and ref is not None and ref == 0:
        return (
            "at or below the prior, but so is the unfiltered update in this setting: the job's training (network, "
            "optimizer, steps, batch) defeats this attack here, not the filter"
        )
    return "at or below the prior"


def run_audit(workspace: str, job_dir: str, out_dir: Optional[str] = None, options: AuditOptions = AuditOptions(), log=print) -> dict:
    """Audit ``job_dir`` at the site of ``workspace``; write the report to ``out_dir``.

    Args:
        workspace: the FLARE client's workspace (``local/privacy.json``, its data configuration).
        job_dir: the job folder the site is asked to run.
        out_dir: where the report goes (default ``<workspace>/audit/<job>-<UTC time>``); the
            only place the audit writes.
        options: :class:`AuditOptions`.

    Returns:
        The report (also written as ``report.json``), with ``report_dir``.

    Raises:
        AuditError: a workspace, job or scope that cannot be audited, named; or a change to the
            workspace outside the report folder (which would be a bug: nothing may change).
    """
    from medflare.audit.audit_report import write_json, write_report

    job = load_job(job_dir)
    with torch.random.fork_rng(devices=[]):  # the data set its executor asks the site for; no randomness used up
        executor = job.build_executor()
    site = open_site(workspace, dataset=executor.dataset_name, dataset_from=executor.dataset_origin)
    scopes = list(options.scopes) if options.scopes is not None else list(site.scopes)
    unknown = [s for s in scopes if s not in site.scopes]
    if unknown:
        raise AuditError(f"--scope {unknown[0]!r}: the site's privacy.json ({site.privacy_file}) defines {list(site.scopes)}")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out_dir = os.path.abspath(out_dir or os.path.join(site.workspace, "audit", f"{job.name}-{stamp}"))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise AuditError(f"--out {out_dir}: exists and is not a folder")
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {"report.json", "report.txt", "montage.png"}:
        raise AuditError(f"--out {out_dir}: holds files other than an earlier audit report; give an empty or new folder")
    seal = site.budget.seal_path if site.budget is not None and site.budget.seal_path else None
    before = workspace_fingerprint(site.workspace, skip=out_dir)
    seal_before = workspace_fingerprint(os.path.dirname(seal)) if seal and os.path.isdir(os.path.dirname(seal)) else {}
    started = time.perf_counter()

    run = _Run(site, job, options, log, out_dir)
    cases = run.site_cases()
    rng = np.random.default_rng(options.seed)
    train = cases.train_indices
    chosen = sorted(rng.choice(train, size=min(options.cases, len(train)), replace=False).tolist())
    audited = [None] + scopes
    log(f"medflare audit: site {site.name}, job {job.name}, scopes {scopes}, {len(chosen)} case(s) of {len(cases.ids)}")
    rows = []
    if "worst_case" in options.settings:
        rows += run.worst_case(audited, cases, chosen)
    if "as_configured" in options.settings:
        rows += run.as_configured(audited, cases)
    utility = run.utility(audited) if options.utility_rounds > 0 else {}
    job_scope = job.scope or site.default_scope
    for row in rows:
        row["job_runs_under_it"] = row["scope"] == job_scope
        reference = next((r for r in rows if r["scope"] == UNFILTERED and r["setting"] == row["setting"]), None)
        row["verdict"] = _verdict(row, reference)
        row["utility"] = utility.get(row["scope"])
    report = {
        "site": site.name,
        "workspace": site.workspace,
        "job": job.name,
        "job_folder": job.folder,
        "job_scope": job.scope,
        "default_scope": site.default_scope,
        "executor": {k: job.executor_args.get(k) for k in ("batch_size", "local_epochs", "local_steps", "learning_rate", "optimizer", "dp_sgd")},
        "attack": options.attack,
        "options": {"cases": options.cases, "iterations": options.iterations, "restarts": options.restarts, "utility_rounds": options.utility_rounds, "seed": options.seed, "settings": list(options.settings)},
        "site_cases": len(cases.ids),
        "attacked_cases": [cases.ids[i] for i in chosen],
        "threat_model": THREAT_MODEL,
        "not_covered": NOT_COVERED,
        "rows": rows,
        "timings": run.timings,
        "seconds": time.perf_counter() - started,
        "report_dir": out_dir,
    }
    from medflare.attacks.image_scores import prior_baseline

    truth = {i: (cases.images[i, 0].numpy(), prior_baseline(cases.images, i)[0, 0].numpy()) for i in chosen} if cases.images is not None else {}
    write_report(report, out_dir, run.montage, truth, {i: cases.ids[i] for i in chosen})
    after = workspace_fingerprint(site.workspace, skip=out_dir)
    changed = changed_files(before, after)
    if seal_before:
        changed += [f"{seal}: {p}" for p in changed_files(seal_before, workspace_fingerprint(os.path.dirname(seal)))]
    configuration = [p for p in changed if p.split(os.sep)[0] in ("local", "startup") or p.startswith(f"{seal}:")]
    if configuration:
        raise AuditError(
            f"the site's configuration or ledger changed while the audit ran ({configuration[:5]}): if the FLARE "
            f"client released a result meanwhile, that was the client; otherwise report this as a bug in medflare audit"
        )
    report["workspace_changes_by_others"] = changed  # e.g. the running client's logs; the audit writes none
    if changed:
        write_json(report, out_dir)
    return report

