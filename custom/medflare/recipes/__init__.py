"""Job recipes: one Python definition per study, from which every shipped job folder is exported
and which runs as an NVFlare 2.9 recipe on ``SimEnv``, :class:`MedflarePocEnv` and ``ProdEnv``.

- :mod:`.job_definition`: a job as data (``meta.json`` and the two app configs);
- :mod:`.brats_segmentation`, :mod:`.outcome_prediction`, :mod:`.heart_disease`: the studies;
- :mod:`.shipped_jobs`: the jobs in ``jobs/``, exported from the studies;
- :mod:`.recipe`: :class:`MedflareRecipe` and the ``FedJob`` that exports a definition unchanged;
- :mod:`.study_recipes`: one recipe class per study;
- :mod:`.poc_env`: a POC federation with medflare installed, as a recipe environment;
- :mod:`.fedavg`: NVFlare's ``FedAvgRecipe``, refusing an aggregator it would drop.
"""

__all__ = [
    "BratsSegmentationRecipe",
    "OutcomePredictionRecipe",
    "HeartDiseaseRecipe",
    "MedflareRecipe",
    "MedflarePocEnv",
    "FedAvgRecipe",
]

_WHERE = {
    "BratsSegmentationRecipe": "study_recipes",
    "OutcomePredictionRecipe": "study_recipes",
    "HeartDiseaseRecipe": "study_recipes",
    "MedflareRecipe": "recipe",
    "MedflarePocEnv": "poc_env",
    "FedAvgRecipe": "fedavg",
}


def __getattr__(name):
    # lazy: importing nvflare.recipe is slow and consumes --export / --export-dir from sys.argv
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
