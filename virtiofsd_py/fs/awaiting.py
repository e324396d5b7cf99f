"""Serving an async backend through the synchronous seam: a greenlet per request.

A backend may implement ``Filesystem`` methods as coroutines (``async def``).
The FUSE dispatcher stays synchronous: it decodes, calls a method and
encodes, whatever kind of backend it serves.  What bridges the two is a
greenlet: the daemon runs each request of an async backend in its own
:class:`RequestGreenlet` (``fuse/asyncbridge.py``); when a method hands back
an awaitable, :func:`await_` switches from the request to the event loop's
greenlet, which awaits it in an asyncio task and switches back with the
result (or throws the exception in).  The dispatcher's code is thus the
same for sync and async backends, and a request that waits costs a task,
not a thread.

:class:`AwaitingFS` is the facade the dispatcher is given: every method of
the wrapped backend, with awaitables awaited this way, async generators from
``readdir`` turned into plain iterators.  A call made outside any request
(``Dispatcher.reset`` on a device reset) cannot wait: for the operations
without a reply (``forget``, ``destroy``) the awaitable is scheduled on the
loop instead; any other raises ``RuntimeError``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

import greenlet

from virtiofsd_py.fs.api import DirEntry, Filesystem

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Methods whose awaitable may run detached when no request waits for it.
_DETACHABLE: Final = frozenset({"forget", "batch_forget", "destroy", "interrupt_waits"})


class Await:
    """What a request greenlet hands its parent: "await this, then switch back"."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


class RequestGreenlet(greenlet.greenlet):  # type: ignore[misc]
    """The greenlet one request of an async backend runs in.

    Its parent is the greenlet of the event loop (where it was created); the
    parent receives :class:`Await` objects and answers with ``switch(result)``
    or ``throw(exc)``.
    """

    #: The FUSE ``unique`` of the request (for FUSE_INTERRUPT), 0 if unknown.
    unique: int = 0


def in_request() -> bool:
    """Whether the caller runs inside a request greenlet (so :func:`await_` may wait)."""
    return isinstance(greenlet.getcurrent(), RequestGreenlet)


def await_(awaitable: Awaitable[T]) -> T:
    """Wait for ``awaitable`` from synchronous code running in a request greenlet."""
    current = greenlet.getcurrent()
    if not isinstance(current, RequestGreenlet):
        close = getattr(awaitable, "close", None)
        if close is not None:
            close()  # a coroutine never awaited: no "never awaited" warning
        raise RuntimeError("an async backend was called outside a request")
    result: T = current.parent.switch(Await(awaitable))
    return result


def is_async(fs: object) -> bool:
    """Whether ``fs`` has coroutine methods (or says so: ``asynchronous = True``)."""
    if getattr(fs, "asynchronous", False):
        return True
    cls = type(fs)
    for name in dir(Filesystem):
        if name.startswith("_"):
            continue
        fn = getattr(cls, name, None)
        if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
            return True
    return False


def _schedule(awaitable: Awaitable[Any], what: str) -> None:
    """Run ``awaitable`` on the loop, detached; its failure is logged."""

    async def run() -> None:
        try:
            await awaitable
        except Exception:
            log.exception("async backend: %s failed", what)

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run())  # no loop at all (at exit): run it to completion now
        return
    task = loop.create_task(run())
    _detached.add(task)
    task.add_done_callback(_detached.discard)


_detached: set[asyncio.Task[None]] = set()


def _sync_iter(agen: AsyncIterator[DirEntry]) -> Iterator[DirEntry]:
    """An async iterator of entries as a plain one (each step awaited in turn)."""
    try:
        while True:
            try:
                yield await_(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(agen, "aclose", None)
        if aclose is not None:
            await_(aclose())


class AwaitingFS(Filesystem):
    """A ``Filesystem`` whose backend's awaitables are awaited (see the module doc).

    The dispatcher calls this facade; it calls the backend and, when the
    result is awaitable, waits for it from the request greenlet.  One
    wrapper per public method of the backend, made here and kept on the
    instance (where it shadows the class's ENOSYS defaults).
    """

    def __init__(self, inner: Filesystem) -> None:
        self.inner = inner
        self.readonly = inner.readonly  # type: ignore[misc]
        for name in dir(inner):
            if name.startswith("_") or name in ("inner", "readonly"):
                continue
            target = getattr(inner, name)
            if callable(target) and not isinstance(target, type):
                setattr(self, name, _wrap(name, target))


def _wrap(name: str, target: Callable[..., Any]) -> Callable[..., Any]:
    detachable = name in _DETACHABLE

    def call(*args: Any, **kwargs: Any) -> Any:
        result = target(*args, **kwargs)
        if inspect.isawaitable(result):
            if detachable and not in_request():
                _schedule(result, name)
                return None
            return await_(result)
        if hasattr(result, "__anext__"):
            return _sync_iter(result)
        return result

    call.__name__ = name
    return call
