"""Shared fixtures: small generated BraTS-layout sites and a tiny network spec."""

from __future__ import annotations

import copy

import pytest

from medflare.training.model_spec import DEFAULT_SEGRESNET

#: A SegResNet small enough for unit tests on a CPU.
TINY_SEGRESNET = copy.deepcopy(DEFAULT_SEGRESNET)
TINY_SEGRESNET["args"].update({"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]})


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory):
    """Two generated sites at 32^3 voxels with a handful of subjects each: {site: data_config path}."""
    from medflare.data.brats_synthetic import generate_sites

    root = tmp_path_factory.mktemp("brats_sites")
    return generate_sites(str(root), num_sites=2, cases_per_site=5, size=32, seed=3)


@pytest.fixture(scope="session")
def tiny_site_files(tiny_sites):
    """(training, validation) file lists of site-1."""
    from medflare.data.brats_layout import load_datalist
    from medflare.data.site_data_config import read_site_data_config

    config = read_site_data_config(tiny_sites["site-1"])
    return load_datalist(config.datalist, config.data_root)
