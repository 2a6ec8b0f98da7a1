"""The command line's answers to the commonest mistakes: one line on standard error, exit code 2 for a
mistake in the command line and 1 for a failure, a traceback only with ``--log-level DEBUG``; and a help
text that explains every subcommand and option."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import remote_executor
from remote_executor.cli import _parser

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """``remote-executor ARGS`` in a fresh interpreter (after ``code``, which may hide a dependency)."""
    program = f"import sys\n{code}\nfrom remote_executor.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("command", ["status", "ping", "worker", "server"])
def test_a_misspelt_scheme_is_a_usage_error_that_suggests_the_right_one(command: str) -> None:
    done = run_cli(command, "tpc://127.0.0.1:5555")
    assert done.returncode == 2
    assert one_line(done.stderr).endswith("did you mean 'tcp'?")


def test_a_url_without_a_scheme_is_a_usage_error() -> None:
    done = run_cli("ping", "127.0.0.1:5555")
    assert done.returncode == 2
    assert "expected a URL like tcp://host:port" in one_line(done.stderr)


@pytest.mark.parametrize("command", ["status", "ping", "stop", "worker", "server"])
@pytest.mark.parametrize(("url", "why"), [
    ("tcp://[::1", "malformed URL 'tcp://[::1': Invalid IPv6 URL"),
    ("zmq://127.0.0.1:99999", "malformed address '127.0.0.1:99999'"),
    ("tcp://host:http", "malformed address 'host:http'"),
    ("gearman://127.0.0.1:4730,gm2", "malformed address 'gm2'"),
])
def test_a_malformed_address_is_a_usage_error_before_anything_starts(command: str, url: str, why: str) -> None:
    """(A worker was started with it and retried for ever, or its supervisor blamed the key.)"""
    args = ("--insecure",) if command in ("worker", "server") else ()
    done = run_cli(command, url, *args)
    assert done.returncode == 2
    assert why in one_line(done.stderr)


def test_zmq_without_pyzmq_names_the_extra_to_install() -> None:
    done = run_cli("ping", "zmq://127.0.0.1:5555", code="sys.modules['zmq'] = None  # as if not installed")
    assert done.returncode == 1
    assert "pip install 'remote-executor[zmq]'" in one_line(done.stderr)


def test_a_runtime_error_is_one_line_and_debug_adds_the_traceback() -> None:
    url = f"tcp://127.0.0.1:{closed_port()}"
    done = run_cli("ping", url, "--timeout", "2")
    assert done.returncode == 1
    assert one_line(done.stderr) == f"remote-executor: cannot connect to {url}: Connection refused"
    debug = run_cli("ping", url, "--timeout", "2", "--log-level", "DEBUG")  # a global option after the command
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr
    assert debug.stderr.rstrip().endswith(f"remote-executor: cannot connect to {url}: Connection refused")


def test_log_level_is_accepted_before_and_after_the_subcommand() -> None:
    assert _parser().parse_args(["--log-level", "ERROR", "ping", "tcp://h:1"]).log_level == "ERROR"
    assert _parser().parse_args(["ping", "tcp://h:1", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert _parser().parse_args(["ping", "tcp://h:1"]).log_level == "INFO"
    assert _parser().parse_args(["cluster", "status", "--log-level", "WARNING"]).log_level == "WARNING"


def test_version() -> None:
    done = run_cli("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"remote-executor {remote_executor.__version__}")


def test_an_option_parse_error_exits_2() -> None:
    done = run_cli("ping", "tcp://127.0.0.1:1", "--timeout", "soon")
    assert done.returncode == 2
    assert "invalid float value: 'soon'" in done.stderr


def _parsers(parser: argparse.ArgumentParser,
             path: str = "remote-executor") -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _parsers(sub, f"{path} {name}")
    return found


def test_every_subcommand_and_option_explains_itself() -> None:
    for path, parser in _parsers(_parser()):
        text = parser.format_help()
        assert parser.description, f"{path} has no description"
        assert not re.search(r"``|:\w+:`", text), f"{path} --help shows reST markup:\n{text}"
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{path} {action.option_strings or action.dest} has no help text"
            shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
            if shown and action.dest not in ("help", "version"):
                assert "default" in (parser._get_formatter()._get_help_string(action) or ""), (
                    f"{path} {action.option_strings} does not show its default")
        assert "(default: None)" not in text


def test_timeout_is_offered_only_where_it_does_something() -> None:
    parsers = dict(_parsers(_parser()))
    for command in ("server", "worker"):
        assert "--timeout" not in parsers[f"remote-executor {command}"].format_help()
    assert "--timeout" in parsers["remote-executor ping"].format_help()


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("gearman", marks=pytest.mark.gearman)])
def test_a_worker_gives_up_after_its_reconnect_timeout(scheme: str, tmp_path: Path) -> None:
    """The documented --reconnect-timeout: nothing answers, so the command ends with status 1 and says why,
    its worker processes are not restarted for ever."""
    key = tmp_path / "cluster.key"
    key.write_text("reconnect-test-key\n")
    key.chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "worker", f"{scheme}://127.0.0.1:{closed_port()}",
                           "--key-file", str(key), "--processes", "2", "--reconnect-timeout", "1"],
                          capture_output=True, text=True, timeout=60, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1, done.stderr
    assert f"could not reach {scheme}://127.0.0.1:" in done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("command", "option", "value", "says"), [
    ("server", "--heartbeat-timeout", "0", "must be a positive number, not 0"),
    ("server", "--heartbeat-interval", "-1", "must be a positive number, not -1"),
    ("worker", "--heartbeat-interval", "0", "must be a positive number, not 0"),
    ("server", "--max-frame-size", "5", "must be at least 65536, not 5"),
    ("worker", "--processes", "0", "must be a positive number, not 0"),
    ("status", "--timeout", "-1", "must be a positive number, not -1"),
    ("server", "--heartbeat-timeout", "nan", "must be a positive number, not nan"),
])
def test_a_value_that_would_make_a_useless_server_or_worker_is_a_usage_error(
        command: str, option: str, value: str, says: str) -> None:
    """Before, a server with a zero heartbeat timeout started and then refused every peer ("a wrong key?"),
    and a zero heartbeat interval spun two CPUs."""
    done = run_cli(command, "tcp://127.0.0.1:5555", "--insecure", f"{option}={value}")
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr) == (f"remote-executor: argument {option}: {says} "
                                     f"(see: remote-executor {command} --help)")


@pytest.mark.parametrize("args", [("frobnicate",), ("server",), ("worker", "tcp://127.0.0.1:5555", "--bogus")])
def test_what_argparse_refuses_is_one_line_too(args: tuple[str, ...]) -> None:
    """(Its usage block came first, so the reason was not the first line of the output.)"""
    done = run_cli(*args)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith("remote-executor: ")
    assert "--help" in done.stderr


@pytest.mark.parametrize("args", [
    ("worker", "tcp://127.0.0.1:5555/bad!pool"),
    ("worker", "tcp://127.0.0.1:5555", "--pool", "bad pool"),
    ("status", "zmq://127.0.0.1:5555/bad!pool"),
])
def test_a_bad_pool_name_is_a_usage_error(args: tuple[str, ...]) -> None:
    done = run_cli(*args, "--insecure")
    assert done.returncode == 2
    assert "bad pool name" in one_line(done.stderr)


def test_what_the_command_line_asks_of_a_scheme_that_cannot_do_it_is_a_usage_error() -> None:
    done = run_cli("stop", "gearman://127.0.0.1:1", "--workers")
    assert done.returncode == 2
    assert "--workers is not available for gearman://" in one_line(done.stderr)


@pytest.mark.parametrize("command", ["worker", "server"])
@pytest.mark.parametrize(("interval", "timeout"), [("2", "1"), ("1", "1")])
def test_a_heartbeat_timeout_not_longer_than_the_interval_is_a_usage_error(command: str, interval: str,
                                                                           timeout: str) -> None:
    """Else every peer would count as lost between two heartbeats: healthy workers killed as hung."""
    done = run_cli(command, "tcp://127.0.0.1:5555", "--insecure", "--heartbeat-interval", interval,
                   "--heartbeat-timeout", timeout)
    assert done.returncode == 2
    assert f"--heartbeat-timeout ({timeout}s) must be longer than --heartbeat-interval ({interval}s)" in \
        one_line(done.stderr)


def test_a_worker_for_a_scheme_without_worker_processes_is_a_usage_error() -> None:
    """(Its processes failed to start, and the command blamed the key.)"""
    done = run_cli("worker", "memory://x", "--insecure")
    assert done.returncode == 2
    assert one_line(done.stderr) == "remote-executor: memory:// has no worker processes to start"


def test_usage_errors_keep_their_exit_code_under_python_dash_m() -> None:
    """(python -m remote_executor.cli ran a second copy of the module, which took the usage error for a failure.)"""
    done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "cluster", "up"], capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert one_line(done.stderr) == "remote-executor: no hosts: give --hosts node1,node2 or --hosts-file FILE"


@pytest.mark.parametrize(("args", "command"), [
    (("worker", "tcp://127.0.0.1:5555", "--slots", "2"), "worker"),
    (("ping", "tcp://127.0.0.1:5555", "extra"), "ping"),
    (("cluster", "start", "-n", "1", "--bogus"), "cluster start"),
])
def test_an_unknown_argument_names_the_command_whose_help_lists_the_right_ones(args: tuple[str, ...],
                                                                               command: str) -> None:
    done = run_cli(*args)
    assert done.returncode == 2
    assert one_line(done.stderr).endswith(f"(see: remote-executor {command} --help)")
    assert f"unrecognized arguments: {' '.join(args[-1:] if command != 'worker' else args[-2:])}" in done.stderr


@pytest.mark.parametrize("scheme", ["tcp", "zmq"])
def test_a_server_given_a_list_of_addresses_is_a_usage_error(scheme: str) -> None:
    done = run_cli("server", f"{scheme}://127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}", "--insecure")
    assert done.returncode == 2
    assert "a job server listens on one address, not 2" in one_line(done.stderr)


def test_a_negative_ping_wait_is_a_usage_error_like_the_others() -> None:
    done = run_cli("ping", "tcp://127.0.0.1:5555", "--wait", "-1")
    assert done.returncode == 2
    assert one_line(done.stderr) == ("remote-executor: argument --wait: must be 0 or a positive number, not -1 "
                                     "(see: remote-executor ping --help)")


def test_cluster_start_leaves_a_signal_it_finds_ignored_ignored() -> None:
    """`nohup remote-executor cluster up`: a hangup while the cluster starts must not stop it."""
    import signal

    from remote_executor.cli_cluster import _signals_raise

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with _signals_raise():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)  # (the default: raise)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
