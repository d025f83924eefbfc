"""Packaging: pyproject.toml's ranges, constraints.txt's pins and the running interpreter agree; a feature whose
extra is missing stops with one line naming `pip install 'mmlab[extra]'`."""

import platform
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from mmlab_cli.errors import MmlabError
from mmlab_cli.main import app
from test_cli import _one_line_error

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line]
    assert reqs and all(str(r.specifier).startswith("==") for r in reqs), "constraints.txt holds exact pins only"
    return {canonicalize_name(r.name): r for r in reqs}


def _declared() -> list[Requirement]:
    """Base dependencies and every extra's, less the extras' references to mmlab itself."""
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    reqs += [Requirement(r) for extra in PROJECT["optional-dependencies"].values() for r in extra]
    return [r for r in reqs if canonicalize_name(r.name) != "mmlab"]


def test_this_python_satisfies_requires_python():
    assert SpecifierSet(PROJECT["requires-python"]).contains(platform.python_version())
    assert not SpecifierSet(PROJECT["requires-python"]).contains("3.10.14")  # the pins need 3.11


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for req in _declared():
        pin = pins.get(canonicalize_name(req.name))
        assert pin is not None, f"{req.name}: declared in pyproject.toml, not pinned in constraints.txt"
        assert req.specifier.contains(str(pin.specifier)[2:], prereleases=True), f"{pin} outside {req}"


def test_installed_packages_are_the_pinned_versions():
    """Catches a venv built from another lock. Packages of extras that are not installed are left out; the base
    dependencies must be there."""
    base = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    for name, pin in _pins().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            assert name not in base, f"{name}: a base dependency, not installed"
            continue
        assert pin.specifier.contains(installed, prereleases=True), f"{name} {installed} installed, {pin} pinned"


def test_make_reinstalls_when_the_constraints_change():
    out = subprocess.run(["make", "-n", "-W", "constraints.txt", "test", "demo"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert "pip install --quiet -c constraints.txt -e \".[test]\"" in out
    assert "pip install --quiet -c constraints.txt -e .\n" in out


# ---- one line naming the extra, per gated feature (the package hidden through sys.modules) ------------------

def _hide(monkeypatch, package: str, *importers: str) -> None:
    """Make `import package` fail, and forget the modules that import it at their top so they import again
    (also as attributes of their parent package: `from data_prep import audiovisual` reads that first)."""
    monkeypatch.setitem(sys.modules, package, None)
    for name in importers:
        monkeypatch.delitem(sys.modules, name, raising=False)
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:
            monkeypatch.delattr(sys.modules[parent], child, raising=False)


@pytest.mark.parametrize("dataset", ["crema-d", "kinetics-sounds"])
def test_video_datasets_without_av(monkeypatch, tmp_path, dataset):
    _hide(monkeypatch, "av", "data_prep.video", "data_prep.audiovisual", "data_prep.crema_d",
          "data_prep.kinetics_sounds")
    result = CliRunner().invoke(app, ["prepare", dataset, "--src", str(tmp_path), "--out", str(tmp_path / "out")])
    _one_line_error(result, "'av' package", "pip install 'mmlab[video]'")
    assert not (tmp_path / "out").exists()


def test_food101_without_transformers(monkeypatch, tmp_path):
    _hide(monkeypatch, "transformers", "data_prep.food101")
    result = CliRunner().invoke(app, ["prepare", "food101", "--src", str(tmp_path), "--tokenizer", str(tmp_path),
                                      "--out", str(tmp_path / "out")])
    _one_line_error(result, "'transformers' package", "pip install 'mmlab[text]'")


def test_text_encoder_without_transformers(monkeypatch, tmp_path):
    from mmlab_cli.models.text import TextEncoder

    (tmp_path / "config.json").write_text("{}")
    _hide(monkeypatch, "transformers")
    with pytest.raises(MmlabError, match=r"bert text encoder needs the 'transformers' package: "
                                         r"pip install 'mmlab\[text\]'$"):
        TextEncoder(str(tmp_path), 8)


def test_pyhessian_backend_without_pyhessian_stops_before_loading_runs(monkeypatch, tmp_path):
    _hide(monkeypatch, "pyhessian")
    result = CliRunner().invoke(app, ["flatness", str(tmp_path / "no-run"), "--metric", "hessian",
                                      "--backend", "pyhessian"])
    _one_line_error(result, "'pyhessian' package", "pip install 'mmlab[crosscheck]'")
