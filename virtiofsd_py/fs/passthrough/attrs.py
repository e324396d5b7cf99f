"""Passthrough operations on attributes: GETATTR, STATX, STATFS, READLINK,
ACCESS and SETATTR.

Attributes are read from the node's O_PATH fd (or the guest's open handle)
and shown to the guest with uid/gid translated (``_guest_stat``).  SETATTR
never opens a node (CVE-2020-35517): see ``setattr``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from virtiofsd_py.fs.api import NOW, AttrReply, Context, SetAttr, StatxReply, fs_error
from virtiofsd_py.fs.passthrough.core import PassthroughCore
from virtiofsd_py.fs.passthrough.creds import CAP_FSETID, DropCap
from virtiofsd_py.fs.passthrough.inodes import InodeData, NodeFd
from virtiofsd_py.fs.passthrough.open_files import HandleData
from virtiofsd_py.host import syscalls


class AttrOps(PassthroughCore):
    """GETATTR, STATX, STATFS, READLINK, ACCESS, SETATTR."""

    def getattr(self, ctx: Context, nodeid: int, fh: int | None) -> AttrReply:
        if fh is not None:
            h = self.handles.get(fh, nodeid)
            return AttrReply(self._guest_stat(os.stat(h.fd)), self._attr_timeout)
        node = self._node(nodeid)
        with node.opened() as fd:
            st = os.stat(fd)
        return AttrReply(self._guest_stat(st), self._attr_timeout)

    def statx(self, ctx: Context, nodeid: int, fh: int | None, flags: int, mask: int) -> StatxReply:
        if fh is not None:
            h = self.handles.get(fh, nodeid)
            fields = syscalls.statx_fields(h.fd, flags, mask)
        else:
            node = self._node(nodeid)
            with node.opened() as nfd:
                fields = syscalls.statx_fields(nfd, flags, mask)
        if self._uid_map is not None:
            fields["uid"] = self._uid_map.to_guest(fields["uid"])
        if self._gid_map is not None:
            fields["gid"] = self._gid_map.to_guest(fields["gid"])
        return StatxReply(fields, self._attr_timeout)

    def statfs(self, ctx: Context, nodeid: int) -> os.statvfs_result:
        node = self._node(nodeid)
        with node.opened() as fd:
            return os.fstatvfs(fd)

    def readlink(self, ctx: Context, nodeid: int) -> bytes:
        node = self._node(nodeid)
        if not stat.S_ISLNK(node.mode):
            raise fs_error(errno.EINVAL, "not a symlink")
        with node.opened() as fd:
            return os.readlink(b"", dir_fd=fd)

    def access(self, ctx: Context, nodeid: int, mask: int) -> None:
        """Permission check of the mode bits for ``ctx`` as the host kernel does it.

        POSIX classes (owner, else group incl. supplementary groups, else
        other); uid 0 passes reads and writes, and executes when any x bit is
        set or the node is a directory.  ACLs are not consulted.  (Issue 3:
        run the check under the request's effective ids instead.)
        """
        node = self._node(nodeid)
        with node.opened() as fd:
            st = os.stat(fd)
        want = mask & (os.R_OK | os.W_OK | os.X_OK)
        if want == os.F_OK:
            return
        mode = st.st_mode
        if ctx.uid == 0:
            if want & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
                raise fs_error(errno.EACCES, "access")
            return
        if st.st_uid == ctx.uid:
            bits = (mode >> 6) & 7
        elif st.st_gid == ctx.gid or st.st_gid in ctx.groups:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if want & ~bits:
            raise fs_error(errno.EACCES, "access")

    def setattr(self, ctx: Context, nodeid: int, attr: SetAttr) -> AttrReply:
        """SETATTR: through the open handle when the guest names one, else the inode.

        Without a handle nothing is ever opened: chmod/truncate/utimensat go
        through the /proc/self/fd magic link (which acts on a symlink itself),
        chown through fchownat(AT_EMPTY_PATH) -- so a device node or fifo is
        never opened (CVE-2020-35517).  truncate(2) refuses non-regular files.
        """
        node = self._node(nodeid)
        fd = -1
        h: HandleData | None = None
        if attr.fh is not None:
            h = self.handles.get(attr.fh, nodeid)
            fd = h.fd
        # The node's own fd only where the open file cannot serve: a handle
        # node is then opened for this request only.
        need_node = fd < 0 or attr.uid is not None or attr.gid is not None
        with node.opened() if need_node else NodeFd(-1, False) as nfd:
            st = self._setattr(node, nfd, fd, attr)
        del h
        return AttrReply(self._guest_stat(st), self._attr_timeout)

    def _setattr(self, node: InodeData, nfd: int, fd: int, attr: SetAttr) -> os.stat_result:
        """SETATTR's changes through the open file ``fd`` if >= 0, else the node's ``nfd``."""
        path = self._proc_prefix + str(nfd)
        kill = attr.kill_suidgid and self.config.killpriv_v2
        chown = attr.uid is not None or attr.gid is not None
        if (chown or attr.size is not None) and stat.S_ISREG(node.mode):
            self._drop_capability(fd if fd >= 0 else path)
        if attr.mode is not None:
            if fd >= 0:
                os.fchmod(fd, stat.S_IMODE(attr.mode))
            else:
                os.chmod(path, stat.S_IMODE(attr.mode))
        if chown:
            uid = self._host_uid(attr.uid) if attr.uid is not None else -1
            gid = self._host_gid(attr.gid) if attr.gid is not None else -1
            syscalls.fchown_empty(nfd, uid, gid)
        if attr.size is not None:
            if not stat.S_ISREG(node.mode):
                code = errno.EISDIR if stat.S_ISDIR(node.mode) else errno.EINVAL
                raise fs_error(code, "truncate of a file that is not regular")
            with DropCap(CAP_FSETID) if kill else contextlib.nullcontext():
                if fd >= 0:
                    os.ftruncate(fd, attr.size)
                else:
                    os.truncate(path, attr.size)
        atime, mtime = attr.atime_ns, attr.mtime_ns
        if atime is not None or mtime is not None:
            syscalls.utimens(
                fd if fd >= 0 else self._proc_fd,
                None if fd >= 0 else str(nfd).encode(),
                None if atime is NOW else atime,
                None if mtime is NOW else mtime,
                atime_now=atime is NOW,
                mtime_now=mtime is NOW,
            )
        # ctime: the host sets it itself on every change above.
        return os.stat(fd) if fd >= 0 else os.stat(nfd)
