"""``remote-executor gearmand``: run gearmand (the Gearman job server) in the foreground, for as long as this
command runs. An SSH cluster over gearman starts it this way on a host (``--exit-on-stdin-eof``: it ends
with the SSH session); by hand it is a gearmand that stops on Ctrl-C or SIGTERM.

    remote-executor gearmand --listen 0.0.0.0 --port 4730

gearmand authenticates nobody: with a key, clients and workers seal every job and result (AES-GCM), so
what reaches gearmand is opaque; anyone who can reach its port can still fill its queue. Listen only where
your clients and workers are.
"""

from __future__ import annotations

import argparse
import atexit
import logging

from .signals import SignalEvent, set_on_signals

log = logging.getLogger("remote_executor.cli")


def add_gearmand_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("gearmand", help="run gearmand in the foreground until stopped",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=_gearmand)
    parser.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS",
                        help="address to listen on (0.0.0.0: every interface; default: %(default)s)")
    parser.add_argument("--port", type=int, default=4730, help="port to listen on, 0 for any free one "
                                                               "(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=4, help="gearmand's I/O threads (default: %(default)s)")
    parser.add_argument("--job-retries", type=int, default=None,
                        help="gearmand's -j: how often a job whose worker was lost is handed out again")
    parser.add_argument("--exit-on-stdin-eof", action="store_true",
                        help="stop when standard input closes (gearmand that ends with the SSH session)")


GEARMAND_POLL = 0.5  # seconds between two looks at whether gearmand still runs


def _gearmand(args: argparse.Namespace) -> int:
    from .transports.gearman.gearmand import GearmandProcess
    from .worker import watch_stdin

    stop = SignalEvent()
    set_on_signals(stop)
    gearmand = GearmandProcess(host=args.listen, port=args.port or None, threads=args.threads,
                               job_retries=args.job_retries)
    gearmand.start()  # from the main thread: gearmand is killed by the kernel if this thread dies
    atexit.register(gearmand.stop)  # the end of standard input exits from another thread, through atexit
    try:
        if args.exit_on_stdin_eof:
            watch_stdin(stop)  # a "drain" line stops too; end of input exits at once, atexit stops gearmand
        print(f"gearmand serving gearman://{args.listen}:{gearmand.port} (pid {gearmand.pid})", flush=True)
        # gearmand may end without us: `remote-executor stop gearman://...` (status 0), a crash or a kill.
        # This command then ends too, so a service manager sees it and can restart it.
        while not stop.wait(GEARMAND_POLL):
            code = gearmand.returncode
            if code is not None:
                if code == 0:
                    log.info("gearmand stopped (a graceful stop, as `remote-executor stop` asks for)")
                    return 0
                log.error("gearmand exited with status %d%s", code, f"; its log:\n{gearmand.log_tail()}"
                          if code > 0 else "")
                return 1
        log.info("stopping gearmand")
    finally:
        gearmand.stop()
    return 0
