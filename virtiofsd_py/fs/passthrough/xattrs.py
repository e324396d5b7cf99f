"""Passthrough operations on extended attributes: GETXATTR, LISTXATTR,
SETXATTR and REMOVEXATTR (``--xattr``; names mapped by ``--xattrmap``,
POSIX ACLs only with ``--posix-acl``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import Final

from virtiofsd_py.fs.api import Context, fs_error
from virtiofsd_py.fs.passthrough.core import PassthroughCore

_ACL_NAMES: Final = (b"system.posix_acl_access", b"system.posix_acl_default")


class XattrOps(PassthroughCore):
    """GETXATTR, LISTXATTR, SETXATTR, REMOVEXATTR."""

    def _xattr_path(self, nodeid: int) -> contextlib.AbstractContextManager[str]:
        """``with``: the path xattr calls use for ``nodeid``, valid inside the block."""
        if not self.config.xattr:
            raise fs_error(errno.ENOSYS, "xattr support is off")
        node = self._node(nodeid)
        # f*xattr() refuse O_PATH fds; the /proc/self/fd/N magic link names
        # the inode itself (a symlink's own xattrs, a device node's without
        # opening it), so one path call serves every file type.
        return self._node_path(node)

    def _host_xattr_name(self, name: bytes) -> bytes:
        """The host name of a guest xattr name (--xattrmap; ACLs need --posix-acl)."""
        if not name or b"\0" in name:
            raise fs_error(errno.EINVAL, f"invalid xattr name {name!r}")
        if not self.config.posix_acl and name in _ACL_NAMES:
            raise fs_error(errno.ENOTSUP, "POSIX ACLs are off (--posix-acl)")
        xmap = self.config.xattrmap
        return xmap.to_host(name) if xmap is not None else name

    def getxattr(self, ctx: Context, nodeid: int, name: bytes) -> bytes:
        with self._xattr_path(nodeid) as path:
            try:
                host_name = self._host_xattr_name(name)
            except PermissionError:  # a "bad" name reads as absent (Rust virtiofsd)
                raise fs_error(errno.ENODATA, f"xattr {name!r}") from None
            return os.getxattr(path, host_name)

    def listxattr(self, ctx: Context, nodeid: int) -> bytes:
        with self._xattr_path(nodeid) as path:
            names = [os.fsencode(n) for n in os.listxattr(path)]
        if not self.config.posix_acl:
            names = [n for n in names if n not in _ACL_NAMES]
        xmap = self.config.xattrmap
        if xmap is not None:
            names = [g for g in map(xmap.to_guest, names) if g is not None]
        return b"".join(n + b"\0" for n in names)

    def setxattr(
        self, ctx: Context, nodeid: int, name: bytes, value: bytes, flags: int, acl_kill_sgid: bool
    ) -> None:
        with self._xattr_path(nodeid) as path:
            host_name = self._host_xattr_name(name)
            os.setxattr(path, host_name, value, flags)
            if acl_kill_sgid and host_name == b"system.posix_acl_access":
                # The guest decided the caller may not keep S_ISGID (not in the
                # group, no CAP_FSETID); as root the host kernel would keep it.
                mode = os.stat(path, follow_symlinks=False).st_mode
                if mode & stat.S_ISGID:
                    os.chmod(path, stat.S_IMODE(mode) & ~stat.S_ISGID)

    def removexattr(self, ctx: Context, nodeid: int, name: bytes) -> None:
        with self._xattr_path(nodeid) as path:
            os.removexattr(path, self._host_xattr_name(name))
