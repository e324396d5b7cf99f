"""Moving the device state through the pipe QEMU hands over (SET_DEVICE_STATE_FD).

vhost-user.rst, "Migrating back-end state": the writing end writes all of the
state and closes; the reading end reads until EOF.  QEMU reads (SAVE) or
writes (LOAD) only after our reply to SET_DEVICE_STATE_FD, in chunks of up to
1 MiB, so both directions stream without blocking the event loop: a state
bigger than the pipe buffer would otherwise deadlock the daemon.
"""

from __future__ import annotations

import asyncio
import os


class TransferError(Exception):
    pass


async def _wait(loop: asyncio.AbstractEventLoop, fd: int, writable: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the non-blocking-capable ``fd`` (closed by the caller)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view[: 1 << 20])
        except (BlockingIOError, InterruptedError):
            await _wait(loop, fd, writable=True)
            continue
        except OSError as e:
            done = len(data) - len(view)
            raise TransferError(f"writing the state failed after {done} bytes: {e}") from e
        view = view[n:]


async def read_all(fd: int, limit: int) -> bytes:
    """Read until EOF; refuse more than ``limit`` bytes (a hostile or broken peer)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except (BlockingIOError, InterruptedError):
            await _wait(loop, fd, writable=False)
            continue
        except OSError as e:
            raise TransferError(f"reading the state failed after {total} bytes: {e}") from e
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise TransferError(f"state larger than the limit of {limit} bytes")
        chunks.append(chunk)
