"""A whole cluster on namespaced hosts, for the chaos tests and ``benchmarks/soak.py``.

Topology (one :class:`tests.netns.Network`, addresses in 10.213.0.0/24)::

    srv1 .1 [srv2 .2]      job server(s): ``remote-executor server tcp|zmq://ADDR:5555`` or gearmand :4730,
                           the probe (status questions) and the fault proxy (:6000 -> the server) on srv1
    w1 .11, w2 .12         ``remote-executor worker URL --processes 2``, short heartbeats
    c1 .21, c2 .22         client processes (``chaos_client.py``), each writing a JSON summary

Every call is counted by its side effect: :mod:`chaos_task` appends ``S <call id> <pid> <time>`` to one
execution log (the namespaces share the file system). Every process is started with
:meth:`tests.netns.Network.exec_in` (its own process group); :meth:`ChaosCluster.stop` stops them the way an
operator would (SIGTERM: workers drain, servers stop) and reports what did not exit and what is still
running in the namespaces; :meth:`ChaosCluster.close` kills whatever is left and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import remote_executor

from ..netns import Host, Network, Proc

HERE = Path(__file__).resolve().parent
SRC = Path(remote_executor.__file__).resolve().parent.parent
GEARMAND_DIRS = ("/usr/sbin", "/usr/local/sbin")
PORTS = {"tcp": 5555, "zmq": 5555, "gearman": 4730}
PROXY_PORT = 6000
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 2.0
STARTUP_TIMEOUT = 60.0  # starting a process, attaching workers: generous, the machine is shared
STOP_TIMEOUT = 30.0  # a SIGTERMed worker drains its running call; a server stops at once

# What a chaos failure may legitimately look like (everything else is a bug).
WORKER_LOST = "WorkerLostError"
SERVER_UNAVAILABLE = "ServerUnavailableError"
EXPECTED_FAILURES = frozenset({WORKER_LOST, SERVER_UNAVAILABLE})


def find_gearmand() -> str | None:
    return shutil.which("gearmand", path=os.pathsep.join([os.environ.get("PATH", ""), *GEARMAND_DIRS]))


@dataclass
class ClientRun:
    """One client process and where its summary goes."""

    name: str
    host: Host
    proc: Proc
    prefix: str
    summary_path: Path
    calls: int
    max_retries: int
    summary: dict[str, Any] | None = None

    def progress(self) -> int:
        """How many futures have resolved, as last reported."""
        for line in reversed(self.proc.lines):
            if line.startswith("progress "):
                return int(line.split()[1])
        return 0

    def wait_progress(self, count: int, timeout: float) -> bool:
        """Until ``count`` futures resolved (True), or the client finished or ``timeout`` passed (False)."""
        line = self.proc.wait_for(
            lambda text: text == "done" or (text.startswith("progress ") and int(text.split()[1]) >= count),
            timeout)
        return line is not None and line != "done"

    def finished(self) -> bool:
        return self.proc.popen.poll() is not None

    def result(self, timeout: float) -> dict[str, Any]:
        """The summary, once the client exited (it is killed after ``timeout`` and the summary says so)."""
        if self.summary is not None:
            return self.summary
        code = self.proc.wait(timeout)
        if code is None:
            self.proc.kill()
            self.summary = {"prefix": self.prefix, "calls": self.calls, "error": f"client hung for {timeout}s",
                            "tail": self.proc.tail()}
        elif not self.summary_path.exists():
            self.summary = {"prefix": self.prefix, "calls": self.calls,
                            "error": f"client exited with {code} without a summary", "tail": self.proc.tail()}
        else:
            self.summary = json.loads(self.summary_path.read_text())
            self.summary["exit_code"] = code
        return self.summary


@dataclass
class Execution:
    call_id: str
    pid: int
    started: float


@dataclass
class StopReport:
    """What :meth:`ChaosCluster.stop` found: processes that did not exit when told, and leftovers."""

    exit_codes: dict[str, int | None] = field(default_factory=dict)
    leftovers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def hung(self) -> list[str]:
        return [name for name, code in self.exit_codes.items() if code is None]

    def problems(self) -> list[str]:
        found = [f"{name} did not exit within {STOP_TIMEOUT}s of SIGTERM" for name in self.hung]
        found += [f"left running in {ns}: {procs}" for ns, procs in self.leftovers.items()]
        return found


class ChaosCluster:
    """Job server(s), two worker hosts and client hosts on one namespaced network. A context manager."""

    def __init__(self, transport: str, workdir: Path, *, servers: int = 1, worker_hosts: int = 2,
                 processes: int = 2, client_hosts: int = 2, max_retries: int = 2, proxy: bool = False,
                 proxy_delay: float = 0.0, proxy_drop: float = 0.0, seed: int = 0) -> None:
        if transport not in PORTS:
            raise ValueError(f"unknown transport {transport!r}")
        self.transport = transport
        self.port = PORTS[transport]
        self.workdir = workdir
        self.max_retries = max_retries
        self.processes = processes
        self.rng = random.Random(seed)
        self.app = workdir / "app"
        self.logs = workdir / "logs"
        self.exec_log = workdir / "executions.log"
        self.key_file = workdir / "key"
        self.net = Network()
        try:
            self.servers = [self.net.add_host(f"srv{i + 1}", i + 1) for i in range(servers)]
            self.worker_hosts = [self.net.add_host(f"w{i + 1}", 11 + i) for i in range(worker_hosts)]
            self.client_hosts = [self.net.add_host(f"c{i + 1}", 21 + i) for i in range(client_hosts)]
        except BaseException:
            self.net.close()
            raise
        self.server_procs: list[Proc | None] = [None] * servers
        self.worker_procs: list[Proc] = []
        self.clients: list[ClientRun] = []
        self.proxy: Proc | None = None
        self.probe: Proc | None = None
        self._proxy_settings = (proxy, proxy_delay, proxy_drop, seed)
        self._server_starts = 0

    def __enter__(self) -> ChaosCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- set-up ---------------------------------------------------------------------------------------

    def start(self) -> ChaosCluster:
        """Start the server(s), the probe, the proxy (if asked) and the workers; return once every worker
        process is attached (a :class:`AssertionError` if that takes more than STARTUP_TIMEOUT)."""
        self.app.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in ("chaos_task.py", "chaos_client.py", "probe.py", "proxy.py"):
            shutil.copy(HERE / name, self.app / name)
        self.key_file.write_text(os.urandom(32).hex() + "\n")
        self.key_file.chmod(0o600)  # key files others can read are refused
        self.exec_log.touch()
        self.probe = self.net.exec_in(self.servers[0], [sys.executable, str(self.app / "probe.py"),
                                                        str(self.key_file)],
                                      name="probe", env=self.env(), log=self.logs / "probe.log", stdin=True)
        self.probe.wait_line("ready", STARTUP_TIMEOUT)
        for index in range(len(self.servers)):
            self.start_server(index)
        proxy, delay, drop, seed = self._proxy_settings
        if proxy:
            self.start_proxy(delay, drop, seed)
        for host in self.worker_hosts:
            self.start_workers(host)
        self.wait_attached()
        return self

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_EXECUTOR_")}
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(self.app)])
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "remote_executor.cli", "--log-level", "INFO", *args]

    def _heartbeat_args(self) -> list[str]:
        return ["--heartbeat-interval", str(HEARTBEAT_INTERVAL), "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)]

    def server_url(self, index: int) -> str:
        return f"{self.transport}://{self.servers[index].addr}:{self.port}"

    @property
    def worker_url(self) -> str:
        """Every server of the cluster (workers connect directly, never through the proxy)."""
        return f"{self.transport}://" + ",".join(f"{h.addr}:{self.port}" for h in self.servers)

    @property
    def client_url(self) -> str:
        """What clients use: through the proxy if there is one."""
        if self.proxy is not None:
            return f"{self.transport}://{self.servers[0].addr}:{PROXY_PORT}"
        return self.worker_url

    def start_server(self, index: int) -> None:
        host = self.servers[index]
        self._server_starts += 1
        log = self.logs / f"server-{host.name}.log"
        if self.transport == "gearman":
            gearmand = find_gearmand()
            assert gearmand is not None, "gearmand is not installed"
            argv = [gearmand, f"--listen={host.addr}", f"--port={self.port}", "--log-file=none",
                    f"--pid-file={self.workdir / f'gearmand-{host.name}-{self._server_starts}.pid'}",
                    f"--job-retries={self.max_retries + 1}"]
            proc = self.net.exec_in(host, argv, name=f"gearmand@{host.name}", env=self.env(), log=log)
            self.server_procs[index] = proc
            if not self.wait_port(host.addr, self.port, STARTUP_TIMEOUT):
                raise AssertionError(f"gearmand on {host.name} did not accept connections within "
                                     f"{STARTUP_TIMEOUT}s (exit code {proc.popen.poll()})\n{proc.tail()}")
        else:
            argv = self._cli("server", self.server_url(index), "--key-file", str(self.key_file),
                             *self._heartbeat_args())
            proc = self.net.exec_in(host, argv, name=f"server@{host.name}", env=self.env(), log=log)
            self.server_procs[index] = proc
            proc.wait_line("serving", STARTUP_TIMEOUT)

    def kill_server(self, index: int, signum: int = signal.SIGKILL) -> None:
        proc = self.server_procs[index]
        assert proc is not None
        proc.signal(signum)
        proc.wait(STOP_TIMEOUT)
        self.server_procs[index] = None

    def restart_server(self, index: int) -> None:
        """SIGKILL the server and start a fresh one on the same address."""
        self.kill_server(index)
        self.start_server(index)

    def start_proxy(self, delay: float, drop: float, seed: int) -> None:
        host = self.servers[0]
        argv = [sys.executable, str(self.app / "proxy.py"), "--listen", f"{host.addr}:{PROXY_PORT}",
                "--target", f"{host.addr}:{self.port}", "--delay", str(delay), "--drop", str(drop),
                "--seed", str(seed)]
        self.proxy = self.net.exec_in(host, argv, name="proxy", env=self.env(), log=self.logs / "proxy.log",
                                      stdin=True)
        self.proxy.wait_line("listening", STARTUP_TIMEOUT)

    def proxy_command(self, command: str, answer: str | None = None, timeout: float = 30.0) -> str | None:
        """Send a command to the proxy; wait for the next line starting with ``answer`` (if given)."""
        assert self.proxy is not None and self.proxy.popen.stdin is not None
        seen = len(self.proxy.lines)
        self.proxy.popen.stdin.write(command + "\n")
        self.proxy.popen.stdin.flush()
        if answer is None:
            return None
        return self._next_line(self.proxy, seen, answer, timeout)

    @staticmethod
    def _next_line(proc: Proc, seen: int, prefix: str, timeout: float) -> str:
        """The first stdout line of ``proc`` from line number ``seen`` on that starts with ``prefix``."""
        deadline = time.monotonic() + timeout
        while (line := proc.line_after(seen, max(deadline - time.monotonic(), 0.0))) is not None:
            if line.startswith(prefix):
                return line
            seen += 1
        raise AssertionError(f"{proc.name} did not answer {prefix!r} within {timeout}s\n{proc.tail()}")

    def start_workers(self, host: Host) -> Proc:
        argv = self._cli("worker", self.worker_url, "--processes", str(self.processes), "--key-file",
                         str(self.key_file), *self._heartbeat_args())
        proc = self.net.exec_in(host, argv, name=f"workers@{host.name}", env=self.env(),
                                log=self.logs / f"workers-{host.name}.log")
        proc.wait_line("serving", STARTUP_TIMEOUT)
        self.worker_procs.append(proc)
        return proc

    # --- looking ---------------------------------------------------------------------------------------

    def _ask(self, command: str, timeout: float = 30.0) -> str:
        """Send the probe one command; its answer (one line)."""
        assert self.probe is not None and self.probe.popen.stdin is not None
        seen = len(self.probe.lines)
        self.probe.popen.stdin.write(command + "\n")
        self.probe.popen.stdin.flush()
        return self._next_line(self.probe, seen, "", timeout)

    def wait_port(self, addr: str, port: int, timeout: float) -> bool:
        return self._ask(f"port {addr} {port} {timeout}", timeout + 30) == "port ok"

    def status(self, url: str) -> dict[str, Any] | None:
        """``remote-executor status URL`` as a dict, or None if the server does not answer."""
        answer = self._ask(f"status {url}")
        return json.loads(answer.split(" ", 1)[1]) if answer.startswith("status ") else None

    def attached(self) -> list[int]:
        """Worker processes attached to each server (0 for one that does not answer)."""
        counts = []
        for index in range(len(self.servers)):
            info = self.status(self.server_url(index))
            if info is None:
                counts.append(0)
            elif self.transport == "gearman":
                entries = info["servers"][0].get("status", [])
                counts.append(sum(e["workers"] for e in entries if e["function"] == info["function"]))
            else:
                counts.append(int(info["capacity"]))
        return counts

    def wait_attached(self, timeout: float = STARTUP_TIMEOUT, servers: list[int] | None = None) -> list[int]:
        """Until every worker process is attached to each server in ``servers`` (default: all) — for
        several tcp/zmq servers, until they are attached somewhere: how they spread is theirs to decide."""
        expected = len(self.worker_hosts) * self.processes
        indices = servers if servers is not None else list(range(len(self.servers)))
        deadline = time.monotonic() + timeout
        while True:
            counts = self.attached()
            chosen = [counts[i] for i in indices]
            spread = self.transport != "gearman" and len(self.servers) > 1
            if (sum(chosen) >= expected) if spread else all(c == expected for c in chosen):
                return counts
            if time.monotonic() > deadline:
                raise AssertionError(f"workers attached per server: {counts}, expected {expected} each, "
                                     f"after {timeout}s\n" + "\n".join(p.tail(10) for p in self.worker_procs))
            time.sleep(0.2)

    def leftover_work(self) -> dict[str, Any]:
        """What each live server still holds for clients (sessions, queued or running calls); empty dict
        entries mean nothing."""
        held: dict[str, Any] = {}
        for index, proc in enumerate(self.server_procs):
            if proc is None:
                continue
            url = self.server_url(index)
            info = self.status(url)
            if info is None:
                held[url] = "no answer"
            elif self.transport == "gearman":
                jobs = [e for e in info["servers"][0].get("status", []) if e["function"] == info["function"]]
                if any(e["total"] for e in jobs):
                    held[url] = jobs
            else:
                busy = [w for w in info["workers"] if w["running"]]
                if info["clients"] or busy:
                    held[url] = {"clients": info["clients"], "busy workers": busy}
        return held

    def wait_idle(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until no live server holds anything for a client any more (clients have exited)."""
        deadline = time.monotonic() + timeout
        while held := self.leftover_work():
            if time.monotonic() > deadline:
                raise AssertionError(f"{timeout}s after the clients exited the servers still hold: {held}")
            time.sleep(0.2)

    def worker_pids(self, host: Host | None = None) -> list[int]:
        """The worker processes (``python -m remote_executor.worker``) running on ``host`` (default: all)."""
        pids = []
        for h in [host] if host is not None else self.worker_hosts:
            for pid in self.net.pids().get(h.ns, []):
                if "remote_executor.worker" in _cmdline(pid):
                    pids.append(pid)
        return pids

    def executions(self, mark: str = "S") -> list[Execution]:
        """Every start of a call (``mark="E"``: every completion) recorded in the execution log."""
        found = []
        for line in self.exec_log.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4 and fields[0] == mark:
                found.append(Execution(fields[1], int(fields[2]), float(fields[3])))
        return found

    def unfinished_call_of(self, pid: int) -> str | None:
        """The call ``pid`` started and has not finished (by the execution log), if any."""
        running: dict[str, int] = {}
        for line in self.exec_log.read_text().splitlines():
            fields = line.split()
            if len(fields) == 4 and int(fields[2]) == pid:
                running[fields[1]] = running.get(fields[1], 0) + (1 if fields[0] == "S" else -1)
        open_calls = [call for call, depth in running.items() if depth > 0]
        return open_calls[-1] if open_calls else None

    # --- clients --------------------------------------------------------------------------------------

    def start_client(self, host: Host, *, calls: int, seconds: float, prefix: str, reconnect_timeout: float = 30.0,
                     deadline: float = 60.0, max_retries: int | None = None, progress_every: int = 10,
                     duration: float | None = None, window: int | None = None) -> ClientRun:
        """A client process on ``host`` submitting ``calls`` calls of ``seconds`` each (all at once, or
        ``window`` at a time for at most ``duration`` seconds); it waits at most ``deadline`` seconds after
        its last submission for every future, then writes its summary."""
        retries = self.max_retries if max_retries is None else max_retries
        summary = self.workdir / f"summary-{prefix}.json"
        config = {
            "url": self.client_url, "key_file": str(self.key_file), "calls": calls, "seconds": seconds,
            "prefix": prefix, "exec_log": str(self.exec_log), "summary": str(summary), "max_retries": retries,
            "heartbeat_interval": HEARTBEAT_INTERVAL, "heartbeat_timeout": HEARTBEAT_TIMEOUT,
            "reconnect_timeout": reconnect_timeout, "connect_timeout": 10.0, "deadline": deadline,
            "progress_every": progress_every, "duration": duration, "window": window,
        }
        config_path = self.workdir / f"client-{prefix}.json"
        config_path.write_text(json.dumps(config))
        proc = self.net.exec_in(host, [sys.executable, str(self.app / "chaos_client.py"), str(config_path)],
                                name=f"client {prefix}@{host.name}", env=self.env(),
                                log=self.logs / f"client-{prefix}.log")
        run = ClientRun(prefix, host, proc, prefix, summary, calls, retries)
        self.clients.append(run)
        return run

    def start_clients(self, *, calls: int, seconds: float, **options: Any) -> list[ClientRun]:
        """One client on each client host (prefixes c1, c2, ...); returns once all are connected."""
        runs = [self.start_client(host, calls=calls, seconds=seconds, prefix=host.name, **options)
                for host in self.client_hosts]
        for run in runs:
            run.proc.wait_line("connected", STARTUP_TIMEOUT)
        return runs

    # --- verdicts -------------------------------------------------------------------------------------

    def check(self, runs: list[ClientRun], *, allowed: frozenset[str] = EXPECTED_FAILURES,
              timeout: float = 120.0) -> list[str]:
        """What went wrong for these clients: unresolved futures, wrong results, unexpected exception types,
        calls run more than ``max_retries + 1`` times, a hung shutdown. Empty if nothing did."""
        problems: list[str] = []
        for run in runs:
            run.result(timeout)  # first: every client has finished before the executions are counted
        executions = self.executions()
        counts = Counter(e.call_id for e in executions)
        pids: dict[str, list[int]] = defaultdict(list)
        for e in executions:
            pids[e.call_id].append(e.pid)
        for run in runs:
            s = run.result(timeout)
            name = f"client {run.prefix}"
            if "error" in s:
                problems.append(f"{name}: {s['error']}\n{s.get('tail', '')}")
                continue
            if s["unresolved"]:
                problems.append(f"{name}: {s['unresolved']} of {s['calls']} futures unresolved after the "
                                f"deadline ({s['elapsed']}s), e.g. {s['unresolved_ids'][:5]}")
            if s["wrong"]:
                problems.append(f"{name}: {s['wrong']} wrong results, e.g. {s['wrong_examples'][:3]}")
            unexpected = {t: n for t, n in s["exceptions"].items() if t not in allowed}
            if unexpected:
                problems.append(f"{name}: unexpected exceptions {unexpected} (allowed: {sorted(allowed)}): "
                                f"{ {t: s['exception_examples'].get(t) for t in unexpected} }")
            if s.get("stalled"):
                problems.append(f"{name}: stopped submitting: no future resolved for a whole deadline")
            if s["shutdown"] != "ok":
                problems.append(f"{name}: shutdown {s['shutdown']}")
            limit = run.max_retries + 1
            over = {c: n for c, n in counts.items() if c.startswith(run.prefix + "-") and n > limit}
            if over:
                worst = sorted(over.items(), key=lambda kv: -kv[1])[:5]
                problems.append(f"{name}: {len(over)} call(s) ran more than max_retries+1={limit} times, e.g. "
                                + ", ".join(f"{c} x{n} (pids {pids[c]})" for c, n in worst))
            never = [c for c in (f"{run.prefix}-{i}" for i in range(s["calls"]))
                     if c not in s["failed"] and counts[c] == 0 and not s["unresolved"]]
            if never:
                problems.append(f"{name}: {len(never)} call(s) reported a result but never ran, e.g. {never[:5]}")
        return problems

    def describe(self, runs: list[ClientRun]) -> str:
        """One line per client: ok / exceptions / unresolved / max executions, for the test's output."""
        counts = Counter(e.call_id for e in self.executions())
        lines = []
        for run in runs:
            s = run.summary or {}
            mine = [n for c, n in counts.items() if c.startswith(run.prefix + "-")]
            lines.append(f"{run.prefix}: ok={s.get('ok')} exceptions={s.get('exceptions')} "
                         f"unresolved={s.get('unresolved')} wrong={s.get('wrong')} elapsed={s.get('elapsed')} "
                         f"max_executions={max(mine, default=0)}")
        return "; ".join(lines)

    # --- teardown -------------------------------------------------------------------------------------

    def stop(self) -> StopReport:
        """Stop everything as an operator would and report what did not go: clients should have exited
        on their own; workers drain on SIGTERM; servers, the proxy and the probe stop."""
        report = StopReport()
        for run in self.clients:
            report.exit_codes[run.proc.name] = run.proc.wait(STOP_TIMEOUT)
        for proc in self.worker_procs:
            proc.signal(signal.SIGCONT)  # a worker a test left stopped
            # SIGTERM to the command only, as documented: it drains its worker processes itself. (Signalling
            # the whole group, as systemd's default KillMode does, hands each worker process a second SIGTERM
            # and can deadlock its handler: Event.set re-entered from a signal handler.)
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        for proc in self.worker_procs:
            report.exit_codes[proc.name] = proc.wait(STOP_TIMEOUT)
        for proc in self.server_procs:
            if proc is not None:
                proc.signal(signal.SIGTERM)
                report.exit_codes[proc.name] = proc.wait(STOP_TIMEOUT)
        for helper in (self.proxy, self.probe):
            if helper is not None and helper.popen.stdin is not None:
                helper.popen.stdin.close()
                report.exit_codes[helper.name] = helper.wait(STOP_TIMEOUT)
        for ns, pids in self.net.pids().items():
            report.leftovers[ns] = [f"{pid} {_cmdline(pid)}" for pid in pids]
        return report

    def close(self) -> None:
        """Kill whatever still runs and delete every namespace (always safe to call)."""
        self.net.close()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
