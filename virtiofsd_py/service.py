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

from virtiofsd_py import sdnotify
from virtiofsd_py.metrics import Handler, Metrics, ring_gauges, table_gauges
from virtiofsd_py.metrics_server import MetricsServer, parse_address
from virtiofsd_py.options import Options

log = logging.getLogger("virtiofsd_py")


class ServiceHooks:
    """Created once per daemon; ``start`` before listening, ``close`` at exit."""

    def __init__(self, opts: Options, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.metrics = Metrics()
        self.server = (
            MetricsServer(self.metrics, parse_address(opts.metrics))
            if opts.metrics is not None
            else None
        )

    async def start(self) -> None:
        """Serve ``--metrics`` (if asked) and dump the metrics on SIGUSR1."""
        if self.server is not None:
            try:
                await self.server.start()
            except OSError as e:
                from virtiofsd_py.daemon import StartupError

                raise StartupError(f"--metrics {self.server.address}: {e}") from None
        self._loop.add_signal_handler(signal.SIGUSR1, self.dump)

    def dump(self) -> None:
        for line in self.metrics.summary_lines():
            log.info("%s", line)

    def listening(self, where: str) -> None:
        """The socket accepts connections: startup is over (systemd Type=notify)."""
        sdnotify.ready(f"waiting for a vhost-user front-end on {where}")

    def instrument(self, handler: Handler) -> Handler:
        """The request handler the queue runner should call (counted and timed)."""
        return self.metrics.instrument(handler)

    def serving(self, rings: Callable[[], Sequence[Any]], fs: Any) -> None:
        """A front-end is connected: expose its queues and the filesystem's tables."""
        self.metrics.add_gauges(ring_gauges(rings))
        inodes, handles = getattr(fs, "inodes", None), getattr(fs, "handles", None)
        if inodes is not None and handles is not None:
            self.metrics.add_gauges(table_gauges(inodes.__len__, handles.__len__))
        sdnotify.status("serving a vhost-user front-end")

    async def close(self) -> None:
        sdnotify.stopping("shutting down")
        self._loop.remove_signal_handler(signal.SIGUSR1)
        if self.server is not None:
            await self.server.close()
