"""What the in-memory backend stores: its configuration, its nodes and its open
handles (the operations on them are in the modules beside this one)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Final

from virtiofsd_py.fs.api import ROOT_ID, make_stat

#: Cookies of "." and ".."; real entries get cookies from 3 upwards.
DOT_COOKIE: Final = 1
DOTDOT_COOKIE: Final = 2
FIRST_COOKIE: Final = 3
NAME_MAX: Final = 255
BLOCK: Final = 4096


@dataclass(frozen=True, slots=True)
class MemoryConfig:
    """Limits and policy of one in-memory file system."""

    #: Bytes of file data (and xattr values) it may hold: ENOSPC beyond.
    capacity: int = 1 << 30
    #: Nodes it may hold: ENOSPC beyond.
    max_nodes: int = 1 << 20
    cache: str = "auto"
    readonly: bool = False
    #: Extended attributes (off: ENOSYS, like the passthrough's ``--xattr``).
    xattr: bool = True
    #: Owner and mode of the root directory.
    root_mode: int = 0o755
    root_uid: int = 0
    root_gid: int = 0


@dataclass(slots=True, eq=False)
class Node:
    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    #: Directory entries naming this node (a directory's own "." and its
    #: subdirectories' ".." are added in ``nlink``).
    links: int = 0
    lookups: int = 0
    opens: int = 0
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    #: name -> (cookie, node id), in cookie order (directories only).
    entries: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    next_cookie: int = FIRST_COOKIE
    subdirs: int = 0
    parent: int = ROOT_ID  # directories only: the one directory naming it
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def nlink(self) -> int:
        return self.links + 1 + self.subdirs if self.is_dir else self.links

    def size(self) -> int:
        if stat.S_ISREG(self.mode):
            return len(self.data)
        if stat.S_ISLNK(self.mode):
            return len(self.target)
        return BLOCK if self.is_dir else 0

    def stat(self) -> os.stat_result:
        size = self.size()
        blocks = (len(self.data) + BLOCK - 1) // BLOCK * (BLOCK // 512)
        return make_stat(
            mode=self.mode,
            ino=self.ino,
            size=size,
            nlink=self.nlink(),
            uid=self.uid,
            gid=self.gid,
            rdev=self.rdev,
            blksize=BLOCK,
            blocks=blocks,
            atime_ns=self.atime_ns,
            mtime_ns=self.mtime_ns,
            ctime_ns=self.ctime_ns,
        )

    def touch(self, now: int, *, data: bool) -> None:
        """ctime (and mtime for a content change) to ``now``."""
        self.ctime_ns = now
        if data:
            self.mtime_ns = now


@dataclass(slots=True)
class Handle:
    ino: int
    flags: int
    is_dir: bool
