"""pyfuse3's session functions, for file systems served without a pyfuse3 session.

A ``pyfuse3.Operations`` file system calls module functions of pyfuse3
(``pyfuse3.readdir_reply(token, ...)``, ``pyfuse3.invalidate_inode(...)``)
that in pyfuse3 itself write into libfuse's request buffers or its session
fd, and fail without a mounted session.  :func:`install` puts our own
functions of the same names and signatures into the ``pyfuse3`` module
namespace, where the file systems look them up at call time:

- ``readdir_reply``: hands the entry to the directory reply being built
  (``Collector``, made by the adapter's ``readdir``); returns False once the
  guest's buffer is full, as pyfuse3's does;
- ``invalidate_inode``, ``invalidate_entry``, ``invalidate_entry_async``,
  ``notify_store``: the guest cannot be told (no FUSE notifications over
  virtio-fs here), so they do nothing, never raise, and the guest relies on
  the timeouts the file system returned (logged at debug level);
- ``terminate``: pyfuse3 ends its main loop; here the daemon's life is its
  front-end's, so it is logged and ignored.

``pyfuse3.asyncio.enable()`` is also called: file systems that use
``pyfuse3.trio``-level helpers get asyncio's, on our loop.  A module that
did ``from pyfuse3 import readdir_reply`` before :func:`install` keeps the C
function; the adapter's module is imported before any file system's for
that reason (app/backends.py).
"""

from __future__ import annotations

import logging
from typing import Any

import greenlet
import pyfuse3
import pyfuse3.asyncio

from virtiofsd_py.fs.api import DirEntry, dirent_type
from virtiofsd_py.fs.pyfuse3_adapter.convert import checked, entry_of

log = logging.getLogger(__name__)


class Offer:
    """An entry a ``readdir_reply`` call offers, and the greenlet to answer."""

    __slots__ = ("caller", "entry")

    def __init__(self, entry: DirEntry, caller: greenlet.greenlet) -> None:
        self.entry = entry
        self.caller = caller


class Collector:
    """The ``token`` of one READDIR(PLUS): entries go to the request's greenlet.

    ``readdir_reply`` runs in the loop's greenlet (inside the file system's
    coroutine); it switches to the request greenlet, which packs the entry
    into the guest's buffer and switches back with whether it fitted.
    """

    __slots__ = ("listening", "plus", "request")

    def __init__(self, request: greenlet.greenlet, plus: bool) -> None:
        self.request = request
        self.plus = plus
        #: Whether the request waits for offers (False once its reply is done).
        self.listening = True

    def offer(self, name: bytes, attr: Any, next_id: int) -> bool:
        if not self.listening or self.request.dead or greenlet.getcurrent() is self.request:
            return False
        if not isinstance(name, bytes):
            raise TypeError(f"readdir_reply: name must be bytes, not {type(name).__name__}")
        attr = checked(attr, pyfuse3.EntryAttributes, "readdir_reply")
        de = DirEntry(
            attr.st_ino,
            next_id,
            dirent_type(attr.st_mode),
            name,
            entry_of(attr, "readdir_reply"),
        )
        fitted: bool = self.request.switch(Offer(de, greenlet.getcurrent()))
        return fitted


def readdir_reply(token: Any, name: bytes, attr: Any, next_id: int) -> bool:
    """``pyfuse3.readdir_reply`` for our collectors (see the module doc)."""
    if not isinstance(token, Collector):
        raise TypeError("readdir_reply: token is not the one readdir() was given")
    return token.offer(name, attr, next_id)


def invalidate_inode(inode: int, attr_only: bool = False) -> None:
    log.debug("pyfuse3.invalidate_inode(%d): the guest keeps its cache until timeouts", inode)


def invalidate_entry(inode_p: int, name: bytes, deleted: int = 0) -> None:
    log.debug("pyfuse3.invalidate_entry(%d, %r): not sent to the guest", inode_p, name)


def invalidate_entry_async(
    inode_p: int, name: bytes, deleted: int = 0, ignore_enoent: bool = False
) -> None:
    log.debug("pyfuse3.invalidate_entry_async(%d, %r): not sent to the guest", inode_p, name)


def notify_store(inode: int, offset: int, data: bytes) -> None:
    log.debug(
        "pyfuse3.notify_store(%d, %d, %d bytes): not sent to the guest", inode, offset, len(data)
    )


def terminate() -> None:
    log.info("pyfuse3.terminate() called by the file system: ignored (stop the daemon instead)")


_SHIMS = {
    "readdir_reply": readdir_reply,
    "invalidate_inode": invalidate_inode,
    "invalidate_entry": invalidate_entry,
    "invalidate_entry_async": invalidate_entry_async,
    "notify_store": notify_store,
    "terminate": terminate,
}


def install() -> None:
    """Put the functions above into the ``pyfuse3`` module; switch it to asyncio."""
    for name, fn in _SHIMS.items():
        setattr(pyfuse3, name, fn)
    pyfuse3.asyncio.enable()
