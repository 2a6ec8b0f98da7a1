"""The gearman backend: ``gearman`` (embedded: a private gearmand) and ``gearman://h1:4730,h2:4730[/POOL]``.

gearmand is the job server; this transport maps calls to Gearman jobs and speaks the binary protocol through
our own small codec (the PyPI Gearman libraries do not work on Python 3.10-3.13)::

    client (.client)                           gearmand (1..n)                 worker (.worker)
    SUBMIT_JOB remote_executor.<POOL>   ──▶    queue per function     ──▶    GRAB_JOB_UNIQ; decrypt and verify,
      payload: TASK frame, encrypted                                           refuse expired or replayed jobs
      with a job id and expiry (key)                                          WORK_DATA "started by <name>"
    WORK_COMPLETE: RESULT/BROKEN frame  ◀──                           ◀──    initializer (once), call
      encrypted for this job only                                             WORK_COMPLETE (or WORK_FAIL)
    WORK_FAIL: worker lost / refused

Modules: :mod:`.codec` (packets, sans I/O), :mod:`.connection` (client, worker and admin connections),
:mod:`.jobs` (URLs, pools and job payloads, encrypted with a key), :mod:`.replay` (what a worker refuses to
run twice), :mod:`.client`, :mod:`.worker`, :mod:`.gearmand` (a private gearmand process) and
:mod:`.embedded` (the local cluster's gearmand).
"""


from __future__ import annotations

from typing import Any

from ...errors import TransportError
from ...security import KEY_ENV, is_loopback
from ..base import Backend, ClientTransport, EmbeddedServer, Options, Session, WorkerCore, WorkerSettings
from .jobs import DEFAULT_POOL, function_name, parse_url

__all__ = ["DEFAULT_POOL", "GearmanBackend"]


class GearmanBackend(Backend):
    """gearmand is the job server: there is no server of ours, and the embedded cluster starts a gearmand."""

    scheme = "gearman"
    client_options = frozenset({"limits", "pool", "job_ttl", "tls", "tls_ca", "tls_cert", "tls_key"})
    sibling_records = True  # a time-limited job gearmand hands out again is not run again past its limit
    cannot_stop_workers = ("gearmand hands a job to whichever worker asks first and cannot address every "
                           "worker, so it cannot tell them to exit. Stop the worker processes themselves (SIGTERM "
                           "drains each), or their supervisor.")

    def client(self, url: str, options: Options) -> ClientTransport:
        from .client import GearmanClientTransport

        return GearmanClientTransport(url, options)

    def check_url(self, url: str) -> None:
        from .jobs import parse_url

        parse_url(url)

    def embedded_server(self, options: Options, session: Session, workers: int) -> EmbeddedServer:
        from .embedded import EmbeddedGearmand

        return EmbeddedGearmand(options, session, workers)

    def run_worker(self, settings: WorkerSettings, core: WorkerCore) -> int:
        """Serve every gearmand of ``settings.url`` until drained (0) or no server is reachable (1)."""
        from .worker import GearmanWorker

        return GearmanWorker(settings, core).run()

    def status(self, url: str, options: Options) -> dict[str, Any]:
        """gearmand's admin ``status`` and ``workers`` of every job server. gearmand's admin protocol has no
        authentication, so the key is not used."""
        from .connection import GearmanConnectionError, admin_command, admin_status, admin_workers
        from .tlssocket import tls_context

        timeout = options.connect_timeout
        tls = tls_context(options.extra)
        addresses, pool = parse_url(url)
        servers: list[dict[str, object]] = []
        errors = []
        for host, port in addresses:
            entry: dict[str, object] = {"address": f"{host}:{port}"}
            try:
                entry["version"] = " ".join(admin_command(host, port, "version", timeout=timeout, tls=tls))
                entry["status"] = [vars(s) for s in admin_status(host, port, timeout=timeout, tls=tls)]
                entry["workers"] = [{**vars(w), "functions": list(w.functions)}
                                    for w in admin_workers(host, port, timeout=timeout, tls=tls)]
            except (GearmanConnectionError, OSError) as exc:
                entry["error"] = str(exc)
                errors.append(str(exc))
            servers.append(entry)
        if len(errors) == len(addresses):
            raise TransportError("; ".join(errors))
        return {"url": url, "function": function_name(pool).decode(), "pool": pool, "servers": servers}

    def stop(self, url: str, options: Options, workers: bool) -> list[dict[str, Any]]:
        """Stop every gearmand of ``url`` gracefully: it stops taking connections, finishes every job it has
        (queued ones too, while workers take them), then exits. Through the admin command ``shutdown
        graceful``; a build of gearmand without it (Debian's) on this machine gets SIGUSR1, which means the
        same. Workers cannot be told anything through gearmand, so ``workers`` is refused."""
        from .stop import stop_gearmand

        if workers:
            raise TransportError(f"--workers is not available for gearman:// ({url}): {self.cannot_stop_workers}")
        addresses, _ = parse_url(url)
        hosts = [host for host, _ in addresses]
        if options.key is None and not options.insecure and not all(is_loopback(host) for host in hosts):
            raise TransportError(
                f"refusing to stop gearmand at {', '.join(hosts)} without a key: over a network gearmand's "
                f"admin port is anyone's. Give the cluster's key (--key-file or ${KEY_ENV}), or --insecure on "
                f"a trusted network.")
        from .tlssocket import tls_context

        tls = tls_context(options.extra)
        return [stop_gearmand(host, port, timeout=options.connect_timeout, tls=tls) for host, port in addresses]
