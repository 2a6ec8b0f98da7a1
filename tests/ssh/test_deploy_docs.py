"""docs/deploy.md: its code blocks are correct as written (the parts that can be checked without the
systems they configure): Python compiles, shell parses, the hosts file reads as the text says."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from remote_executor.ssh import SSHHost, parse_hosts

DOC = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", DOC.read_text(), re.S | re.M)


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCKS if lang == language]


def test_the_blocks_were_found() -> None:
    assert {lang for lang, _ in BLOCKS} >= {"python", "bash", "ini", "yaml", "dockerfile"}


@pytest.mark.parametrize("source", blocks("python"))
def test_python_blocks_compile(source: str) -> None:
    compile(source, str(DOC), "exec")


@pytest.mark.parametrize("source", blocks("bash"))
def test_shell_blocks_parse(source: str) -> None:
    result = subprocess.run(["bash", "-n"], input=source, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_hosts_file_example_reads_as_described() -> None:
    (example,) = [body for lang, body in BLOCKS if not lang and body.startswith("# hosts\n")]
    assert parse_hosts(example) == [
        SSHHost("node1"),
        SSHHost("node2", 16),
        SSHHost("gpu@node3", 4, None, "/opt/venv/bin/remote-executor", {"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                "/scratch", pool="gpu"),
    ]
