"""The torch release check at ``import distclip``: older than the oldest tested release raises
``ImportError`` (a warning with ``DISTCLIP_ALLOW_UNTESTED_TORCH=1``), newer than the newest tested
one warns naming the tested releases, a tested one (any patch release) is silent; and
``pyproject.toml`` declares the same lower bound."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import warnings

import pytest
import torch

from distclip import _versions
from distclip._versions import MINIMUM, NEWEST, TESTED, check_torch, torch_release

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _name(release: tuple[int, int], patch: str = ".0") -> str:
    return f"{release[0]}.{release[1]}{patch}"


def test_release_parsing():
    assert torch_release("2.15.0+cu130") == (2, 15)
    assert torch_release("2.13.0+cpu") == (2, 13)
    assert torch_release("2.16.0.dev20261201+cpu") == (2, 16)
    assert torch_release("2.10.0a0+git1234abc") == (2, 10)
    assert torch_release("unknown") is None


@pytest.mark.parametrize("version", [_name(r, p) for r in TESTED for p in (".0", ".1+cpu")])
def test_tested_releases_are_silent(version, monkeypatch):
    monkeypatch.delenv("DISTCLIP_ALLOW_UNTESTED_TORCH", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_torch(version) is None


def test_between_tested_releases_is_silent():
    between = [(2, m) for m in range(MINIMUM[1], NEWEST[1] + 1) if (2, m) not in TESTED]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for release in between:
            assert check_torch(_name(release)) is None


@pytest.mark.parametrize("version", [_name((NEWEST[0], NEWEST[1] + 1)), f"{NEWEST[0]}.{NEWEST[1] + 1}.0.dev20261201", "3.0.0"])
def test_newer_than_tested_warns_naming_the_tested_releases(version):
    with pytest.warns(UserWarning, match=re.escape(f"not been tested with torch {version}")) as record:
        text = check_torch(version)
    assert text is not None and all(_name(r, "") in text for r in TESTED)
    assert "distclip.verify" in str(record[0].message)


@pytest.mark.parametrize("version", [_name((MINIMUM[0], MINIMUM[1] - 1)), "1.13.1"])
def test_older_than_tested_raises(version, monkeypatch):
    monkeypatch.delenv("DISTCLIP_ALLOW_UNTESTED_TORCH", raising=False)
    with pytest.raises(ImportError, match=re.escape(f"torch>={_name(MINIMUM, '')}")) as info:
        check_torch(version)
    assert f"this is torch {version}" in str(info.value) and "DISTCLIP_ALLOW_UNTESTED_TORCH" in str(info.value)


def test_older_than_tested_allowed_by_the_environment_warns(monkeypatch):
    monkeypatch.setenv("DISTCLIP_ALLOW_UNTESTED_TORCH", "1")
    with pytest.warns(UserWarning, match="needs torch>="):
        assert check_torch(_name((MINIMUM[0], MINIMUM[1] - 1))) is not None


def test_the_running_torch_is_supported():
    assert MINIMUM <= torch_release(torch.__version__) <= NEWEST  # type: ignore[operator]


def test_import_distclip_checks_the_release():
    # a fresh interpreter: torch's version patched before ``import distclip``, three times
    code = f"""
import sys, warnings, torch
def fresh(version):
    torch.__version__ = version
    for name in [m for m in sys.modules if m == "distclip" or m.startswith("distclip.")]:
        del sys.modules[name]
    import distclip
try:
    fresh("{_name((MINIMUM[0], MINIMUM[1] - 1))}")
except ImportError as error:
    print("OLD:", error)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fresh("{_name((NEWEST[0], NEWEST[1] + 1))}")
    print("NEW:", [str(w.message) for w in caught])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fresh("{_name(NEWEST, '.1')}")
    print("TESTED:", [str(w.message) for w in caught if "torch" in str(w.message)])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"OLD: distclip needs torch>={_name(MINIMUM, '')}" in out, out
    assert f"NEW: ['distclip has not been tested with torch {_name((NEWEST[0], NEWEST[1] + 1))}" in out, out
    assert "TESTED: []" in out, out


def test_pyproject_declares_the_oldest_tested_release():
    text = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={_name(MINIMUM, "")}"' in text, "pyproject.toml's torch bound differs from distclip._versions.MINIMUM"
    assert _versions.__doc__ and "TESTED" in _versions.__doc__
