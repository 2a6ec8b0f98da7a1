"""docs/cli.md against the parser: its synopsis lists every command and every option each one takes, and
nothing the parser does not accept."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from remote_executor.cli import _parser

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
GLOBAL = {"--help", "--version", "--log-level"}  # every command's, described once


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], set[str]]:
    """Every runnable command (``("cluster", "up")``) and the options it takes."""
    found: dict[tuple[str, ...], set[str]] = {}
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: {o for a in parser._actions if a.help != argparse.SUPPRESS
                       for o in a.option_strings if o.startswith("--")} - GLOBAL}
    for sub in subs:
        for name, child in sub.choices.items():
            found.update(commands(child, (*path, name)))
    return found


def synopsis() -> dict[tuple[str, ...], set[str]]:
    """The first code block of docs/cli.md: ``remote-executor COMMAND ... [--option ...]``, one command a
    line (indented lines continue it); ``(the options of OTHER COMMAND)`` stands for that command's."""
    block = re.search(r"^```\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert block is not None
    entries: list[str] = []
    for line in block[1].splitlines():
        if line.startswith("remote-executor "):
            entries.append(line)
        elif line.startswith(" ") and entries:
            entries[-1] += " " + line
    documented: dict[tuple[str, ...], set[str]] = {}
    for entry in entries:
        words = entry.split()[1:]
        names = tuple(w for w in words[:2] if re.fullmatch(r"[a-z][a-z-]*", w))
        documented[names] = set(re.findall(r"--[a-z][a-z-]*", entry)) - GLOBAL
        if same := re.search(r"\(the options of ([a-z -]+)\)", entry):
            documented[names] |= documented[tuple(same[1].split())]
    return documented


def test_every_command_is_in_the_synopsis() -> None:
    assert set(synopsis()) == set(commands(_parser()))


def test_every_option_is_documented_and_every_documented_option_exists() -> None:
    documented, actual = synopsis(), commands(_parser())
    for command, options in actual.items():
        name = " ".join(command)
        assert documented.get(command, set()) - options == set(), f"documented for {name}, but not accepted"
        assert options - documented.get(command, set()) == set(), f"{name}: not in docs/cli.md's synopsis"


def test_the_global_options_are_described() -> None:
    text = DOC.read_text()
    for option in GLOBAL:
        assert f"`{option}" in text or f"{option}`" in text, option
