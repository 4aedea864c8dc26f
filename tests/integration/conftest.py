"""Fixtures of the integration tests: site data for the POC federations."""

import pytest


@pytest.fixture(scope="session")
def poc_site_data(tmp_path_factory):
    """Three generated sites at 32^3 voxels with a handful of subjects each: {site: data_config path}."""
    from medflare.data.brats_synthetic import generate_sites

    root = tmp_path_factory.mktemp("poc_sites")
    return generate_sites(str(root), num_sites=3, cases_per_site=5, size=32, seed=5)
