"""Without the demo extra a figure is left out with a note and generating demo data stops with
the install hint; the rest works."""

import re

import pytest

from medflare import optional_dependencies
from medflare.optional_dependencies import DEMO_EXTRA_HINT, MissingDependency, available, require
from medflare.reporting.cross_site_report import exam_measures, write_report
from tests.unit.reporting.test_cross_site_report import _results


def _without(monkeypatch, missing):
    real_available, real_import = optional_dependencies.available, optional_dependencies.importlib.import_module
    monkeypatch.setattr(optional_dependencies, "available", lambda m: m not in missing and real_available(m))

    def fake_import(name, *a):
        if name in missing:
            raise ImportError(name)
        return real_import(name, *a)

    monkeypatch.setattr(optional_dependencies.importlib, "import_module", fake_import)


def test_require_names_the_purpose_and_the_extra(monkeypatch):
    assert require("json", "x").dumps([]) == "[]" and available("json") and not available("no_such_module_here")
    _without(monkeypatch, {"matplotlib"})
    with pytest.raises(MissingDependency, match=re.escape(f"the per-round plot needs matplotlib, which is not installed: {DEMO_EXTRA_HINT}")):
        require("matplotlib", "the per-round plot")


def test_the_exam_report_is_written_without_its_figure(tmp_path, monkeypatch):
    _without(monkeypatch, {"matplotlib"})
    paths = write_report(exam_measures(_results()), str(tmp_path))
    assert set(paths) == {"md", "json", "csv"} and not list(tmp_path.glob("*.png"))


def test_demo_data_without_scipy_stops_with_the_hint(tmp_path, monkeypatch, capsys):
    from medflare.cli.main import main

    _without(monkeypatch, {"scipy"})
    assert main(["data", "brats", "--out", str(tmp_path), "--sites", "2"]) == 2
    assert f"generating the BraTS demo sites needs scipy, which is not installed: {DEMO_EXTRA_HINT}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
