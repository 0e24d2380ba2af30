"""Which torch releases distclip supports: exactly those it has been run on.

distclip reads a few private DTensor/FSDP1 internals (behind the fences ``_dtensor``, ``_fsdp1``,
``_torch``), so a release nobody has run may fail there, or, worse, count a layout wrongly. The
check at ``import distclip``:

- below the oldest tested release: ``ImportError`` saying which releases were tested
  (``DISTCLIP_ALLOW_UNTESTED_TORCH=1`` turns it into a warning, at the user's own risk);
- newer than the newest tested release (a new minor release, or a nightly of one): a warning that
  names the tested releases, and nothing else changes;
- a tested minor release (any patch release of it) or one between two tested ones: silent.

Update ``TESTED`` (and the README's "Supported torch releases") when a release is run.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

import torch

__all__ = ["TESTED", "MINIMUM", "NEWEST", "check_torch", "torch_release"]

# (major, minor) of every torch release the main job and the core multi-rank tests were run on
# (README, "Supported torch releases"); the suite as a whole runs on 2.13 in CI.
TESTED: tuple[tuple[int, int], ...] = ((2, 9), (2, 10), (2, 12), (2, 13), (2, 15))
MINIMUM = TESTED[0]
NEWEST = TESTED[-1]

_RELEASE = re.compile(r"(\d+)\.(\d+)")


def torch_release(version: str) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of a torch version string ('2.15.0+cu130', '2.16.0.dev20261201'), or None
    when it does not start with one (a source build with an odd tag: not checked)."""
    match = _RELEASE.match(str(version))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _names(releases: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{a}.{b}" for a, b in releases)


def check_torch(version: str) -> Optional[str]:
    """Check a torch version against the tested releases.

    Args:
        version: ``torch.__version__``.

    Returns:
        None when the release is supported, else the text of the warning that was issued (for a
        release newer than the newest tested one, or an older one allowed by
        ``DISTCLIP_ALLOW_UNTESTED_TORCH=1``).

    Raises:
        ImportError: the release is older than the oldest tested one.
    """
    release = torch_release(version)
    if release is None or MINIMUM <= release <= NEWEST:
        return None
    if release < MINIMUM:
        text = (
            f"distclip needs torch>={_names((MINIMUM,))} (tested: {_names(TESTED)}); this is torch {version}. "
            "Upgrade torch, or set DISTCLIP_ALLOW_UNTESTED_TORCH=1 to import it anyway (untested: norms may be wrong)."
        )
        if os.environ.get("DISTCLIP_ALLOW_UNTESTED_TORCH", "") not in ("1", "true", "yes"):
            raise ImportError(text)
    else:
        text = (
            f"distclip has not been tested with torch {version} (tested: {_names(TESTED)}); "
            "run `torchrun --standalone --nproc_per_node=4 -m distclip.verify` to check your layouts on it."
        )
    warnings.warn(text, UserWarning, stacklevel=3)
    return text


check_torch(torch.__version__)  # at ``import distclip`` (its first import)
