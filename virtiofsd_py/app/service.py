"""What the daemon shows its operator: sd_notify, metrics, SIGUSR1 dumps.

``daemon.serve`` calls these hooks at the points of its lifecycle; all the
operator-facing logic lives here so the wiring in daemon.py stays a few lines.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from virtiofsd_py.app import sdnotify
from virtiofsd_py.app.metrics import Handler, Metrics, ring_gauges, table_gauges
from virtiofsd_py.app.metrics_server import MetricsServer, parse_address
from virtiofsd_py.app.options import Options

log = logging.getLogger("virtiofsd_py")


#: The metrics server opened by ``prepare``, waiting for ``ServiceHooks``.
_prepared: MetricsServer | None = None


def _startup_error(server: MetricsServer, e: OSError) -> Exception:
    from virtiofsd_py.app.daemon import StartupError

    return StartupError(f"--metrics {server.address}: {e.strerror or e}")


def prepare(opts: Options) -> None:
    """Before the sandbox: connect to systemd's notify socket and bind the
    metrics socket, which the sandbox (mount namespace, seccomp without
    ``bind``) would no longer allow."""
    global _prepared
    sdnotify.prepare()
    if opts.metrics is not None and _prepared is None:
        server = MetricsServer(Metrics(), parse_address(opts.metrics))
        try:
            server.open()
        except OSError as e:
            raise _startup_error(server, e) from None
        _prepared = server


class ServiceHooks:
    """Created once per daemon; ``start`` before listening, ``close`` at exit."""

    def __init__(self, opts: Options, loop: asyncio.AbstractEventLoop) -> None:
        global _prepared
        self._loop = loop
        self.server, _prepared = _prepared, None
        if self.server is None and opts.metrics is not None:
            self.server = MetricsServer(Metrics(), parse_address(opts.metrics))
        self.metrics = self.server.metrics if self.server is not None else Metrics()

    async def start(self) -> None:
        """Serve ``--metrics`` (if asked) and dump the metrics on SIGUSR1."""
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as e:
                raise _startup_error(self.server, e) from None
        self._loop.add_signal_handler(signal.SIGUSR1, self.dump)

    def dump(self) -> None:
        for line in self.metrics.summary_lines():
            log.info("%s", line)

    def listening(self, where: str) -> None:
        """The socket accepts connections: startup is over (systemd Type=notify)."""
        sdnotify.ready(f"waiting for a vhost-user front-end on {where}")

    def instrument(self, handler: Handler) -> Handler:
        """The request handler the queue runner should call: counted always (for
        SIGUSR1), timed only with ``--metrics`` (the clock reads are the cost)."""
        return self.metrics.instrument(handler, timed=self.server is not None)

    def serving(self, rings: Callable[[], Sequence[Any]], fs: Any) -> None:
        """A front-end is connected: expose its queues and the filesystem's tables."""
        self.metrics.add_gauges(ring_gauges(rings))
        fd_dir = getattr(getattr(fs, "config", None), "proc_self_fd", None)
        if isinstance(fd_dir, str):
            self.metrics.fd_dir = fd_dir
        inodes, handles = getattr(fs, "inodes", None), getattr(fs, "handles", None)
        if inodes is not None and handles is not None:
            self.metrics.add_gauges(table_gauges(inodes.__len__, handles.__len__))
        sdnotify.status("serving a vhost-user front-end")

    async def close(self) -> None:
        sdnotify.stopping("shutting down")
        self._loop.remove_signal_handler(signal.SIGUSR1)
        if self.server is not None:
            await self.server.close()
