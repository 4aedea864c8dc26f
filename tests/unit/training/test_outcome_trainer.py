"""OutcomeTrainer and its metrics: local training and scoring of an outcome classifier on one site."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from medflare.data.outcome_table import OutcomeCase
from medflare.training.model_weights import WeightMismatchError
from medflare.training.outcome_networks import OutcomeNet
from medflare.training.outcome_trainer import OutcomeTrainer, classification_metrics

#: A MONAI DenseNet small enough to train a step on 16x16 images on a CPU in well under a second.
TINY_DENSENET = {
    "path": "monai.networks.nets.DenseNet",
    "args": {"spatial_dims": 2, "in_channels": 1, "init_features": 4, "growth_rate": 4, "block_config": [1, 1]},
}
SIZE = (16, 16)


def table_cases(clinical, labels, split="train", images=None):
    """OutcomeCases from rows of clinical values and rows (or scalars) of labels."""
    cases = []
    for i, (x, y) in enumerate(zip(clinical, labels)):
        y = tuple(int(v) for v in np.atleast_1d(y))
        image = None if images is None else images[i]
        cases.append(OutcomeCase(f"{split}-{i}", split, image, tuple(float(v) for v in np.atleast_1d(x)), y))
    return cases


def logistic(features=2, outputs=1, seed=0):
    return OutcomeNet(num_outputs=outputs, clinical_features=features, clinical_hidden=[], seed=seed)


def make_trainer(model, train, test, label_names=("y",), **kwargs):
    kwargs.setdefault("device", "cpu")
    return OutcomeTrainer(model, train, test, list(label_names), **kwargs)


def index_cases(n, split="train"):
    """n cases whose one clinical value is their index, so a batch shows which cases it holds."""
    return table_cases([[i] for i in range(n)], [i % 2 for i in range(n)], split)


def record_batches(trainer):
    """Lists, one per forward call in training mode, of the case indices the model was given."""
    batches = []

    def hook(module, args, kwargs):
        if module.training:
            batches.append([int(v) for v in kwargs["clinical"][:, 0].round()])

    trainer.model.register_forward_pre_hook(hook, with_kwargs=True)
    return batches


def separable(n, seed):
    """2D points labelled by the side of the line x0 + x1 = 0 they are on, kept away from it."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4 * n, 2))
    x = x[np.abs(x.sum(axis=1)) > 0.3][:n]
    return x, (x.sum(axis=1) > 0).astype(int)


def write_images(folder, count, seed, shape=SIZE):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{seed}-{i}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def image_cases(tmp_path):
    """(train, test): 6 and 4 cases with a 16x16 PNG, 3 clinical values and a binary label."""
    rng = np.random.default_rng(3)
    train = table_cases(rng.normal(size=(6, 3)), [0, 1, 0, 1, 1, 0], "train", write_images(tmp_path, 6, 1))
    test = table_cases(rng.normal(size=(4, 3)), [1, 0, 0, 1], "test", write_images(tmp_path, 4, 2))
    return train, test


# --- classification_metrics --------------------------------------------------------------


def test_auc_and_accuracy_of_a_hand_worked_example():
    # positives score 0.4 and 0.9, negatives 0.1 and 0.6; of the 4 (positive, negative) pairs
    # only (0.4, 0.6) is ranked wrongly: AUC = 3/4.  Thresholding at 0.5 predicts [0, 1, 0, 1]
    # against [0, 0, 1, 1]: cases 0 and 3 are right, accuracy = 2/4.
    metrics = classification_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), ["y"])
    assert metrics == {"auc": pytest.approx(0.75), "accuracy": pytest.approx(0.5)}


def test_a_probability_of_exactly_one_half_predicts_the_negative_class():
    metrics = classification_metrics(np.array([[0], [1]]), np.array([[0.5], [0.51]]), ["y"])
    assert metrics["accuracy"] == 1.0


def test_several_labels_are_reported_each_and_as_their_macro_mean():
    labels = np.array([[0, 1], [0, 0], [1, 1], [1, 0]])
    # label "a" is the hand-worked example (AUC 3/4, accuracy 1/2); label "b" is ranked and
    # thresholded perfectly (AUC 1, accuracy 1)
    probabilities = np.array([[0.1, 0.8], [0.6, 0.3], [0.4, 0.7], [0.9, 0.2]])
    metrics = classification_metrics(labels, probabilities, ["a", "b"])
    assert metrics == {
        "auc_a": pytest.approx(0.75),
        "accuracy_a": pytest.approx(0.5),
        "auc_b": pytest.approx(1.0),
        "accuracy_b": pytest.approx(1.0),
        "auc": pytest.approx((0.75 + 1.0) / 2),
        "accuracy": pytest.approx((0.5 + 1.0) / 2),
    }


def test_a_label_of_one_class_has_no_auc_and_the_mean_skips_it():
    labels = np.array([[0, 1], [0, 1], [1, 1], [1, 1]])
    # label "c" is always 1; three of its four probabilities exceed 0.5
    probabilities = np.array([[0.1, 0.9], [0.6, 0.2], [0.4, 0.7], [0.9, 0.6]])
    metrics = classification_metrics(labels, probabilities, ["a", "c"])
    assert math.isnan(metrics["auc_c"])
    assert metrics["accuracy_c"] == pytest.approx(0.75)
    assert metrics["auc"] == pytest.approx(0.75)  # label "a" alone
    assert metrics["accuracy"] == pytest.approx((0.5 + 0.75) / 2)  # accuracy is defined for both


def test_when_no_label_has_both_classes_the_auc_is_nan():
    metrics = classification_metrics(np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9]), ["y"])
    assert math.isnan(metrics["auc"])
    assert metrics["accuracy"] == pytest.approx(2 / 3)


# --- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, learning_rate", [("adam", 0.1), ("sgd", 0.5)])
def test_logistic_regression_learns_a_separable_problem(optimizer, learning_rate):
    x_train, y_train = separable(40, seed=1)
    x_test, y_test = separable(20, seed=2)
    trainer = make_trainer(
        logistic(),
        table_cases(x_train, y_train, "train"),
        table_cases(x_test, y_test, "test", None),
        batch_size=8,
        learning_rate=learning_rate,
        optimizer=optimizer,
    )
    # start from the wrong answer, so that only training can make it right
    trainer.set_weights({"head.weight": np.array([[-1.0, -1.0]]), "head.bias": np.zeros(1)})
    assert trainer.validate()["auc"] == 0.0
    result = trainer.train(steps=100)
    metrics = trainer.validate()
    assert metrics["auc"] == 1.0
    assert metrics["accuracy"] >= 0.9
    assert result.steps == 100 and not result.aborted
    assert result.mean_loss > 0 and math.isfinite(result.mean_loss)
    weight = trainer.get_weights()["head.weight"][0]
    assert weight[0] > 0 and weight[1] > 0


def test_steps_take_exactly_that_many_batches_and_run_across_shuffled_passes():
    trainer = make_trainer(logistic(1), index_cases(10), index_cases(4, "test"), batch_size=4)
    batches = record_batches(trainer)
    result = trainer.train(steps=7)
    assert result.steps == 7 and len(batches) == 7
    # a pass of 10 cases is batches of 4, 4, 2; the seventh step starts the third pass
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2, 4]
    seen = [i for b in batches for i in b]
    first, second, third = seen[:10], seen[10:20], seen[20:]
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert len(set(third)) == 4
    assert first != list(range(10)) and first != second  # shuffled, and afresh each pass


def test_epochs_take_whole_passes_starting_afresh():
    trainer = make_trainer(logistic(1), index_cases(10), index_cases(4, "test"), batch_size=4)
    batches = record_batches(trainer)
    trainer.train(steps=1)  # leaves 6 cases of a pass unused
    del batches[:]
    result = trainer.train(epochs=2)
    assert result.steps == 2 * math.ceil(10 / 4) == len(batches)
    seen = [i for b in batches for i in b]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))


@pytest.mark.parametrize("kwargs, message", [(dict(epochs=0), "epochs"), (dict(steps=0), "steps"), (dict(steps=True), "steps")])
def test_bad_training_lengths_are_refused(kwargs, message):
    trainer = make_trainer(logistic(1), index_cases(4), index_cases(2, "test"))
    with pytest.raises(ValueError, match=f"{message} must be a positive int"):
        trainer.train(**kwargs)


def test_should_abort_is_asked_before_every_step():
    trainer = make_trainer(logistic(1), index_cases(10), index_cases(4, "test"), batch_size=4)
    before = trainer.get_weights()
    result = trainer.train(steps=5, should_abort=lambda: True)
    assert result.aborted and result.steps == 0 and math.isnan(result.mean_loss)
    for key, value in trainer.get_weights().items():
        np.testing.assert_array_equal(value, before[key])

    calls = []

    def abort_on_third_question():
        calls.append(None)
        return len(calls) == 3

    result = trainer.train(steps=5, should_abort=abort_on_third_question)
    assert result.aborted and result.steps == 2 and math.isfinite(result.mean_loss)


def test_site_normalisation_uses_the_training_statistics_only():
    train_x = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [4.0, 5.0]])  # the second column is constant
    test_x = np.array([[10.0, 5.0], [2.5, 7.0], [0.0, 3.0]])
    trainer = make_trainer(
        logistic(),
        table_cases(train_x, [0, 1, 0, 1]),
        table_cases(test_x, [0, 1, 1], "test"),
        clinical_normalisation="site",
    )
    train = trainer.train_data["clinical"].numpy()
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(train[:, 0].std(), 1.0, atol=1e-6)
    np.testing.assert_array_equal(train[:, 1], 0.0)  # a constant column is only centred
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    expected_test = np.stack([(test_x[:, 0] - mean[0]) / std[0], test_x[:, 1] - mean[1]], axis=1)
    np.testing.assert_allclose(trainer.test_data["clinical"].numpy(), expected_test, rtol=1e-6)


def test_without_normalisation_the_values_are_used_as_given():
    train_x, test_x = np.array([[1.0, 50.0], [3.0, 70.0]]), np.array([[2.0, 60.0]])
    trainer = make_trainer(logistic(), table_cases(train_x, [0, 1]), table_cases(test_x, [1], "test"))
    np.testing.assert_array_equal(trainer.train_data["clinical"].numpy(), train_x)
    np.testing.assert_array_equal(trainer.test_data["clinical"].numpy(), test_x)


def test_an_image_only_model_trains_and_scores(image_cases):
    train, test = image_cases
    model = OutcomeNet(num_outputs=1, image_network=TINY_DENSENET, image_features=8, seed=0)
    trainer = make_trainer(model, train, test, image_size=SIZE, batch_size=3)
    assert trainer.train_data["image"].shape == (6, 1, *SIZE)
    assert trainer.train_data["clinical"] is None
    assert float(trainer.train_data["image"].min()) == 0.0 and float(trainer.train_data["image"].max()) == 1.0
    before = trainer.get_weights()
    result = trainer.train(steps=2)
    assert result.steps == 2 and math.isfinite(result.mean_loss)
    after = trainer.get_weights()
    assert not np.array_equal(after["head.weight"], before["head.weight"])
    metrics = trainer.validate()
    assert set(metrics) == {"auc", "accuracy", "num_cases"} and metrics["num_cases"] == 4
    assert 0.0 <= metrics["auc"] <= 1.0 and metrics["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_images_are_resized_to_the_image_size(tmp_path):
    paths = write_images(tmp_path, 3, seed=4, shape=(40, 24))
    cases = table_cases([[0.0]] * 3, [0, 1, 0], "train", paths)
    model = OutcomeNet(num_outputs=1, image_network=TINY_DENSENET, image_features=8, seed=0)
    trainer = make_trainer(model, cases[:2], cases[2:], image_size=SIZE)
    assert trainer.train_data["image"].shape == (2, 1, *SIZE)


def test_a_fusion_model_trains_both_branches(image_cases):
    train, test = image_cases
    model = OutcomeNet(num_outputs=1, clinical_features=3, image_network=TINY_DENSENET, image_features=8, clinical_hidden=[4], seed=0)
    trainer = make_trainer(model, train, test, image_size=SIZE, batch_size=3, clinical_normalisation="site")
    assert trainer.train_data["image"].shape == (6, 1, *SIZE) and trainer.train_data["clinical"].shape == (6, 3)
    before = trainer.get_weights()
    assert trainer.train(steps=2).steps == 2
    after = trainer.get_weights()
    changed = {k for k in after if not np.array_equal(after[k], before[k])}
    assert any(k.startswith("image_net.") for k in changed)
    assert any(k.startswith("clinical_net.") for k in changed)
    metrics = trainer.validate()
    assert metrics["num_cases"] == 4 and math.isfinite(metrics["auc"])


def test_several_labels_are_trained_and_scored_each():
    x, y = separable(12, seed=5)
    labels = np.stack([y, 1 - y], axis=1)
    trainer = make_trainer(logistic(outputs=2), table_cases(x[:8], labels[:8]), table_cases(x[8:], labels[8:], "test"), label_names=("up", "down"))
    trainer.train(steps=3)
    metrics = trainer.validate()
    assert {"auc_up", "auc_down", "accuracy_up", "accuracy_down", "auc", "accuracy", "num_cases"} == set(metrics)
    assert trainer.predict().shape == (4, 2)


# --- weights -----------------------------------------------------------------------------


def test_weights_round_trip_into_another_trainer():
    x, y = separable(12, seed=6)
    first = make_trainer(logistic(seed=1), table_cases(x[:8], y[:8]), table_cases(x[8:], y[8:], "test"), learning_rate=0.1)
    first.train(steps=3)
    weights = first.get_weights()
    second = make_trainer(logistic(seed=2), table_cases(x[:8], y[:8]), table_cases(x[8:], y[8:], "test"))
    assert not np.allclose(second.predict(), first.predict())
    second.set_weights(weights)
    np.testing.assert_array_equal(second.predict(), first.predict())
    weights["head.weight"][...] = 0.0  # get_weights hands out copies
    assert np.any(first.get_weights()["head.weight"] != 0.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda w: w.pop("head.bias"), r"missing \['head.bias'\]"),
        (lambda w: w.update({"extra": np.zeros(1)}), r"unexpected \['extra'\]"),
        (lambda w: w.update({"head.bias": np.zeros(2)}), r"'head.bias' has shape \(2,\), the model needs \(1,\)"),
    ],
)
def test_weights_that_do_not_fit_are_refused_and_leave_the_model_alone(change, message):
    trainer = make_trainer(logistic(), table_cases([[0, 1], [1, 0]], [0, 1]), table_cases([[1, 1]], [1], "test"))
    before = trainer.get_weights()
    weights = {k: v + 1.0 for k, v in before.items()}
    change(weights)
    with pytest.raises(WeightMismatchError, match=message):
        trainer.set_weights(weights)
    for key, value in trainer.get_weights().items():
        np.testing.assert_array_equal(value, before[key])


# --- scoring -----------------------------------------------------------------------------


def test_validate_reports_auc_accuracy_and_the_number_of_test_cases():
    trainer = make_trainer(logistic(1), table_cases([[0], [1]], [0, 1]), table_cases([[-2], [-1], [1], [2], [3]], [0, 0, 1, 1, 0], "test"))
    trainer.set_weights({"head.weight": np.array([[1.0]]), "head.bias": np.zeros(1)})
    metrics = trainer.validate()
    # probabilities rise with the value: the negative at 3 outranks both positives, the other
    # negatives rank below them (AUC 4/6); sigmoid(x) > 0.5 for x > 0 gets 4 of 5 right
    assert metrics == {"auc": pytest.approx(4 / 6), "accuracy": pytest.approx(0.8), "num_cases": 5}


def test_validate_returns_none_when_aborted():
    trainer = make_trainer(logistic(1), index_cases(4), index_cases(2, "test"))
    assert trainer.validate(should_abort=lambda: True) is None


def test_non_finite_predictions_are_an_error_not_a_score():
    trainer = make_trainer(logistic(1), index_cases(4), index_cases(2, "test"))
    trainer.set_weights({"head.weight": np.array([[np.nan]]), "head.bias": np.zeros(1)})
    with pytest.raises(FloatingPointError, match="non-finite probabilities"):
        trainer.validate()


# --- determinism -------------------------------------------------------------------------


def train_once(seed, steps=6):
    x, y = separable(14, seed=7)
    trainer = make_trainer(logistic(seed=0), table_cases(x[:10], y[:10]), table_cases(x[10:], y[10:], "test"), batch_size=3, learning_rate=0.1, seed=seed)
    batches = record_batches(trainer)
    result = trainer.train(steps=steps)
    return trainer.get_weights(), result, batches


def test_the_same_seed_gives_the_same_training():
    (weights_a, result_a, _), (weights_b, result_b, _) = train_once(seed=3), train_once(seed=3)
    assert result_a.mean_loss == result_b.mean_loss
    for key in weights_a:
        np.testing.assert_array_equal(weights_a[key], weights_b[key])


def test_a_different_seed_shuffles_differently():
    (weights_a, _, batches_a), (weights_b, _, batches_b) = train_once(seed=3), train_once(seed=4)
    assert batches_a != batches_b
    assert not np.array_equal(weights_a["head.weight"], weights_b["head.weight"])


# --- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be a positive int, got 0"),
        (dict(batch_size=True), "batch_size must be a positive int, got True"),
        (dict(batch_size=2.0), "batch_size must be a positive int, got 2.0"),
        (dict(learning_rate=0), "learning_rate must be a number in"),
        (dict(learning_rate=1.5), "learning_rate must be a number in"),
        (dict(learning_rate=float("nan")), "learning_rate must be a number in"),
        (dict(learning_rate=True), "learning_rate must be a number in"),
        (dict(learning_rate="0.1"), "learning_rate must be a number in"),
        (dict(optimizer="rmsprop"), "optimizer must be one of .*got 'rmsprop'"),
        (dict(clinical_normalisation="global"), "clinical_normalisation must be one of .*got 'global'"),
        (dict(image_size=(4, 4)), "image_size must be a list of two ints >= 8"),
        (dict(image_size=(16,)), "image_size must be a list of two ints >= 8"),
        (dict(image_size=(16.0, 16)), "image_size must be a list of two ints >= 8"),
        (dict(image_size=(True, 16)), "image_size must be a list of two ints >= 8"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(logistic(1), index_cases(4), index_cases(2, "test"), **kwargs)


@pytest.mark.parametrize("train, test", [([], index_cases(2, "test")), (index_cases(2), [])])
def test_both_splits_must_have_cases(train, test):
    with pytest.raises(ValueError, match="train_cases and test_cases must both be non-empty"):
        make_trainer(logistic(1), train, test)


def test_an_image_model_needs_an_image_for_every_case(image_cases):
    train, test = image_cases
    model = OutcomeNet(num_outputs=1, image_network=TINY_DENSENET, image_features=8, seed=0)
    no_image = [OutcomeCase(c.case_id, c.split, None, c.clinical, c.labels) for c in test]
    with pytest.raises(ValueError, match="the model takes an image but test cases have none"):
        make_trainer(model, train, test[:2] + no_image[2:], image_size=SIZE)


@pytest.mark.parametrize(
    "outputs, labels, names",
    [
        (2, [0, 1], ["y"]),  # the model has more outputs than labels
        (1, [[0, 1], [1, 0]], ["y"]),  # the cases carry more labels than named
        (1, [0, 1], ["a", "b"]),  # more names than the model has outputs
    ],
)
def test_labels_must_match_the_models_outputs(outputs, labels, names):
    train = table_cases([[0.0], [1.0]], labels)
    with pytest.raises(ValueError, match=rf"label\(s\) and the model {outputs} output\(s\); label_names has {len(names)}"):
        make_trainer(logistic(1, outputs=outputs), train, train, label_names=names)


def test_the_clinical_width_must_match_the_model():
    with pytest.raises(ValueError, match="cases carry 3 clinical values, the model takes 2"):
        make_trainer(logistic(2), table_cases(np.zeros((2, 3)), [0, 1]), table_cases(np.zeros((1, 3)), [1], "test"))
