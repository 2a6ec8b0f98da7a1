"""The package's layers: imports point one way (docs/architecture.md), no cycles, every module imports alone.

The import graph is read from the source (every ``import`` statement, including the ones inside functions),
so a lazy import that closes a cycle counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import remote_executor

PACKAGE = Path(remote_executor.__file__).parent
TOP = ("cluster", "executor", "worker", "supervisor", "cli")
BOTTOM = ("errors", "security", "netio", "tls", "pools", "logsafe", "signals", "interrupts", "deathsig",
          "privatedirs")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (``from . import x`` resolves to the module x if it is one)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:  # a submodule if there is one by that name, else a name in ``base``
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> str:
    rest = name.removeprefix("remote_executor.")
    head = rest.split(".")[0]
    if rest == "transports.base":
        return "contracts"
    if head == "transports" and rest != "transports":
        return "scheme"
    return head if head in ("wire", "jobserver", "conformance") else rest


def test_the_graph_was_read() -> None:
    assert "remote_executor.jobserver.scheduler" in GRAPH
    assert "remote_executor.wire.frames" in GRAPH["remote_executor.jobserver.scheduler"]


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components over the whole graph: every component is one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert cycles == []


ANYONE = {"logsafe", "signals", "deathsig", "privatedirs"}  # the standard library only: every layer may import them
ALLOWED = {
    "errors": set(),
    **{name: set() for name in ANYONE},
    "interrupts": set(),
    "security": {"errors", *ANYONE},
    "netio": {"errors", *ANYONE},
    "tls": {"errors", *ANYONE},
    "pools": {"errors", *ANYONE},
    "wire": {"errors", *ANYONE, "wire"},
    "contracts": {"errors", *ANYONE, "security", "wire"},  # settings keep keys by the one rule
    "jobserver": {"errors", *ANYONE, "interrupts", "security", "netio", "tls", "pools", "wire", "contracts",
                  "jobserver", "transports"},
    "scheme": {"errors", *ANYONE, "security", "netio", "tls", "pools", "wire", "contracts", "jobserver", "scheme",
               "transports"},
    "transports": {"errors", *ANYONE, "contracts"},
}


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if layer(n) in ALLOWED))
def test_imports_point_one_way(name: str) -> None:
    wrong = {target for target in GRAPH[name] if layer(target) not in ALLOWED[layer(name)]}
    assert not wrong, f"{name} ({layer(name)}) may not import {sorted(wrong)}"


def test_jobserver_reaches_no_scheme_except_through_the_registry() -> None:
    for name, targets in GRAPH.items():
        if layer(name) == "jobserver":
            assert not {t for t in targets if layer(t) == "scheme"}, name


def test_the_scheduler_imports_only_the_wire_format_and_names() -> None:
    targets = GRAPH["remote_executor.jobserver.scheduler"]
    assert targets, "the scheduler imports the wire format"
    assert {layer(t) for t in targets} <= {"wire", "errors", "pools", "logsafe"}, sorted(targets)


def test_every_module_imports_alone() -> None:
    """Each module in a fresh interpreter of its own: no module depends on another being imported first."""
    script = "import importlib, sys; importlib.import_module(sys.argv[1])"
    failures = {}
    for name in sorted(MODULES):
        result = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            failures[name] = result.stderr.strip().splitlines()[-1:]
    assert failures == {}
