"""``Pyfuse3FS``: any ``pyfuse3.Operations`` instance as an async ``Filesystem``.

Every opcode pyfuse3 defines maps to the coroutine pyfuse3 would call for
it, with the arguments and types pyfuse3 passes (its ``handlers.pxi`` is the
contract: ``lookup(parent, name, ctx)``, ``read(fh, off, size)`` and so on).
``FUSEError(errno)`` becomes ``OSError(errno)``; a result of the wrong type
a ``TypeError`` naming the operation (logged by the dispatcher, answered
EIO).  What pyfuse3 does and libfuse would do around the calls is done
here too:

- lookup counts: a successful lookup, mknod, mkdir, symlink, link, create
  and every entry ``readdir_reply`` accepted add one (pyfuse3's contract is
  the seam's); ``forget`` passes the kernel's counts on, except the count of
  an entry offered by ``readdir_reply`` that did not fit (pyfuse3 never
  counted it);
- READDIR: pyfuse3 serves READDIRPLUS only; a plain READDIR (``--cache
  never`` turns READDIRPLUS off) forgets the entries it accepted once the
  listing is done;
- ``setxattr`` with XATTR_CREATE/XATTR_REPLACE asks ``getxattr`` first, as
  pyfuse3 does; ``access`` returning False is EACCES; ``mkdir``'s mode is
  forced to a directory's;
- ``init()`` at FUSE_INIT; pyfuse3 defines no ``destroy`` (after unmount the
  file system must treat every lookup count as zero), so DESTROY only drops
  the adapter's own bookkeeping;
- everything pyfuse3 does not define (locks, fallocate, lseek,
  copy_file_range, ioctl, statx, tmpfile, syncfs) is ENOSYS, as a libfuse
  mount of the file system answers, and the guest falls back; locks are not
  offered at all, so the guest kernel keeps them local (app/backends.py).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Awaitable, Coroutine, Iterator, Sequence
from typing import Any, ClassVar, TypeVar

import greenlet
import pyfuse3

from virtiofsd_py.fs.api import (
    AttrReply,
    Context,
    DirEntry,
    Entry,
    Filesystem,
    Opened,
    SessionInfo,
    SetAttr,
)
from virtiofsd_py.fs.awaiting import await_
from virtiofsd_py.fs.pyfuse3_adapter import shims
from virtiofsd_py.fs.pyfuse3_adapter.convert import (
    AdapterContext,
    attr_of,
    checked,
    entry_of,
    opened_of,
    setattr_args,
    statvfs_of,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_XATTR_FLAGS = os.XATTR_CREATE | os.XATTR_REPLACE


async def _call(op: str, aw: Awaitable[T]) -> T:
    """Await a file system coroutine; ``FUSEError`` -> ``OSError``."""
    try:
        return await aw
    except pyfuse3.FUSEError as e:
        raise OSError(e.errno, f"{op}: {os.strerror(e.errno)}") from None


class Pyfuse3FS(Filesystem):
    """Serves ``ops`` (a ``pyfuse3.Operations``); see the module doc."""

    asynchronous: ClassVar[bool] = True

    def __init__(self, ops: pyfuse3.Operations) -> None:
        shims.install()
        self.ops = ops
        #: Entries offered by readdir_reply and not answered yet, by node id.
        self._offered: dict[int, int] = {}

    # -- session ---------------------------------------------------------
    def init(self, session: SessionInfo) -> None:
        self.ops.init()

    def destroy(self) -> None:
        self._offered.clear()

    # -- names -----------------------------------------------------------
    async def lookup(self, ctx: Context, parent: int, name: bytes) -> Entry:  # type: ignore[override]
        a = await _call("lookup", self.ops.lookup(parent, name, AdapterContext(ctx)))
        return entry_of(a, "lookup")

    def forget(self, nodeid: int, nlookup: int) -> Coroutine[Any, Any, None] | None:  # type: ignore[override]
        n = self._unoffered(nodeid, nlookup)
        return self._forget([(nodeid, n)]) if n else None

    def batch_forget(self, items: Sequence[tuple[int, int]]) -> Coroutine[Any, Any, None] | None:  # type: ignore[override]
        kept = [(i, n) for i, n in ((i, self._unoffered(i, n)) for i, n in items) if n]
        return self._forget(kept) if kept else None

    def _unoffered(self, nodeid: int, nlookup: int) -> int:
        """``nlookup`` less the counts of unanswered offers of ``nodeid`` (never counted)."""
        if nodeid == 0:
            return 0  # a negative entry: no node
        pending = self._offered.get(nodeid, 0)
        if not pending:
            return nlookup
        taken = min(pending, nlookup)
        self._offer_done(nodeid, taken)
        return nlookup - taken

    async def _forget(self, items: list[tuple[int, int]]) -> None:
        try:
            await self.ops.forget(items)
        except Exception:  # pyfuse3: forget must not raise; FORGET has no reply
            log.exception("pyfuse3 forget() raised")

    # -- attributes ------------------------------------------------------
    async def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:  # type: ignore[override]
        a = await _call("getattr", self.ops.getattr(nodeid, AdapterContext(ctx)))
        return attr_of(a, "getattr")

    async def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:  # type: ignore[override]
        a, fields = setattr_args(nodeid, attr)
        got = await _call(
            "setattr",
            self.ops.setattr(nodeid, a, fields, attr.fh, AdapterContext(ctx)),
        )
        return attr_of(got, "setattr")

    async def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:  # type: ignore[override]
        return statvfs_of(await _call("statfs", self.ops.statfs(AdapterContext(ctx))))

    async def readlink(self, ctx: Context, nodeid: int) -> bytes:  # type: ignore[override]
        target = await _call("readlink", self.ops.readlink(nodeid, AdapterContext(ctx)))
        return bytes(checked(target, bytes, "readlink"))

    async def access(self, ctx: Context, nodeid: int, mask: int) -> None:  # type: ignore[override]
        if not await _call("access", self.ops.access(nodeid, mask, AdapterContext(ctx))):
            raise OSError(errno.EACCES, "access: denied by the file system")

    # -- files -----------------------------------------------------------
    async def open(  # type: ignore[override]
        self, ctx: Context, nodeid: int, flags: int, *, kill_suidgid: bool = False
    ) -> Opened:
        fi = await _call("open", self.ops.open(nodeid, flags, AdapterContext(ctx)))
        return opened_of(fi, "open")

    async def read(  # type: ignore[override]
        self, ctx: Context, nodeid: int, fh: int, offset: int, size: int, bufs: list[memoryview]
    ) -> int:
        data = await _call("read", self.ops.read(fh, offset, size))
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"pyfuse3 read() returned {type(data).__name__}, not bytes")
        view = memoryview(data).cast("B")
        if len(view) > size:
            raise RuntimeError(f"pyfuse3 read() returned {len(view)} bytes for {size} asked")
        pos = 0
        for buf in bufs:
            if pos >= len(view):
                break
            n = min(len(buf), len(view) - pos)
            buf[:n] = view[pos : pos + n]
            pos += n
        return pos

    async def write(  # type: ignore[override]
        self,
        ctx: Context,
        nodeid: int,
        fh: int,
        offset: int,
        bufs: list[memoryview],
        kill_suidgid: bool,
    ) -> int:
        data = b"".join(bufs)
        n = await _call("write", self.ops.write(fh, offset, data))
        return int(checked(n, int, "write"))

    async def flush(self, ctx: Context, nodeid: int, fh: int, lock_owner: int) -> None:  # type: ignore[override]
        await _call("flush", self.ops.flush(fh))

    async def release(  # type: ignore[override]
        self, ctx: Context, nodeid: int, fh: int, flags: int, *, lock_owner: int | None = None
    ) -> None:
        await _call("release", self.ops.release(fh))

    async def fsync(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:  # type: ignore[override]
        await _call("fsync", self.ops.fsync(fh, datasync))

    # -- directories -----------------------------------------------------
    async def opendir(self, ctx: Context, nodeid: int, flags: int) -> Opened:  # type: ignore[override]
        fh = await _call("opendir", self.ops.opendir(nodeid, AdapterContext(ctx)))
        return Opened(int(checked(fh, int, "opendir")))

    def readdir(
        self, ctx: Context, nodeid: int, fh: int, offset: int, plus: bool
    ) -> Iterator[DirEntry]:
        return self._entries(fh, offset, plus)

    def _entries(self, fh: int, offset: int, plus: bool) -> Iterator[DirEntry]:
        """Runs ``ops.readdir``; yields each entry ``readdir_reply`` offers.

        Runs in the request greenlet.  The dispatcher asking for the next entry
        means the last one fitted (``readdir_reply`` returns True); closing
        the iterator means it did not (False), and the coroutine is left to
        finish.  See shims.Collector for the switching.
        """
        token = shims.Collector(greenlet.getcurrent(), plus)
        accepted: list[int] = []
        value: Any = await_(_call("readdir", self.ops.readdir(fh, offset, token)))  # type: ignore[arg-type]
        try:
            while isinstance(value, shims.Offer):
                de = value.entry
                self._offered[de.ino] = self._offered.get(de.ino, 0) + 1
                try:
                    yield de
                except GeneratorExit:
                    self._offer_done(de.ino, 1)
                    self._refuse_rest(value)
                    raise
                self._offer_done(de.ino, 1)
                accepted.append(de.ino)
                value = value.caller.switch(True)
        finally:
            token.listening = False
            if not plus and accepted:  # plain READDIR hands out no lookups
                await_(self._forget([(i, 1) for i in accepted if i]))

    @staticmethod
    def _refuse_rest(offer: shims.Offer) -> None:
        """Answer False to ``offer`` (and to any further one) until the coroutine ends."""
        value: Any = offer
        try:
            while isinstance(value, shims.Offer):
                value = value.caller.switch(False)
        except OSError as e:  # the entries packed so far are still a good reply
            log.debug("pyfuse3 readdir() failed after a full buffer: %s", e)

    def _offer_done(self, nodeid: int, n: int) -> None:
        left = self._offered.get(nodeid, 0) - n
        if left > 0:
            self._offered[nodeid] = left
        else:
            self._offered.pop(nodeid, None)

    async def releasedir(self, ctx: Context, nodeid: int, fh: int, flags: int) -> None:  # type: ignore[override]
        await _call("releasedir", self.ops.releasedir(fh))

    async def fsyncdir(self, ctx: Context, nodeid: int, fh: int, datasync: bool) -> None:  # type: ignore[override]
        await _call("fsyncdir", self.ops.fsyncdir(fh, datasync))

    # -- extended attributes --------------------------------------------
    async def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:  # type: ignore[override]
        value = await _call("getxattr", self.ops.getxattr(nodeid, name, AdapterContext(ctx)))
        return bytes(checked(value, bytes, "getxattr"))

    async def listxattr(self, ctx: Context, nodeid: int) -> bytes:  # type: ignore[override]
        names = await _call("listxattr", self.ops.listxattr(nodeid, AdapterContext(ctx)))
        return b"".join(bytes(checked(n, bytes, "listxattr")) + b"\0" for n in names)

    async def setxattr(  # type: ignore[override]
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        if flags & ~_XATTR_FLAGS:
            raise OSError(errno.EINVAL, f"setxattr: unknown flags {flags:#x}")
        rc = AdapterContext(ctx)
        if flags & (os.XATTR_CREATE | os.XATTR_REPLACE):
            try:
                await _call("getxattr", self.ops.getxattr(nodeid, name, rc))
            except OSError as e:
                if e.errno != pyfuse3.ENOATTR or flags & os.XATTR_REPLACE:
                    raise
            else:
                if flags & os.XATTR_CREATE:
                    raise OSError(errno.EEXIST, "setxattr: attribute exists")
        await _call("setxattr", self.ops.setxattr(nodeid, name, value, rc))

    async def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:  # type: ignore[override]
        await _call("removexattr", self.ops.removexattr(nodeid, name, AdapterContext(ctx)))

    # -- changing the tree ----------------------------------------------------
    async def create(  # type: ignore[override]
        self,
        ctx: Context,
        parent: int,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        *,
        kill_suidgid: bool = False,
    ) -> tuple[Entry, Opened]:
        got = await _call(
            "create",
            self.ops.create(parent, name, mode, flags, AdapterContext(ctx)),
        )
        if not isinstance(got, tuple) or len(got) != 2:
            raise TypeError(f"pyfuse3 create() returned {type(got).__name__}, not (fi, attr)")
        return entry_of(got[1], "create"), opened_of(got[0], "create")

    async def mknod(  # type: ignore[override]
        self, ctx: Context, parent: int, name: bytes, mode: int, rdev: int, umask: int
    ) -> Entry:
        a = await _call("mknod", self.ops.mknod(parent, name, mode, rdev, AdapterContext(ctx)))
        return entry_of(a, "mknod")

    async def mkdir(  # type: ignore[override]
        self, ctx: Context, parent: int, name: bytes, mode: int, umask: int
    ) -> Entry:
        mode = (mode & ~stat.S_IFMT(mode)) | stat.S_IFDIR
        a = await _call("mkdir", self.ops.mkdir(parent, name, mode, AdapterContext(ctx)))
        return entry_of(a, "mkdir")

    async def symlink(self, ctx: Context, parent: int, name: bytes, target: bytes) -> Entry:  # type: ignore[override]
        a = await _call("symlink", self.ops.symlink(parent, name, target, AdapterContext(ctx)))
        return entry_of(a, "symlink")

    async def link(self, ctx: Context, nodeid: int, newparent: int, newname: bytes) -> Entry:  # type: ignore[override]
        a = await _call("link", self.ops.link(nodeid, newparent, newname, AdapterContext(ctx)))
        return entry_of(a, "link")

    async def unlink(self, ctx: Context, parent: int, name: bytes) -> None:  # type: ignore[override]
        await _call("unlink", self.ops.unlink(parent, name, AdapterContext(ctx)))

    async def rmdir(self, ctx: Context, parent: int, name: bytes) -> None:  # type: ignore[override]
        await _call("rmdir", self.ops.rmdir(parent, name, AdapterContext(ctx)))

    async def rename(  # type: ignore[override]
        self, ctx: Context, parent: int, name: bytes, newparent: int, newname: bytes, flags: int
    ) -> None:
        await _call(
            "rename",
            self.ops.rename(parent, name, newparent, newname, flags, AdapterContext(ctx)),
        )
