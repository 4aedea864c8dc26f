"""Fixtures of the integration tests: site data for the POC federations."""

import pytest


@pytest.fixture(scope="session")
def poc_site_data(tmp_path_factory):
    """Three generated sites at 32^3 voxels with a handful of subjects each: {site: data_config path}."""
    from medflare.data.brats_synthetic import generate_sites

    root = tmp_path_factory.mktemp("poc_sites")
    return generate_sites(str(root), num_sites=3, cases_per_site=5, size=32, seed=5)


@pytest.fixture(scope="session")
def poc_site_datasets(tmp_path_factory, poc_site_data):
    """Each of three sites holding all three kinds of data at once, installed side by side in one
    ``medflare_data.json``: ``{site: {dataset name: data config}}``. BraTS-layout volumes (above),
    a heart-disease hospital (Cleveland, Hungary and VA Long Beach: one of Switzerland's 16
    test patients is negative, too few for a stable AUC), and chest X-rays with clinical values
    (43, 39 and 27 patients)."""
    from medflare.data.cxr_synthetic import generate_cxr_sites
    from medflare.data.heart_disease import write_heart_sites

    root = tmp_path_factory.mktemp("poc_datasets")
    heart = write_heart_sites(str(root / "heart"))
    hospitals = {"site-1": heart["site-1"], "site-2": heart["site-2"], "site-3": heart["site-4"]}
    cxr = generate_cxr_sites(str(root / "cxr"), sites=3, cases=32, size=32, seed=0)
    return {
        site: {"segmentation": poc_site_data[site], "outcome_table": hospitals[site], "outcome_image": cxr[site]}
        for site in ("site-1", "site-2", "site-3")
    }
