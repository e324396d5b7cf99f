"""In-memory extended attributes: GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR
in the user., trusted. and security. namespaces."""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Final

from virtiofsd_py.fs.api import Context, fs_error
from virtiofsd_py.fs.memory.core import MemoryCore
from virtiofsd_py.fs.memory.nodes import Node

_XATTR_NAME_MAX: Final = 255
_XATTR_SIZE_MAX: Final = 65536
#: Namespaces stored as given; system.* (POSIX ACLs) is not supported.
_XATTR_PREFIXES: Final = (b"user.", b"trusted.", b"security.")


class XattrOps(MemoryCore):
    """GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR."""

    def _xattr_node(self, nodeid: int, name: bytes) -> Node:
        self._check_xattr()
        node = self._node(nodeid)
        if not name.startswith(_XATTR_PREFIXES):
            raise fs_error(errno.EOPNOTSUPP, f"xattr namespace of {name!r}")
        if len(name) > _XATTR_NAME_MAX:
            raise fs_error(errno.ERANGE, "xattr name too long")
        return node

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        with self._lock:
            node = self._xattr_node(nodeid, name)
            value = node.xattrs.get(name)
            if value is None:
                raise fs_error(errno.ENODATA, repr(name))
            return value

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        with self._lock:
            self._check_xattr()
            return b"".join(n + b"\0" for n in self._node(nodeid).xattrs)

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        with self._lock:
            self._check_write()
            node = self._xattr_node(nodeid, name)
            if name.startswith(b"user.") and not (stat.S_ISREG(node.mode) or node.is_dir):
                # xattr(7): user attributes only on regular files and directories.
                raise fs_error(errno.EPERM, "user xattr on a special file")
            if len(value) > _XATTR_SIZE_MAX:
                raise fs_error(errno.E2BIG, "xattr value too large")
            old = node.xattrs.get(name)
            if flags & os.XATTR_CREATE and old is not None:
                raise fs_error(errno.EEXIST, repr(name))
            if flags & os.XATTR_REPLACE and old is None:
                raise fs_error(errno.ENODATA, repr(name))
            self._charge(len(value) - (len(old) if old is not None else 0))
            node.xattrs[name] = bytes(value)
            node.touch(time.time_ns(), data=False)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        with self._lock:
            self._check_write()
            node = self._xattr_node(nodeid, name)
            old = node.xattrs.pop(name, None)
            if old is None:
                raise fs_error(errno.ENODATA, repr(name))
            self._used -= len(old)
            node.touch(time.time_ns(), data=False)
