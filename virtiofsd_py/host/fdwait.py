"""Wait on the event loop until a non-blocking fd is readable or writable."""

from __future__ import annotations

import asyncio


async def wait_fd(fd: int, *, writable: bool) -> None:
    """Return once ``fd`` is ready; the loop's watch is removed again either way."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if writable else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if writable else loop.remove_reader)(fd)
