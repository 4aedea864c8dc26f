"""Server-side aggregation that no bad contribution can corrupt.

Pure numpy in :mod:`.contribution_checks` and :mod:`.estimators`; the NVFlare adapter is
:mod:`.validated_aggregator`.
"""
