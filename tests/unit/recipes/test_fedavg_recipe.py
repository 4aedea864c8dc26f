"""medflare's FedAvgRecipe: NVFlare's PyTorch recipe that keeps ValidatedAggregator and refuses
an aggregator it would silently drop."""

import json
import os

import pytest
import torch

from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator

from medflare.aggregators.encrypted_aggregator import EncryptedSumAggregator
from medflare.aggregators.validated_aggregator import ValidatedAggregator
from medflare.recipes.fedavg import DroppedAggregatorError, FedAvgRecipe


@pytest.fixture
def train_script(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("import nvflare.client as flare\n")
    return str(path)


def _recipe(train_script, aggregator, kind="WEIGHTS"):
    from nvflare.apis.dxo import DataKind

    return FedAvgRecipe(
        min_clients=2,
        num_rounds=1,
        model=torch.nn.Linear(2, 1),
        train_script=train_script,
        aggregator=aggregator,
        aggregator_data_kind=DataKind(kind),
    )


def test_the_validated_aggregator_is_kept_with_its_arguments(tmp_path, train_script):
    recipe = _recipe(train_script, ValidatedAggregator(expected_data_kind="WEIGHTS", max_update_norm=5.0, max_weight=100))
    recipe.export(str(tmp_path / "out"))
    app = tmp_path / "out" / "fedavg" / "app"
    server = json.loads((app / "config" / "config_fed_server.json").read_text())
    (workflow,) = server["workflows"]
    aggregator = workflow["args"]["aggregator"]
    assert aggregator["path"] == "medflare.aggregators.validated_aggregator.ValidatedAggregator"
    assert aggregator["args"] == {"expected_data_kind": "WEIGHTS", "max_update_norm": 5.0, "max_weight": 100}
    # the sites' installed medflare runs it, not a copy in custom/ (which would make the job BYOC)
    assert not os.path.exists(app / "custom" / "medflare")


@pytest.mark.parametrize(
    "aggregator, kind",
    [
        (InTimeAccumulateWeightedAggregator(expected_data_kind="WEIGHTS"), "WEIGHTS"),
        (EncryptedSumAggregator(max_update_norm=5.0), "WEIGHT_DIFF"),
    ],
)
def test_an_aggregator_the_controller_would_drop_is_refused(train_script, aggregator, kind):
    with pytest.raises(DroppedAggregatorError, match=f"{type(aggregator).__name__} is not a ModelAggregator"):
        _recipe(train_script, aggregator, kind)


def test_a_data_kind_mismatch_is_refused_by_nvflare(train_script):
    with pytest.raises(ValueError, match="expected_data_kind"):
        _recipe(train_script, ValidatedAggregator(expected_data_kind="WEIGHT_DIFF"), "WEIGHTS")
