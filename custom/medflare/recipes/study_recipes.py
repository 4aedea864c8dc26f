"""One NVFlare recipe per study, built from the study's definition (the same one ``jobs/`` is
exported from), so a recipe run and a submitted job folder are the same job.

    from nvflare.recipe import SimEnv
    from medflare.recipes import BratsSegmentationRecipe, HeartDiseaseRecipe, MedflarePocEnv

    recipe = BratsSegmentationRecipe(name="brats_percentile", privacy="percentile", num_rounds=5,
                                     site_data="/data/brats/{site_name}/data_config.json")
    recipe.run(SimEnv(num_clients=3, workspace_root="/tmp/sim")).get_result()

    # a POC federation with medflare installed at every site, then NVFlare's ProdEnv submission
    env = MedflarePocEnv("/tmp/fed", num_clients=4, site_data="/data/heart/{site_name}/data_config.json")
    HeartDiseaseRecipe(name="heart_he", privacy="he").run(env)   # he: MedflarePocEnv(..., he=True)

The options are the study functions' (:func:`~medflare.recipes.brats_segmentation.brats_segmentation`,
:func:`~medflare.recipes.outcome_prediction.outcome_prediction`,
:func:`~medflare.recipes.heart_disease.heart_disease`), validated the same way.
"""

from __future__ import annotations

from typing import Optional

from medflare.recipes.recipe import MedflareRecipe

__all__ = ["BratsSegmentationRecipe", "OutcomePredictionRecipe", "HeartDiseaseRecipe", "STUDY_RECIPES"]


class BratsSegmentationRecipe(MedflareRecipe):
    """Brain-tumour segmentation (BraTS layout, SegResNet): ``aggregation`` fedavg | fedyogi,
    ``privacy`` none | percentile | gaussian | dpsgd | he, ``num_rounds``, ``min_clients``,
    ``local_epochs``, ``learning_rate``, ``batch_size``."""

    def __init__(self, name: str = "brats_fedavg", *, site_data: Optional[str] = None, **options):
        from medflare.recipes.brats_segmentation import brats_segmentation

        super().__init__(brats_segmentation(name, **options), site_data=site_data)


class OutcomePredictionRecipe(MedflareRecipe):
    """EXAM-style outcome prediction from a chest X-ray and clinical values: ``privacy``
    none | dpsgd, ``num_rounds``, ``min_clients``, ``local_epochs``, ``local_steps``,
    ``learning_rate``, ``batch_size``."""

    def __init__(self, name: str = "cxr_emr_fedavg", *, site_data: Optional[str] = None, **options):
        from medflare.recipes.outcome_prediction import outcome_prediction

        super().__init__(outcome_prediction(name, **options), site_data=site_data)


class HeartDiseaseRecipe(MedflareRecipe):
    """FLamby Fed-Heart-Disease (four real hospitals, logistic regression): ``aggregation``
    fedavg | fedyogi, ``privacy`` none | dpsgd | he, ``num_rounds``, ``min_clients``,
    ``local_steps``, ``learning_rate``, ``batch_size``."""

    def __init__(self, name: str = "heart_disease_fedavg", *, site_data: Optional[str] = None, **options):
        from medflare.recipes.heart_disease import heart_disease

        super().__init__(heart_disease(name, **options), site_data=site_data)


#: the study each recipe class builds
STUDY_RECIPES = {
    "brats_segmentation": BratsSegmentationRecipe,
    "outcome_prediction": OutcomePredictionRecipe,
    "heart_disease": HeartDiseaseRecipe,
}
