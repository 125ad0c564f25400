"""Every Python code block of the README and the docs site runs, so a snippet that stops
working fails the suite.

A page's blocks run top to bottom in one fresh interpreter (later blocks may use names that
earlier ones defined), with one torch thread and the working directory set to a temporary
folder. A block whose first line is ``# doctest: +SKIP`` is shown to readers but not run (it
needs a GPU or several processes); keep those rare.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = "# doctest: +SKIP"


def markdown_blocks(text: str) -> list[str]:
    """The bodies of the fenced ```python blocks of a Markdown text."""
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


def rst_blocks(text: str) -> list[str]:
    """The bodies of the ``.. code-block:: python`` directives of a reStructuredText text."""
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)\.\. code-block::\s*python\s*$", lines[i])
        i += 1
        if not m:
            continue
        indent = len(m.group(1))
        while i < len(lines) and re.match(r"^\s+:\w[\w-]*:", lines[i]):  # directive options
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip()
                                  or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        blocks.append(textwrap.dedent("\n".join(body)).strip("\n") + "\n")
    return blocks


def pages() -> list[Path]:
    docs = [p for p in sorted((ROOT / "docs").rglob("*")) if p.suffix in (".rst", ".md")
            and "_build" not in p.parts]
    return [ROOT / "README.md", ROOT / "examples" / "README.md", *docs]


def blocks_of(page: Path) -> list[str]:
    text = page.read_text()
    return markdown_blocks(text) if page.suffix == ".md" else rst_blocks(text)


PAGES_WITH_CODE = [p for p in pages() if blocks_of(p)]


def test_the_extractors_find_what_readers_see():
    md = "text\n```python\nx = 1\n```\n```bash\nls\n```\n"
    assert markdown_blocks(md) == ["x = 1\n"]
    rst = ("Title\n\n.. code-block:: python\n   :caption: c\n\n   a = 1\n\n   b = a\n"
           "text\n\n.. code-block:: bash\n\n   ls\n")
    assert rst_blocks(rst) == ["a = 1\n\nb = a\n"]
    assert ROOT / "README.md" in PAGES_WITH_CODE


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page: Path, tmp_path: Path):
    runnable = [b for b in blocks_of(page) if not b.lstrip().startswith(SKIP)]
    if not runnable:
        pytest.skip(f"every python block of {page.name} is marked {SKIP!r}")
    source = "import torch\ntorch.set_num_threads(1)\n" + "\n".join(
        f"# --- block {i} of {page.name}\n{b}" for i, b in enumerate(runnable))
    run = subprocess.run([sys.executable, "-c", source], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"{page}: a python block failed\n{run.stderr[-3000:]}"
