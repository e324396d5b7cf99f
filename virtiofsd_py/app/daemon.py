"""Process lifecycle: start up, serve one front-end, clean exit.

Wires the layers together: the ``Filesystem`` (``backends.build``, during
start-up) behind the FUSE ``Dispatcher``, the dispatcher behind the
``QueueRunner``, the runner under the vhost-user ``VhostUserBackend``, and
the backend behind the socket ``VhostUserConnection``.  Serves exactly one
front-end connection, as the Rust virtiofsd does, and exits when it ends or
on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from virtiofsd_py.app.options import Options
from virtiofsd_py.app.startup import Started, start_daemon
from virtiofsd_py.confine.sandbox import FORWARDED_SIGNALS, exit_like
from virtiofsd_py.fastops import first
from virtiofsd_py.fs.awaiting import AwaitingFS
from virtiofsd_py.fuse.asyncbridge import AsyncRequests
from virtiofsd_py.fuse.dispatcher import Dispatcher
from virtiofsd_py.migration.envelope import StateProvider
from virtiofsd_py.vhost.backend import BackendConfig, VhostUserBackend
from virtiofsd_py.vhost.connection import VhostUserConnection
from virtiofsd_py.virtio.runner import ChainHandler, QueueRunner
from virtiofsd_py.virtio.workers import CompiledQueueWorker

log = logging.getLogger("virtiofsd_py")


def run(opts: Options) -> int:
    """Start up (``startup.start_daemon``: before the event loop and its
    threads), then serve; raises ``StartupError`` when start-up fails."""
    import uvloop

    started = start_daemon(opts)
    if isinstance(started, int):  # the supervising parent: the child has ended
        return exit_like(started)
    try:
        return uvloop.run(serve(opts, started))
    finally:
        # The loop and its handlers are gone: a SIGTERM now must not turn the
        # exit under way into death by signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
        started.close()


async def serve(opts: Options, started: Started) -> int:
    loop = asyncio.get_running_loop()
    served, listener, hooks = started.backend, started.listener, started.hooks
    fs, state_dir = served.fs, started.state_dir
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await hooks.start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # see startup.py
        where = opts.socket_path or f"fd {opts.fd}"
        log.info("waiting for a vhost-user front-end on %s", where)
        hooks.listening(where)
        accept = asyncio.ensure_future(loop.sock_accept(listener.sock))
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({accept, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if accept not in done:
            accept.cancel()
            log.info("terminated before a front-end connected")
            return 0
        stopped.cancel()
        conn_sock, _ = accept.result()
        listener.sock.close()  # one front-end per daemon
        log.info("front-end connected")
        if served.asynchronous:  # coroutine methods: each request in a greenlet
            fs = AwaitingFS(fs)
        fast = served.fast_ops
        dispatcher = Dispatcher(
            fs, served.fuse, on_session=fast.session_changed if fast is not None else None
        )
        # Request queues each have a worker thread when the compiled worker
        # serves (unless --thread-pool-size): it releases the GIL around its
        # ring work and fast operations.  The pure worker cannot, so with the
        # pure core the loop serves every queue, sparing each request a GIL
        # handoff between threads; an async backend is always served there.
        queue_threads = (
            opts.thread_pool_size == 0
            and not served.asynchronous
            and CompiledQueueWorker is not None
        )
        # Compiled workers call the fast operations' C entry point without the
        # GIL; every other path offers each request to them in Python first.
        capsule = (
            fast.capsule()
            if fast is not None and queue_threads and CompiledQueueWorker is not None
            else None
        )
        handle: ChainHandler = dispatcher.handle
        if fast is not None and capsule is None:
            handle = first(fast, handle)
        handle = hooks.instrument(handle)
        runner = QueueRunner(
            loop,
            handle,
            thread_pool_size=opts.thread_pool_size,
            may_block=dispatcher.may_block,
            interrupt=fs.interrupt_waits,
            queue_threads=queue_threads,
            fast=capsule,
            submit=AsyncRequests(loop, handle).submit if served.asynchronous else None,
        )
        if served.migration is None:
            log.info("the %s backend cannot migrate: migration is not offered", opts.backend)
        backend = VhostUserBackend(
            runner,
            BackendConfig(tag=opts.tag),
            on_reset=dispatcher.reset,
            state=(
                StateProvider(
                    dispatcher,
                    served.migration,
                    opts.shared_dir or "",
                    *(state_dir or (None, None)),
                )
                if served.migration is not None
                else None
            ),
        )
        hooks.serving(lambda: backend.rings, served.fd_dir, served.tables, runner.fast_counts)
        conn = VhostUserConnection(conn_sock, backend)
        serving = asyncio.ensure_future(conn.serve())
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if serving not in done:
            log.info("terminating on signal")
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving  # its cleanup stops the rings and unmaps memory
        stopped.cancel()
        runner.close()
        fs.destroy()
        return 0
    finally:
        await hooks.close()
