"""Sphinx configuration: the API reference from the docstrings (autodoc + napoleon, Google/torch
style Args/Returns) and the guide pages, most of them taken from the README's sections so that
the two never drift apart. Build: ``sphinx-build -W -b html docs docs/_build``."""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distclip  # noqa: E402  (after the path: the checkout, not an installed copy)

project = "distclip"
author = "distclip developers"
copyright = "2026, distclip developers"
release = distclip.__version__
version = release

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3  # README links such as (#failure-modes) resolve inside a page

# The trainer integrations' pages import their trainer: mocked, so the docs build with the `docs`
# extra alone (what the README says and `.ci/run` checks in an environment without them).
autodoc_mock_imports = ["lightning", "transformers", "peft", "accelerate", "torchtitan"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"  # types in the parameter list, signatures stay readable
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False  # "Returns: text: more text" reads as one sentence, not as a type and a text

# The README's own headings skip levels in places (a "####" under a "##"): cosmetic, not a broken page.
suppress_warnings = ["myst.header"]

html_theme = "alabaster"
html_title = f"distclip {release}"


# The README and benchmarks/README.md link to files relative to their own folder. In an included
# section a link to one of the pages below points at that page; a link to any other file of the
# checkout becomes a download of it, so no link is broken and none is silently dropped.
PAGES = {"README.md": "index.md", "benchmarks/README.md": "benchmarks.md", "CHANGELOG.md": "changelog.md"}
# README sections linked to by their anchor from another section: the page that holds each.
SECTIONS = {
    "quickstart": "quickstart.md", "how-each-layout-is-described": "layouts.md", "seeing-the-norms": "observability.md",
    "integrations": "integrations.md", "failure-modes": "failure_modes.md", "guarantees-and-numerics": "differences.md",
    "supported-torch-releases": "torch_versions.md", "benchmarks": "benchmarks.md",
}
_ANCHOR = re.compile(r"\]\(#([^)\s]+)\)")
_LINK = re.compile(r"\]\((?![a-z]+:|#)([^)\s#]+)(#[^)\s]*)?\)")


def _rewrite_links(app, relative_path, parent_docname, content):
    source = (ROOT / "docs" / relative_path).resolve() if not relative_path.is_absolute() else relative_path
    base = source.parent

    def repl(match: re.Match) -> str:
        target = (base / match.group(1)).resolve()
        anchor = match.group(2) or ""
        try:
            rel = target.relative_to(ROOT).as_posix()
        except ValueError:
            return match.group(0)
        if rel in PAGES:
            return f"]({PAGES[rel]}{anchor})"
        if target.exists() and not rel.startswith("docs/"):
            return f"](path:../{rel})"
        return match.group(0)

    content[0] = _LINK.sub(repl, content[0])
    if source == ROOT / "README.md":
        content[0] = _ANCHOR.sub(lambda m: f"]({SECTIONS[m.group(1)]})" if m.group(1) in SECTIONS else m.group(0), content[0])


def setup(app):
    app.connect("include-read", _rewrite_links)
