"""DP-SGD in the trainers: networks it can train, per-sample gradients, per-patient clipping, records."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from medflare.privacy.dp_sgd import DPSGDSettings
from medflare.training.dp_networks import DPIncompatibleNetworkError, dp_incompatibilities, make_dp_compatible
from medflare.training.dp_sgd_step import per_sample_gradients
from medflare.training.model_spec import build_model
from medflare.training.outcome_networks import OutcomeNet
from medflare.training.seeded_networks import SeededDPSegResNet, SeededSegResNet
from medflare.training.segmentation_trainer import SegmentationTrainer
from tests.conftest import TINY_SEGRESNET
from tests.unit.training.test_outcome_trainer import TINY_DENSENET, logistic, make_trainer, separable, table_cases

TINY_ARGS = dict(TINY_SEGRESNET["args"])
TINY_RESNET = {
    "path": "monai.networks.nets.ResNet",
    "args": {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 8, 16, 16], "spatial_dims": 2, "n_input_channels": 1, "num_classes": 4},
}
INSECURE = dict(secure_noise=False)


def _loop_gradients(model, inputs, targets, loss_of_one):
    grads = []
    for i in range(len(targets)):
        model.zero_grad(set_to_none=True)
        if torch.is_tensor(inputs):
            out = model(inputs[i : i + 1])
        else:
            out = model(**{k: v[i : i + 1] for k, v in inputs.items()})
        loss_of_one(out, targets[i : i + 1]).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    return {k: torch.stack([g[k] for g in grads]) for k in grads[0]}


# --- networks ---------------------------------------------------------------------------------


def test_dp_segresnet_passes_opacus_strict_validation_and_keeps_segresnet_weights():
    from opacus.validators import ModuleValidator

    model = SeededDPSegResNet(seed=2, **TINY_ARGS)
    assert ModuleValidator.validate(model, strict=True) == []
    assert dp_incompatibilities(model) == []
    plain = SeededSegResNet(seed=2, **TINY_ARGS)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in model.state_dict().items())
    assert not list(model.buffers())  # nothing but learned weights can change
    x = torch.randn(1, 4, 16, 16, 16)
    plain.eval(), model.eval()
    torch.testing.assert_close(model(x), plain(x))  # same function, only out of place


def test_dp_segresnet_per_sample_gradients_match_the_per_sample_loop():
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    model = SeededDPSegResNet(seed=1, **TINY_ARGS)
    loss = DiceLoss(smooth_nr=0.0, smooth_dr=1e-5, squared_pred=True, sigmoid=True, batch=True)
    x = torch.randn(3, 4, 16, 16, 16)
    y = (torch.rand(3, 3, 16, 16, 16) > 0.7).float()
    grads, losses = per_sample_gradients(model, x, y, loss)
    expected = _loop_gradients(model, x, y, loss)
    assert losses.shape == (3,)
    for k in expected:
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("image_network", [TINY_DENSENET, TINY_RESNET], ids=["densenet", "resnet"])
def test_outcome_net_with_group_norm_is_dp_compatible_and_its_gradients_are_per_sample(image_network):
    net = OutcomeNet(num_outputs=2, clinical_features=3, image_network=image_network, image_features=4, seed=0, norm="group")
    assert dp_incompatibilities(net) == []
    assert not any("running" in k or "num_batches" in k for k in net.state_dict())
    again = OutcomeNet(num_outputs=2, clinical_features=3, image_network=image_network, image_features=4, seed=0, norm="group")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in net.state_dict().items())  # seeded as before
    inputs = {"image": torch.randn(4, 1, 32, 32), "clinical": torch.randn(4, 3)}
    targets = (torch.rand(4, 2) > 0.5).float()
    loss = torch.nn.BCEWithLogitsLoss()
    grads, _ = per_sample_gradients(net, inputs, targets, loss)
    expected = _loop_gradients(net, inputs, targets, loss)
    for k in expected:
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda: build_model(TINY_SEGRESNET), ["ResBlock) adds its residual in place", "ReLU(inplace=True)"]),
        (lambda: OutcomeNet(image_network=TINY_DENSENET, image_features=4, seed=0), ["image_net.features.norm0 (BatchNorm2d)", "GroupNorm"]),
        (lambda: OutcomeNet(image_network=TINY_RESNET, image_features=4, seed=0), ["layer1.0.bn1 (BatchNorm2d)", "layer1.0 (ResNetBlock)"]),
        (lambda: torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LSTM(2, 2)), ["LSTM", "ModuleValidator"]),
    ],
    ids=["segresnet", "densenet-batchnorm", "resnet-batchnorm", "lstm"],
)
def test_unfit_networks_are_named_layer_by_layer(build, names):
    problems = " ".join(dp_incompatibilities(build()))
    for name in names:
        assert name in problems


def test_make_dp_compatible_fixes_monai_networks():
    assert dp_incompatibilities(make_dp_compatible(build_model(TINY_SEGRESNET))) == []
    assert dp_incompatibilities(make_dp_compatible(build_model(TINY_RESNET))) == []


@pytest.mark.parametrize("kwargs, message", [({"norm": ("BATCH", {})}, "norm must be a group norm"), ({"act": "PRELU"}, "act must be ReLU")])
def test_dp_segresnet_refuses_what_it_cannot_make_private(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SeededDPSegResNet(**TINY_ARGS, **kwargs)


def test_outcome_net_refuses_an_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of \\['batch', 'group'\\], got 'layer'"):
        OutcomeNet(clinical_features=2, norm="layer")


# --- the segmentation trainer -----------------------------------------------------------------


def _seg_trainer(files, dp, model=None, crops=2):
    train, val = files
    return SegmentationTrainer(
        model or SeededDPSegResNet(seed=0, **TINY_ARGS),
        train,
        val,
        roi_size=(16, 16, 16),
        val_roi_size=(32, 32, 32),
        seed=1,
        crops_per_patient=crops,
        dp_sgd=dp,
    )


def test_segmentation_trainer_refuses_an_unfit_network_before_reading_data(tiny_site_files):
    with pytest.raises(DPIncompatibleNetworkError, match="down_layers.0.1 \\(ResBlock\\) adds its residual in place"):
        _seg_trainer(tiny_site_files, DPSGDSettings(1.0, 1.0, 1, **INSECURE), model=build_model(TINY_SEGRESNET))


def test_segmentation_dp_round_clips_each_patients_crops_together_and_records_it(tiny_site_files, monkeypatch):
    c = 0.05
    trainer = _seg_trainer(tiny_site_files, DPSGDSettings(1e-6, c, 2, **INSECURE), crops=3)
    n = trainer.num_train_cases
    before = trainer.get_weights()
    seen = []
    from medflare.training import dp_sgd_step

    original = dp_sgd_step.clip_patient_gradients

    def spy(per_sample, owner, num_patients, max_grad_norm):
        clipped, norms = original(per_sample, owner, num_patients, max_grad_norm)
        seen.append((owner.tolist(), num_patients, norms, clipped))
        return clipped, norms

    monkeypatch.setattr(dp_sgd_step, "clip_patient_gradients", spy)
    result = trainer.train(epochs=2)

    q = min(1.0, 2 / n)
    assert result.steps == 2 * math.ceil(1 / q)
    assert result.dp_sgd == {
        "mechanism": "dp_sgd",
        "neighbouring_relation": "add/remove one patient",
        "noise_multiplier": 1e-6,
        "max_grad_norm": c,
        "sample_rate": q,
        "steps": result.steps,
        "secure_noise": False,
    }
    for owner, patients, norms, clipped in seen:
        assert owner == sorted(owner) and len(owner) == 3 * patients  # three crops for each patient
        assert norms.shape == (patients,) and torch.all(norms > c)  # Dice gradients dwarf C: all clipped
        total = math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values()))
        assert total <= patients * c * (1 + 1e-5)
    after = trainer.get_weights()
    assert set(after) == set(before) and any(not np.array_equal(after[k], before[k]) for k in before)


def test_a_segmentation_step_without_patients_still_adds_noise(tiny_site_files, monkeypatch):
    trainer = _seg_trainer(tiny_site_files, DPSGDSettings(1.0, 1.0, 1, **INSECURE))
    from medflare.training.dp_sgd_step import DPSGDStep

    monkeypatch.setattr(DPSGDStep, "sample_patients", lambda self: torch.zeros(0, dtype=torch.int64))
    monkeypatch.setattr(trainer, "_crops_of", lambda patients: pytest.fail("no patient, no crop"))
    before = trainer.get_weights()
    result = trainer.train(epochs=1, max_steps=2)
    assert result.steps == 2 and result.dp_sgd["steps"] == 2 and math.isnan(result.mean_loss)
    after = trainer.get_weights()
    assert all(not np.array_equal(after[k], before[k]) for k in before)  # noise moved every weight


def test_seeded_dp_sgd_is_reproducible_and_secure_noise_is_not(tiny_site_files):
    runs = []
    for secure in (False, False, True):
        trainer = _seg_trainer(tiny_site_files, DPSGDSettings(1.0, 1.0, 2, secure_noise=secure), crops=1)
        trainer.train(epochs=1, max_steps=2)
        runs.append(trainer.get_weights()["convInit.conv.weight"])
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_dp_abort_is_honoured(tiny_site_files):
    trainer = _seg_trainer(tiny_site_files, DPSGDSettings(1.0, 1.0, 2, **INSECURE), crops=1)
    calls = []
    result = trainer.train(epochs=3, should_abort=lambda: calls.append(1) or len(calls) > 1)
    assert result.aborted and result.steps == 1 and result.dp_sgd["steps"] == 1


# --- the outcome trainer ----------------------------------------------------------------------


def test_outcome_dp_sgd_still_learns_an_easy_problem_with_moderate_noise():
    x, y = separable(200, 0)
    xt, yt = separable(100, 1)
    trainer = make_trainer(
        logistic(), table_cases(x, y), table_cases(xt, yt, "test"), optimizer="sgd", learning_rate=0.5,
        dp_sgd=DPSGDSettings(1.0, 1.0, 20, **INSECURE),
    )
    first = trainer.train(steps=5)
    last = trainer.train(epochs=5)
    assert last.dp_sgd["steps"] == 50 and last.dp_sgd["sample_rate"] == 0.1
    assert last.mean_loss < first.mean_loss
    assert trainer.validate()["accuracy"] > 0.9


def test_outcome_dp_sgd_clips_each_case_and_heavy_noise_hides_the_data():
    x, y = separable(40, 2)
    cases = table_cases(x * 100, y)  # huge inputs: huge gradients, all clipped
    trainer = make_trainer(logistic(), cases, table_cases(x, y, "test"), optimizer="sgd", learning_rate=1.0,
                           dp_sgd=DPSGDSettings(1e-8, 0.1, 40, **INSECURE))
    before = trainer.get_weights()
    trainer.train(steps=1)  # q = 1: all 40 cases, each clipped to 0.1; mean over q N = 40
    step = {k: trainer.get_weights()[k] - before[k] for k in before}
    assert math.sqrt(sum(float(np.sum(v**2)) for v in step.values())) <= 0.1 * (1 + 1e-4)


def test_outcome_trainer_refuses_batchnorm_under_dp(tmp_path):
    from tests.unit.training.test_outcome_trainer import write_images

    paths = write_images(tmp_path, 4, 0)
    cases = table_cases([[0]] * 4, [0, 1, 0, 1], images=paths)
    net = OutcomeNet(image_network=TINY_DENSENET, image_features=4, seed=0)
    with pytest.raises(DPIncompatibleNetworkError, match="BatchNorm2d.*use GroupNorm \\(OutcomeNet\\(norm='group'\\)"):
        make_trainer(net, cases, cases, image_size=(16, 16), dp_sgd=DPSGDSettings(1.0, 1.0, 2))
    fixed = OutcomeNet(image_network=TINY_DENSENET, image_features=4, seed=0, norm="group")
    trainer = make_trainer(fixed, cases, cases, image_size=(16, 16), dp_sgd=DPSGDSettings(1.0, 1.0, 2, **INSECURE))
    before = copy.deepcopy(trainer.get_weights())
    result = trainer.train(steps=2)
    assert result.dp_sgd["steps"] == 2 and set(trainer.get_weights()) == set(before)


def test_sibling_trains_with_its_own_dp_randomness():
    x, y = separable(40, 3)
    trainer = make_trainer(logistic(), table_cases(x, y), table_cases(x, y, "test"), dp_sgd=DPSGDSettings(1.0, 1.0, 4, **INSECURE))
    twin = trainer.sibling(logistic())
    assert twin._dp_randomness is not trainer._dp_randomness
    assert twin.train(steps=3).dp_sgd["steps"] == 3
