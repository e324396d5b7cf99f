"""What the daemon shows its operator: sd_notify, metrics, SIGUSR1 dumps.

:func:`prepare` (in the start-up sequence, before the sandbox) returns the
:class:`ServiceHooks`; ``daemon.serve`` calls them at the points of its
lifecycle, so all the operator-facing logic lives here and the wiring in
daemon.py stays a few lines.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

from virtiofsd_py.app import sdnotify
from virtiofsd_py.app.backends import TableSizes
from virtiofsd_py.app.errors import StartupError, describe
from virtiofsd_py.app.metrics import FastCounts, Metrics, ring_gauges, table_gauges
from virtiofsd_py.app.metrics_server import MetricsServer, parse_address
from virtiofsd_py.app.options import Options
from virtiofsd_py.virtio.runner import ChainHandler

log = logging.getLogger("virtiofsd_py")


def _startup_error(server: MetricsServer, e: OSError) -> StartupError:
    return StartupError(f"--metrics {server.address}: {describe(e)}")


def prepare(opts: Options) -> ServiceHooks:
    """Before the sandbox: connect to systemd's notify socket and bind the
    metrics socket, which the sandbox (mount namespace, seccomp without
    ``bind``) would no longer allow."""
    notifier = sdnotify.Notifier()
    notifier.prepare()
    if opts.metrics is None:
        return ServiceHooks(None, notifier)
    server = MetricsServer(Metrics(), parse_address(opts.metrics))
    try:
        server.open()
    except OSError as e:
        notifier.close()
        raise _startup_error(server, e) from None
    return ServiceHooks(server, notifier)


class ServiceHooks:
    """Made once per daemon by :func:`prepare`; ``start`` before listening,
    ``close`` at exit, both on the event loop."""

    def __init__(
        self, server: MetricsServer | None, notifier: sdnotify.Notifier | None = None
    ) -> None:
        self.server = server
        self.notifier = notifier if notifier is not None else sdnotify.Notifier()
        self.metrics = server.metrics if server is not None else Metrics()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Serve ``--metrics`` (if asked) and dump the metrics on SIGUSR1."""
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as e:
                raise _startup_error(self.server, e) from None
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGUSR1, self.dump)

    def dump(self) -> None:
        for line in self.metrics.summary_lines():
            log.info("%s", line)

    def listening(self, where: str) -> None:
        """The socket accepts connections: startup is over (systemd Type=notify)."""
        self.notifier.ready(f"waiting for a vhost-user front-end on {where}")

    def instrument(self, handler: ChainHandler) -> ChainHandler:
        """The request handler the queue runner should call: counted always (for
        SIGUSR1), timed only with ``--metrics`` (the clock reads are the cost)."""
        return self.metrics.instrument(handler, timed=self.server is not None)

    def serving(
        self,
        rings: Callable[[], Sequence[Any]],
        fd_dir: str,
        tables: TableSizes | None,
        fast_counts: FastCounts | None = None,
    ) -> None:
        """A front-end is connected: expose its queues, the back-end's tables
        and the requests compiled fast operations answered."""
        self.metrics.add_gauges(ring_gauges(rings))
        if fast_counts is not None:
            self.metrics.add_fast_counts(fast_counts)
        self.metrics.fd_dir = fd_dir
        if tables is not None:
            self.metrics.add_gauges(table_gauges(tables.inodes, tables.handles))
        self.notifier.status("serving a vhost-user front-end")

    async def close(self) -> None:
        self.notifier.stopping("shutting down")
        self.notifier.close()
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGUSR1)
        if self.server is not None:
            await self.server.close()
