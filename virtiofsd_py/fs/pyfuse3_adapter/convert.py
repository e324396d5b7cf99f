"""pyfuse3's types <-> the seam's (fs/api.py), one function per direction.

pyfuse3's ``RequestContext`` and ``SetattrFields`` are extension types with
read-only fields that only its C session fills; the subclasses here answer
the same attribute names from our request, so ``isinstance`` checks in a
file system still hold.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pyfuse3

from virtiofsd_py.fs.api import AttrReply, Context, Entry, Now, Opened, SetAttr, make_stat


class AdapterContext(pyfuse3.RequestContext):
    """A ``pyfuse3.RequestContext`` made from our ``Context``."""

    __slots__ = ("_gid", "_pid", "_uid", "_umask")

    def __init__(self, ctx: Context) -> None:
        self._uid = ctx.uid
        self._gid = ctx.gid
        self._pid = ctx.pid
        self._umask = ctx.umask or 0

    uid = property(lambda self: self._uid)
    gid = property(lambda self: self._gid)
    pid = property(lambda self: self._pid)
    umask = property(lambda self: self._umask)


class AdapterSetattrFields(pyfuse3.SetattrFields):
    """A ``pyfuse3.SetattrFields`` saying which fields of our ``SetAttr`` are set."""

    __slots__ = ("_set",)

    def __init__(self, attr: SetAttr) -> None:
        self._set = {
            "atime": attr.atime_ns is not None,
            "mtime": attr.mtime_ns is not None,
            "ctime": attr.ctime_ns is not None,
            "mode": attr.mode is not None,
            "uid": attr.uid is not None,
            "gid": attr.gid is not None,
            "size": attr.size is not None,
        }

    update_atime = property(lambda self: self._set["atime"])
    update_mtime = property(lambda self: self._set["mtime"])
    update_ctime = property(lambda self: self._set["ctime"])
    update_mode = property(lambda self: self._set["mode"])
    update_uid = property(lambda self: self._set["uid"])
    update_gid = property(lambda self: self._set["gid"])
    update_size = property(lambda self: self._set["size"])


def checked(value: Any, kind: type[Any], op: str) -> Any:
    """``value`` if it is a ``kind``, else a TypeError naming the operation."""
    if not isinstance(value, kind):
        raise TypeError(f"pyfuse3 {op}() returned {type(value).__name__}, not {kind.__name__}")
    return value


def stat_of(a: pyfuse3.EntryAttributes) -> os.stat_result:
    return make_stat(
        mode=a.st_mode,
        ino=a.st_ino,
        size=a.st_size,
        nlink=a.st_nlink,
        uid=a.st_uid,
        gid=a.st_gid,
        rdev=a.st_rdev,
        blksize=a.st_blksize,
        blocks=a.st_blocks,
        atime_ns=a.st_atime_ns,
        mtime_ns=a.st_mtime_ns,
        ctime_ns=a.st_ctime_ns,
    )


def entry_of(a: Any, op: str) -> Entry:
    """The ``Entry`` of an ``EntryAttributes`` (st_ino 0: a negative entry, cached)."""
    a = checked(a, pyfuse3.EntryAttributes, op)
    return Entry(a.st_ino, a.generation, stat_of(a), a.entry_timeout, a.attr_timeout)


def attr_of(a: Any, op: str) -> AttrReply:
    a = checked(a, pyfuse3.EntryAttributes, op)
    return AttrReply(stat_of(a), a.attr_timeout)


def opened_of(fi: Any, op: str) -> Opened:
    fi = checked(fi, pyfuse3.FileInfo, op)
    return Opened(fi.fh, direct_io=bool(fi.direct_io), keep_cache=bool(fi.keep_cache))


def statvfs_of(s: Any) -> os.statvfs_result:
    s = checked(s, pyfuse3.StatvfsData, "statfs")
    return os.statvfs_result(
        (s.f_bsize, s.f_frsize, s.f_blocks, s.f_bfree, s.f_bavail,
         s.f_files, s.f_ffree, s.f_favail, 0, s.f_namemax)
    )  # fmt: skip


def _ns(value: int | Now) -> int:
    return time.time_ns() if isinstance(value, Now) else value


def setattr_args(
    nodeid: int, attr: SetAttr
) -> tuple[pyfuse3.EntryAttributes, AdapterSetattrFields]:
    """The (attributes, fields) pair pyfuse3's ``setattr`` takes; *_NOW is the current time."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = nodeid
    if attr.mode is not None:
        a.st_mode = attr.mode
    if attr.uid is not None:
        a.st_uid = attr.uid
    if attr.gid is not None:
        a.st_gid = attr.gid
    if attr.size is not None:
        a.st_size = attr.size
    if attr.atime_ns is not None:
        a.st_atime_ns = _ns(attr.atime_ns)
    if attr.mtime_ns is not None:
        a.st_mtime_ns = _ns(attr.mtime_ns)
    if attr.ctime_ns is not None:
        a.st_ctime_ns = attr.ctime_ns
    return a, AdapterSetattrFields(attr)
