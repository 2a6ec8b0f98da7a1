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
from ..base import Backend, ClientTransport, EmbeddedServer, Options, Session, WorkerCore, WorkerSettings
from .jobs import DEFAULT_POOL, function_name, parse_url

__all__ = ["DEFAULT_POOL", "GearmanBackend"]


class GearmanBackend(Backend):
    """gearmand is the job server: there is no server of ours, and the embedded cluster starts a gearmand."""

    scheme = "gearman"
    client_options = frozenset({"limits", "pool", "job_ttl", "tls", "tls_ca", "tls_cert", "tls_key"})

    def client(self, url: str, options: Options) -> ClientTransport:
        from .client import GearmanClientTransport

        return GearmanClientTransport(url, options)

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
        return {"url": url, "function": function_name(pool).decode(), "servers": servers}
