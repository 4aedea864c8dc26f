"""OutcomeTrainer's streamed images, augmentation, mixed precision and masked labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import medflare.training.xray_dataset as xray_dataset
from medflare.data.data_errors import DataListError
from medflare.data.outcome_table import OutcomeCase
from medflare.privacy.dp_sgd import DPSGDSettings
from medflare.training.outcome_networks import OutcomeNet
from medflare.training.outcome_trainer import OutcomeTrainer, classification_metrics, masked_bce_with_logits
from medflare.training.xray_dataset import StreamedImages

TINY_DENSENET = {
    "path": "monai.networks.nets.DenseNet",
    "args": {"spatial_dims": 2, "in_channels": 1, "init_features": 4, "growth_rate": 4, "block_config": [1, 1]},
}
SIZE = (16, 16)


def write_cases(folder, count, split, seed, shape=(20, 20), labels=None):
    """``count`` cases of ``split`` with a noise PNG of ``shape``, 2 clinical values and a label."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        path = folder / f"{split}-{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        label = (i % 2,) if labels is None else labels[i]
        cases.append(OutcomeCase(f"{split}-{i}", split, str(path), tuple(float(v) for v in rng.normal(size=2)), label))
    return cases


@pytest.fixture
def site(tmp_path):
    return write_cases(tmp_path, 8, "train", 1), write_cases(tmp_path, 5, "test", 2)


def fusion_net(norm="batch"):
    return OutcomeNet(num_outputs=1, clinical_features=2, image_network=TINY_DENSENET, image_features=4, clinical_hidden=[], seed=0, norm=norm)


def make(train, test, model=None, **kwargs):
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("image_size", SIZE)
    kwargs.setdefault("batch_size", 3)
    return OutcomeTrainer(model or fusion_net(), train, test, ["y"], **kwargs)


def record_training_images(trainer):
    """The images of every forward call in training mode, as numpy arrays."""
    seen = []

    def hook(module, args, kwargs):
        if module.training:
            seen.append(kwargs["image"].detach().cpu().numpy().copy())

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.fixture
def count_reads(monkeypatch):
    """A list that grows by one path per read_xray call made through medflare's image loading."""
    calls = []
    original = xray_dataset.read_xray

    def counted(path):
        calls.append(path)
        return original(path)

    monkeypatch.setattr(xray_dataset, "read_xray", counted)
    return calls


# --- streamed == in memory ---------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [dict(), dict(cache_rate=0.5), dict(num_workers=2), "persistent"],
    ids=["dataset", "cache-half", "two-workers", "persistent"],
)
def test_streamed_and_in_memory_train_the_same_model(site, tmp_path, stream):
    train, test = site
    if stream == "persistent":
        stream = dict(cache_dir=str(tmp_path / "cache"))
    memory, streamed = make(train, test), make(train, test, data_loading="stream", **stream)
    seen_memory, seen_stream = record_training_images(memory), record_training_images(streamed)
    result_memory, result_stream = memory.train(steps=4), streamed.train(steps=4)
    assert len(seen_stream) == 4 and [b.shape[0] for b in seen_stream] == [3, 3, 2, 3]
    for a, b in zip(seen_memory, seen_stream):
        np.testing.assert_array_equal(a, b)
    assert result_memory.mean_loss == result_stream.mean_loss
    for key, value in memory.get_weights().items():
        np.testing.assert_array_equal(value, streamed.get_weights()[key])
    np.testing.assert_array_equal(memory.predict(), streamed.predict())
    np.testing.assert_array_equal(memory.predict(memory.train_data), streamed.predict(streamed.train_data))
    assert memory.validate() == streamed.validate()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_streamed_dp_sgd_samples_through_the_dataset_like_the_in_memory_one(site, count_reads, num_workers):
    train, test = site
    # one patient expected per step of 8: about a third of the steps sample nobody (an empty batch)
    settings = DPSGDSettings(noise_multiplier=1.0, max_grad_norm=1.0, expected_patients_per_step=1, secure_noise=False)
    memory = make(train, test, model=fusion_net("group"), dp_sgd=settings)
    streamed = make(train, test, model=fusion_net("group"), dp_sgd=settings, data_loading="stream", check_images=False, num_workers=num_workers)
    del count_reads[:]
    result_memory, result_stream = memory.train(steps=6), streamed.train(steps=6)
    assert result_stream.dp_sgd == result_memory.dp_sgd and result_stream.steps == 6
    assert result_stream.mean_loss == result_memory.mean_loss or (math.isnan(result_stream.mean_loss) and math.isnan(result_memory.mean_loss))
    for key, value in memory.get_weights().items():
        np.testing.assert_array_equal(value, streamed.get_weights()[key])
    sampled = torch.Generator().manual_seed(0)
    counts = [int((torch.rand(8, generator=sampled) < 1 / 8).sum()) for _ in range(6)]
    assert 0 in counts and sum(counts) > 0  # the seed gives both empty and non-empty steps
    if num_workers == 0:  # the streamed trainer read only the sampled patients' images
        assert len(count_reads) == sum(counts)


def test_an_aborted_streamed_round_reads_no_image(site, count_reads):
    train, test = site
    trainer = make(train, test, data_loading="stream", check_images=False)
    result = trainer.train(steps=3, should_abort=lambda: True)
    assert result.aborted and result.steps == 0 and count_reads == []


# --- the streamed path holds no images ---------------------------------------------------


def test_a_streamed_trainer_reads_only_the_batch_it_trains_on(site, count_reads):
    train, test = site
    trainer = make(train, test, data_loading="stream", check_images=False, batch_size=2)
    assert count_reads == [] and isinstance(trainer.train_data["image"], StreamedImages)
    assert trainer.train_data["image"].shape == (8, 1, *SIZE)
    trainer.train(steps=1)
    assert len(count_reads) == 2
    trainer.validate()
    assert len(count_reads) == 2 + 5


def test_the_quality_pass_reads_every_image_but_keeps_none(site, count_reads):
    train, test = site
    trainer = make(train, test, data_loading="stream")
    assert sorted(count_reads) == sorted(c.image for c in train + test)
    assert not hasattr(trainer._sources["train"], "_cache")  # a plain MONAI Dataset: nothing held
    in_memory = make(train, test)
    assert torch.is_tensor(in_memory.train_data["image"]) and in_memory.train_data["image"].shape == (8, 1, *SIZE)


def test_a_persistent_cache_is_read_instead_of_the_images_and_keyed_by_image_size(site, tmp_path, count_reads):
    train, test = site
    cache = str(tmp_path / "cache")
    make(train, test, data_loading="stream", check_images=False, cache_dir=cache).predict()
    assert len(count_reads) == 5
    make(train, test, data_loading="stream", check_images=False, cache_dir=cache).predict()
    assert len(count_reads) == 5  # from the cache
    again = make(train, test, data_loading="stream", check_images=False, cache_dir=cache, image_size=(8, 8))
    again.predict()
    assert len(count_reads) == 10  # another size is another entry


def test_a_partial_cache_reads_its_share_when_built(site, count_reads):
    train, test = site
    make(train, test, data_loading="stream", check_images=False, cache_rate=0.5)
    assert len(count_reads) == 4 + 2  # MONAI caches int(0.5 * 8) and int(0.5 * 5)


def corrupt(case):
    with open(case.image, "wb") as f:
        f.write(b"not a png at all")


def test_a_corrupt_image_is_refused_before_training_naming_file_and_case(site):
    train, test = site
    corrupt(train[5])
    with pytest.raises(DataListError, match=rf"train case 'train-5'.*cannot read image {train[5].image}"):
        make(train, test, data_loading="stream")
    with pytest.raises(DataListError, match=rf"train case 'train-5'.*cannot read image {train[5].image}"):
        make(train, test)  # in memory: the same refusal


@pytest.mark.parametrize("num_workers", [0, 1])
def test_without_the_quality_pass_a_corrupt_image_fails_its_batch_naming_it(site, num_workers):
    train, test = site
    corrupt(test[4])
    trainer = make(train, test, data_loading="stream", check_images=False, num_workers=num_workers)
    trainer.train(steps=1)
    with pytest.raises(DataListError, match=rf"case 'test-4'.*cannot read image {test[4].image}"):
        trainer.validate()


# --- augmentation ------------------------------------------------------------------------


@pytest.mark.parametrize("loading", ["memory", "stream"])
def test_augmentation_changes_training_images_only(site, loading):
    train, test = site
    plain, augmented = make(train, test, data_loading=loading), make(train, test, data_loading=loading, augmentation={"probability": 1.0})
    seen_plain, seen_augmented = record_training_images(plain), record_training_images(augmented)
    plain.train(steps=2)
    # scoring does not augment: the same weights predict the same
    augmented.set_weights(plain.get_weights())
    np.testing.assert_array_equal(plain.predict(), augmented.predict())
    assert len(seen_augmented) == 0  # predict runs in eval mode, augmentation never ran there
    plain.set_weights(augmented.get_weights())
    augmented.train(steps=2)
    for a, b in zip(seen_plain, seen_augmented):
        assert a.shape == b.shape and np.abs(a - b).max() > 0.01


def test_augmentation_is_seeded_and_the_same_in_memory_and_streamed(site):
    train, test = site
    runs = []
    for loading, seed in (("memory", 0), ("stream", 0), ("memory", 1)):
        trainer = make(train, test, data_loading=loading, augmentation=True, seed=seed)
        seen = record_training_images(trainer)
        trainer.train(steps=2)
        runs.append(np.concatenate(seen))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_augmentation_with_workers_is_reproducible_and_differs_between_rounds(site):
    train, test = site
    rounds = []
    for _ in range(2):
        trainer = make(train, test, data_loading="stream", augmentation={"probability": 1.0}, num_workers=1, batch_size=8)
        seen = record_training_images(trainer)
        trainer.train(steps=1)
        trainer.train(steps=1)
        rounds.append(seen)
    np.testing.assert_array_equal(rounds[0][0], rounds[1][0])  # same seed, same images
    assert not np.array_equal(np.sort(rounds[0][0], axis=None), np.sort(rounds[0][1], axis=None))  # next round: new draws


def test_a_sibling_augments_afresh_from_the_seed(site):
    train, test = site
    trainer = make(train, test, data_loading="stream", augmentation=True)
    first = record_training_images(trainer)
    trainer.train(steps=2)
    twin = trainer.sibling(fusion_net())
    second = record_training_images(twin)
    twin.train(steps=2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


# --- mixed precision ---------------------------------------------------------------------


def test_amp_on_the_cpu_is_a_no_op(site):
    train, test = site
    plain, amp = make(train, test), make(train, test, amp=True)
    assert amp.amp is False and not amp.scaler.is_enabled()
    assert plain.train(steps=2).mean_loss == amp.train(steps=2).mean_loss
    np.testing.assert_array_equal(plain.predict(), amp.predict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP (autocast + GradScaler) runs only on CUDA; on a CPU amp is a no-op, tested above; no GPU is lent to CI")
def test_amp_on_cuda_trains_and_scores(site):  # pragma: no cover - CPU CI
    train, test = site
    trainer = make(train, test, amp=True, device="cuda", data_loading="stream", augmentation=True)
    assert trainer.amp and trainer.scaler.is_enabled()
    result = trainer.train(steps=3)
    assert math.isfinite(result.mean_loss) and np.all(np.isfinite(trainer.predict()))


# --- masked labels -----------------------------------------------------------------------


def bce(z, y):
    return -(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z))))


def test_the_masked_loss_averages_the_labelled_entries_and_masked_ones_have_no_gradient():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    loss = masked_bce_with_logits(logits, labels)
    # entries (0,0): log 2; (1,0): bce(-1, 0) = log(1 + e^-1); (1,1): log(1 + e^-3); mean of 3
    expected = (math.log(2) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 3
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert bce(-1.0, 0) == pytest.approx(math.log(1 + math.exp(-1)))
    loss.backward()
    assert float(logits.grad[0, 1]) == 0.0
    # d/dz of bce(z, 1) = sigmoid(z) - 1 = -1/2 at z = 0, over the 3 entries
    assert float(logits.grad[0, 0]) == pytest.approx(-0.5 / 3)
    everything_masked = torch.full((2, 2), -1.0)
    assert float(masked_bce_with_logits(logits.detach(), everything_masked)) == 0.0
    # with no mask it is the plain mean BCE
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), labels.clamp(min=0))
    assert float(masked_bce_with_logits(logits.detach(), labels.clamp(min=0))) == pytest.approx(float(plain))


def test_metrics_score_each_label_over_its_labelled_cases():
    labels = np.array([[0, -1], [0, 1], [1, -1], [1, 1], [-1, 1]])
    probabilities = np.array([[0.1, 0.9], [0.6, 0.8], [0.4, 0.1], [0.9, 0.2], [0.99, 0.7]])
    metrics = classification_metrics(labels, probabilities, ["a", "b"])
    # "a": the first four cases, the hand-worked AUC 3/4 and accuracy 1/2; "b": cases 1, 3, 4,
    # all positive (no AUC), 0.8, 0.2, 0.7 -> two of three above 0.5
    assert metrics["auc_a"] == pytest.approx(0.75) and metrics["accuracy_a"] == pytest.approx(0.5)
    assert math.isnan(metrics["auc_b"]) and metrics["accuracy_b"] == pytest.approx(2 / 3)
    assert metrics["auc"] == pytest.approx(0.75) and metrics["accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    none = classification_metrics(np.array([[-1], [-1]]), np.array([[0.2], [0.9]]), ["y"])
    assert math.isnan(none["auc"]) and math.isnan(none["accuracy"])


def table_net(outputs=2):
    return OutcomeNet(num_outputs=outputs, clinical_features=2, clinical_hidden=[], seed=0)


def table_cases(labels, split="train"):
    return [OutcomeCase(f"{split}-{i}", split, None, (float(i), 1.0 - i), tuple(y)) for i, y in enumerate(labels)]


def test_a_masked_label_leaves_its_output_untrained():
    # label "b" is masked everywhere in training: its output's weights get no gradient
    train = table_cases([(0, -1), (1, -1), (1, -1), (0, -1)])
    trainer = OutcomeTrainer(table_net(), train, table_cases([(0, 1), (1, 0)], "test"), ["a", "b"], device="cpu", learning_rate=0.1)
    before = trainer.get_weights()
    trainer.train(steps=3)
    after = trainer.get_weights()
    np.testing.assert_array_equal(after["head.weight"][1], before["head.weight"][1])
    np.testing.assert_array_equal(after["head.bias"][1], before["head.bias"][1])
    assert not np.array_equal(after["head.weight"][0], before["head.weight"][0])


def test_under_dp_sgd_a_patient_with_every_label_masked_has_no_gradient():
    train = table_cases([(0, 1), (-1, -1), (1, 0)])
    settings = DPSGDSettings(noise_multiplier=0.5, max_grad_norm=10.0, expected_patients_per_step=3, secure_noise=False)
    trainer = OutcomeTrainer(table_net(), train, table_cases([(0, 1)], "test"), ["a", "b"], device="cpu", dp_sgd=settings)
    from medflare.training.dp_sgd_step import per_sample_gradients

    inputs = {"clinical": trainer.train_data["clinical"]}
    grads, losses = per_sample_gradients(trainer.model, inputs, trainer.train_data["labels"], trainer.loss_fn)
    assert float(losses[1]) == 0.0 and float(losses[0]) > 0
    assert all(float(g[1].abs().max()) == 0.0 for g in grads.values())
    assert all(float(g[0].abs().max()) > 0.0 for g in grads.values())
    result = trainer.train(steps=2)  # q = 1: every patient, the masked one included, each step
    assert result.steps == 2 and math.isfinite(result.mean_loss)


@pytest.mark.parametrize("bad", [(2,), (True,), (0.5,)])
def test_a_label_other_than_0_1_or_minus_1_is_refused_naming_the_case(bad):
    train = [OutcomeCase("p7", "train", None, (0.0, 1.0), bad), *table_cases([(0,)])[1:], OutcomeCase("p8", "train", None, (1.0, 0.0), (1,))]
    with pytest.raises(DataListError, match=r"train case 'p7': labels must be 0, 1 or -1"):
        OutcomeTrainer(table_net(1), train, table_cases([(0,)], "test"), ["a"], device="cpu")


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data_loading="disk"), r"data_loading must be one of \['memory', 'stream'\], got 'disk'"),
        (dict(data_loading=None), r"data_loading must be one of"),
        (dict(data_loading="stream", cache_rate=float("nan")), r"cache_rate must be a finite number in \[0, 1\], got nan"),
        (dict(data_loading="stream", cache_rate=float("inf")), r"cache_rate must be a finite number in \[0, 1\], got inf"),
        (dict(data_loading="stream", cache_rate=-0.1), r"cache_rate .* got -0.1"),
        (dict(data_loading="stream", cache_rate=1.5), r"cache_rate .* got 1.5"),
        (dict(data_loading="stream", cache_rate=True), r"cache_rate .* got True"),
        (dict(data_loading="stream", cache_rate="0.5"), r"cache_rate .* got '0.5'"),
        (dict(data_loading="stream", num_workers=-1), r"num_workers must be an int in \[0, 64\], got -1"),
        (dict(data_loading="stream", num_workers=True), r"num_workers must be an int in \[0, 64\], got True"),
        (dict(data_loading="stream", num_workers=2.0), r"num_workers .* got 2.0"),
        (dict(data_loading="stream", num_workers=65), r"num_workers .* got 65"),
        (dict(cache_rate=0.5), r"cache_rate=0.5 applies to data_loading='stream' only"),
        (dict(num_workers=2), r"num_workers=2 applies to data_loading='stream' only"),
        (dict(cache_dir="/tmp/x"), r"cache_dir='/tmp/x' applies to data_loading='stream' only"),
        (dict(data_loading="stream", cache_dir=""), r"cache_dir must be a folder path or null, got ''"),
        (dict(data_loading="stream", cache_dir=3), r"cache_dir must be a folder path or null, got 3"),
        (dict(data_loading="stream", cache_dir="/x", cache_rate=0.5), r"give cache_rate or cache_dir, not both"),
        (dict(data_loading="stream", check_images="yes"), r"check_images must be true or false, got 'yes'"),
        (dict(data_loading="stream", check_images=1), r"check_images must be true or false, got 1"),
        (dict(amp=1), r"amp must be true or false, got 1"),
        (dict(amp="true"), r"amp must be true or false, got 'true'"),
        (dict(augmentation="yes"), r"augmentation must be null, a bool or a mapping of settings, got 'yes'"),
        (dict(augmentation=1), r"augmentation must be null, a bool or a mapping"),
        (dict(augmentation={"rotation_degrees": 90}), r"augmentation.rotation_degrees must be a finite number in \[0.0, 45.0\], got 90"),
        (dict(augmentation={"scale_fraction": float("nan")}), r"augmentation.scale_fraction .* got nan"),
        (dict(augmentation={"probability": True}), r"augmentation.probability .* got True"),
        (dict(augmentation={"brightness_shift": -0.1}), r"augmentation.brightness_shift .* got -0.1"),
        (dict(augmentation={"flip": True}), r"unknown setting\(s\) \['flip'\]; allowed: \['rotation_degrees'"),
        (dict(augmentation={"horizontal_flip": 1}), r"augmentation.horizontal_flip must be true or false, got 1"),
        (dict(seed=True), r"seed must be an int, got True"),
    ],
)
def test_bad_data_arguments_are_refused_before_any_image_is_read(site, count_reads, kwargs, message):
    train, test = site
    with pytest.raises(ValueError, match=message):
        make(train, test, **kwargs)
    assert count_reads == []


def test_a_cache_dir_that_is_a_file_is_refused(site, tmp_path):
    train, test = site
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cache_dir .* exists and is not a folder"):
        make(train, test, data_loading="stream", cache_dir=str(tmp_path / "file"))


def test_augmentation_needs_an_image_model():
    with pytest.raises(ValueError, match="augmentation is given but the model takes no image"):
        OutcomeTrainer(table_net(1), table_cases([(0,), (1,)]), table_cases([(0,)], "test"), ["a"], device="cpu", augmentation=True)


def test_a_table_model_streams_nothing_and_trains_as_before():
    kwargs = dict(device="cpu", learning_rate=0.1)
    a = OutcomeTrainer(table_net(1), table_cases([(0,), (1,), (1,)]), table_cases([(0,)], "test"), ["a"], **kwargs)
    b = OutcomeTrainer(table_net(1), table_cases([(0,), (1,), (1,)]), table_cases([(0,)], "test"), ["a"], data_loading="stream", **kwargs)
    assert a.train(steps=2).mean_loss == b.train(steps=2).mean_loss
