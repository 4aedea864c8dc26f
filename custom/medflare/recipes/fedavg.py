"""NVFlare's PyTorch ``FedAvgRecipe``, refusing an aggregator it would silently drop.

``nvflare.app_opt.pt.recipes.FedAvgRecipe(aggregator=X)`` logs a warning and aggregates with
plain weighted averaging when ``X`` is not a ``ModelAggregator`` (its FedAvg controller takes
FLModels): every check of a Shareable-based aggregator is then gone, and the job runs anyway.
This subclass raises instead. :class:`~medflare.aggregators.validated_aggregator.ValidatedAggregator`
is a ``ModelAggregator`` and is kept; pass ``expected_data_kind`` matching the recipe's
``aggregator_data_kind`` (NVFlare checks the two agree).

Example::

    from medflare.aggregators.validated_aggregator import ValidatedAggregator
    from medflare.recipes.fedavg import FedAvgRecipe

    recipe = FedAvgRecipe(
        min_clients=2, num_rounds=5, model=MyNet(), train_script="train.py",
        aggregator=ValidatedAggregator(expected_data_kind="WEIGHTS", max_update_norm=100.0),
    )
"""

from __future__ import annotations

from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe as _NVFlareFedAvgRecipe

__all__ = ["FedAvgRecipe", "DroppedAggregatorError", "INSTALLED_PACKAGES"]

#: packages every medflare site has installed: a job never carries their code
INSTALLED_PACKAGES = ("medflare", "torch", "monai")


class DroppedAggregatorError(TypeError):
    """The aggregator given would not be used by the recipe's workflow."""


class FedAvgRecipe(_NVFlareFedAvgRecipe):
    """``nvflare.app_opt.pt.recipes.FedAvgRecipe`` with the same arguments.

    Raises:
        DroppedAggregatorError: ``aggregator`` is not a ``ModelAggregator``, so NVFlare's FedAvg
            controller would not call it (NVFlare only warns and averages without it).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # sites run medflare, torch and MONAI from their installed packages (allow-listed by
        # `medflare site install`), never from a copy in the job's custom/ folder, which would
        # make the job BYOC and bypass the sites' class allow-list
        packages = list(getattr(self._job.job, "app_packages", None) or [])
        self._job.set_app_packages(packages + list(INSTALLED_PACKAGES))

    def _get_model_aggregator(self):
        if self.aggregator is not None and not isinstance(self.aggregator, ModelAggregator):
            raise DroppedAggregatorError(
                f"aggregator {type(self.aggregator).__name__} is not a ModelAggregator: NVFlare's FedAvg controller "
                "takes FLModels and would aggregate without it (plain weighted averaging, none of its checks). "
                "Use medflare.aggregators.validated_aggregator.ValidatedAggregator (a ModelAggregator), or a job "
                "whose ScatterAndGather workflow takes a Shareable aggregator (medflare.recipes' study recipes)"
            )
        return super()._get_model_aggregator()
