"""Check the links of the built docs site and of the repository's Markdown pages.

    python docs/check_links.py docs/_build/html README.md examples/README.md benchmarks/README.md

A folder is a built HTML site: every ``href``/``src`` that points inside it must name an
existing file and, with ``#anchor``, an element with that id. A Markdown file: every relative
link must name an existing file or folder of the repository. Links to other hosts are not
followed (CI has no network); they are listed with ``--verbose``. Exits 1 naming each broken
link.
"""

from __future__ import annotations

import argparse
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    """The links and the ids of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id":
                self.ids.add(value)
            elif name in ("href", "src") and not (tag == "link" and name == "href"
                                                    and value.startswith("http")):
                self.links.append(value)


def _is_external(link: str) -> bool:
    return bool(urlsplit(link).scheme) or link.startswith("//")


def check_site(root: Path, verbose: bool) -> list[str]:
    pages = {p: _Page() for p in root.rglob("*.html")}
    for path, page in pages.items():
        page.feed(path.read_text(errors="replace"))
    broken = []
    for path, page in pages.items():
        for link in page.links:
            if _is_external(link):
                if verbose:
                    print(f"not followed: {link}")
                continue
            parts = urlsplit(link)
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if not target.exists():
                broken.append(f"{path.relative_to(root)}: {link} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else set()
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{path.relative_to(root)}: {link} (no such anchor)")
    return broken


_MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def check_markdown(path: Path, verbose: bool) -> list[str]:
    broken = []
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)  # skip code blocks
    for link in _MD_LINK.findall(text):
        if _is_external(link):
            if verbose:
                print(f"not followed: {link}")
            continue
        target = urlsplit(link).path
        if target and not (path.parent / unquote(target)).exists():
            broken.append(f"{path}: {link} (no such file)")
    return broken


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="built HTML folders and Markdown files")
    p.add_argument("--verbose", action="store_true", help="list the links not followed")
    args = p.parse_args(argv)
    broken = []
    for path in args.paths:
        if path.is_dir():
            broken += check_site(path.resolve(), args.verbose)
        elif path.suffix == ".md":
            broken += check_markdown(path, args.verbose)
        else:
            p.error(f"paths: expected a built HTML folder or a .md file, got {path}")
    for line in broken:
        print(f"broken link: {line}", file=sys.stderr)
    print(f"links checked in {len(args.paths)} places: {len(broken)} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
