"""Remote tracebacks show the caller's source: a script run as ``__main__`` and a lambda, on real worker
processes over every transport; and, in one process, who supplies which source line (the worker for code
it imported, the client for code shipped by value)."""

from __future__ import annotations

import linecache
import os
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_executor import RemoteTraceback
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire import serialization as s
from remote_executor.wire.tracebacks import add_source_lines

SRC = Path(__file__).resolve().parents[1] / "src"

SCRIPT = textwrap.dedent('''\
    import sys
    import traceback

    from remote_executor import RemoteExecutor


    def boom(x):
        y = x + 1
        raise ValueError(f"bad value {y}")


    def show(future):
        exc = future.exception(timeout=60)
        print("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        print("=" * 20)


    if __name__ == "__main__":
        transport = sys.argv[1] if sys.argv[1] != "default" else None
        with RemoteExecutor(1, transport=transport) as executor:
            show(executor.submit(boom, 1))
            show(executor.submit(lambda: {}["missing key"]))
''')


def run_script(tmp_path: Path, transport: str) -> tuple[Path, list[str]]:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), transport], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return script, done.stdout.split("=" * 20)[:2]


def remote_part(text: str) -> str:
    """The RemoteTraceback's text: what the worker reported, before the caller's own frames."""
    assert "RemoteTraceback" in text, text
    return text.split('"""')[1]


@pytest.mark.parametrize("transport", ["default", "zmq", pytest.param("gearman", marks=pytest.mark.gearman), "tcp"])
def test_a_scripts_function_and_lambda_show_file_line_and_source(
        transport: str, tmp_path: Path, tcp_server: TcpServer, start_workers: Callable[..., Supervisor]) -> None:
    if transport == "tcp":  # workers started apart from the client, as on other machines
        start_workers(1)
        transport = tcp_server.url
    script, (function, lam) = run_script(tmp_path, transport)
    remote = remote_part(function)
    assert f'File "{script}", line 9, in boom\n    raise ValueError(f"bad value {{y}}")\n' in remote
    assert remote.rstrip().endswith("ValueError: bad value 2")
    remote = remote_part(lam)
    assert f'File "{script}", line 22, in <lambda>\n' in remote
    assert 'show(executor.submit(lambda: {}["missing key"]))' in remote
    for text in (function, lam):
        assert "<dynamic-code>" not in text
        assert "run_task" not in text  # our own frame, that called the user's function, is left out


def test_the_client_supplies_the_lines_of_code_shipped_by_value(tmp_path: Path) -> None:
    """A notebook cell: code compiled from source that only the client's linecache has (no file on disk)."""
    cell = tmp_path / "cell-7.py"  # never written: like an IPython cell's name
    source = "def cell_function(n):\n    total = n * 2\n    return total / 0\n"
    linecache.cache[str(cell)] = (len(source), None, source.splitlines(keepends=True), str(cell))
    try:
        namespace: dict[str, object] = {"__name__": "__main__"}
        exec(compile(source, str(cell), "exec"), namespace)
        call = s.encode_call(namespace["cell_function"], (1,), {})  # type: ignore[arg-type]
        outcome = s.run_task(call)
        _, info = pickle.loads(outcome[0])
        worker_text = info[3]
        # The worker named the file and line, and left the line to the client (its own copy may differ).
        assert f'File "{cell}", line 3, in cell_function\n' in worker_text
        assert "return total / 0" not in worker_text
        ok, exc = s.decode_outcome(outcome)
    finally:
        linecache.cache.pop(str(cell), None)
    assert not ok and isinstance(exc, ZeroDivisionError)
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert f'File "{cell}", line 3, in cell_function\n    return total / 0\n' in exc.__cause__.tb


def fails_by_reference() -> None:
    raise KeyError("imported")


def test_code_imported_by_the_worker_keeps_the_workers_own_lines() -> None:
    outcome = s.run_task(s.encode_call(fails_by_reference, (), {}))
    _, info = pickle.loads(outcome[0])
    assert 'in fails_by_reference\n    raise KeyError("imported")\n' in info[3]


def test_lines_are_added_only_where_missing_and_inside_exception_groups(tmp_path: Path) -> None:
    path = tmp_path / "mod.py"
    path.write_text("first = 1\nsecond = 2\n")
    text = (f'Traceback (most recent call last):\n  File "{path}", line 1, in f\n'
            f'  File "{path}", line 2, in g\n    kept as the worker sent it\n'
            f'  | ExceptionGroup: group (1 sub-exception)\n  +-+---------------- 1 ----------------\n'
            f'    | Traceback (most recent call last):\n    |   File "{path}", line 2, in h\n'
            f'    |   File "/no/such/file.py", line 4, in i\n    | ValueError: x\n')
    filled = add_source_lines(text)
    assert f'  File "{path}", line 1, in f\n    first = 1\n  File "{path}", line 2, in g\n    kept as' in filled
    assert f'    |   File "{path}", line 2, in h\n    |     second = 2\n    |   File "/no/such' in filled
    assert 'file.py", line 4, in i\n    | ValueError: x\n' in filled  # no source anywhere: left as it was


def test_the_documented_example_runs() -> None:
    example = SRC.parent / "examples" / "tracebacks.py"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
    assert f'File "{example}", line 15, in parse\n    return int(text)  # raises ValueError' in done.stderr
