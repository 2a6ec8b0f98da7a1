"""The ```python blocks of README.md and docs/*.md, and what each one's HTML comment says about running it.

A block runs as written unless the comment right before it says otherwise:

- ``<!-- not-run: REASON -->``: it is only compiled (it needs machines or services a test cannot start);
- ``<!-- setup: CODE -->``: CODE (hidden from the rendered page) runs first, defining what the prose around
  the block says the reader already has (a function ``score``, a list ``items``...);
- ``<!-- file: NAME -->``: the block is the module NAME (it is imported), next to every later block of the
  same document.

A URL in a block that names another machine (``tcp://scheduler.lan:5555``) is pointed at a job server (or
gearmand) and workers that the test starts on loopback, with the key in ``cluster.key`` in the block's
directory (and in ``$REMOTE_EXECUTOR_KEY``)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DIRECTIVE = re.compile(r"<!--\s*(not-run|setup|file):(.*?)-->\s*$", re.S)
# scheme://host:port[,host:port...][/pool], for hosts other than loopback
URL = re.compile(r"\b(tcp|zmq|gearman)://((?:[\w.-]+:\d+,?)+)(/[\w-]+)?")


@dataclass(frozen=True)
class Block:
    document: Path
    line: int  # of the opening fence, 1-based
    source: str
    not_run: str | None = None  # the reason
    setup: str = ""
    file_name: str | None = None  # the module this block is

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    def remote_urls(self) -> list[tuple[str, list[str], str]]:
        """(scheme, [host:port, ...], /pool or "") of every URL of a cluster the block expects to be running
        (on other machines, or started beforehand on this one: the docs show the commands)."""
        return [(m[1], m[2].rstrip(",").split(","), m[3] or "") for m in URL.finditer(self.setup + self.source)]


def python_blocks(document: Path) -> list[Block]:
    lines = document.read_text().split("\n")
    found: list[Block] = []
    fence: str | None = None  # the language of the open block
    start = 0
    for number, line in enumerate(lines):
        if not line.lstrip().startswith("```"):
            continue
        if fence is None:
            fence, start = line.lstrip()[3:].strip(), number
            continue
        if fence == "python":  # a block in a list item is indented with it
            body = textwrap.dedent("\n".join(lines[start + 1:number]))
            found.append(_block(document, lines, start, body + "\n"))
        fence = None
    return found


def _block(document: Path, lines: list[str], start: int, source: str) -> Block:
    """The block opened at ``lines[start]``, with the directive of the comment that ends just before it."""
    before = start - 1
    while before >= 0 and not lines[before].strip():
        before -= 1
    if before < 0 or not lines[before].rstrip().endswith("-->"):
        return Block(document, start + 1, source)
    first = before
    while first > 0 and "<!--" not in lines[first]:
        first -= 1
    comment = "\n".join(lines[first:before + 1]).strip()
    match = DIRECTIVE.fullmatch(comment)
    if match is None:
        return Block(document, start + 1, source)
    kind, text = match[1], match[2].strip()
    if kind == "not-run":
        return Block(document, start + 1, source, not_run=text)
    if kind == "file":
        return Block(document, start + 1, source, file_name=text)
    return Block(document, start + 1, source, setup=text + "\n")


def all_blocks() -> list[Block]:
    return [block for document in DOCUMENTS for block in python_blocks(document)]
