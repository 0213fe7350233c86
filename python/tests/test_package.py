"""The tests run against the installed wheel, not the source tree."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import verdict
from verdict import _native


def test_imported_from_the_installed_wheel():
    here = Path(__file__).resolve().parents[1]
    package = Path(verdict.__file__).resolve().parent
    assert here not in package.parents, f"verdict was imported from the source tree: {package}"
    assert "site-packages" in package.parts
    assert Path(_native.__file__).suffix == ".so"


def test_typing_files_installed():
    package = Path(verdict.__file__).resolve().parent
    assert (package / "py.typed").is_file()
    assert (package / "_native.pyi").is_file()


def test_version_matches_the_command():
    script = Path(sys.executable).with_name("verdict")
    assert script.is_file(), "the wheel installs the `verdict` command"
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"verdict {verdict.__version__}"


def test_public_api():
    for name in (
        "LLM",
        "PoolingParams",
        "PoolingOutput",
        "PoolingRequestOutput",
        "ClassificationOutput",
        "ClassificationRequestOutput",
        "ScoringOutput",
        "ScoringRequestOutput",
    ):
        assert hasattr(verdict, name), name
