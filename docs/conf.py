"""Sphinx configuration: the API reference is generated from fdsm_ext's docstrings."""

from __future__ import annotations

from importlib.metadata import version as _version

project = "fdsm_ext"
author = "fdsm_ext authors"
copyright = "fdsm_ext authors, MIT License"  # noqa: A001 (Sphinx's name)
release = _version("fdsm-ext")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",
]

# Pages are reStructuredText or Markdown (myst-parser); headings get anchors for links.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
myst_heading_anchors = 3

# api.rst documents `automodule:: fdsm_ext` with :members:, which follows fdsm_ext.__all__:
# names added there appear in the reference without editing any page.
autodoc_member_order = "groupwise"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Pictures and results files live beside the pages; only pages are sources.
exclude_patterns = ["_build"]

html_theme = "furo"
html_title = f"fdsm_ext {release}"
html_static_path: list[str] = []
