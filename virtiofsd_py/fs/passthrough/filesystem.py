"""The passthrough backend: serve a host directory, confined to it.

Confinement rules (the guest is not trusted):

* Every host object is reached relative to an inode's O_PATH fd, one name
  at a time: ``openat(parent_fd, name, O_PATH | O_NOFOLLOW)``.  Names with
  ``/`` or NUL are refused, so a name never walks more than one step, and a
  symlink is never followed by the daemon (the guest resolves symlinks; we
  return their target bytes on READLINK).  ``..`` looked up at the root is
  the root.  (A directory that a host process moves out of the share takes
  its O_PATH fd along; only a sandbox -- mount namespace / chroot -- closes
  that gap, as for the Rust virtiofsd.)
* OPEN reopens the O_PATH fd through ``/proc/self/fd/N`` and only for
  regular files and directories: fifos, sockets and device nodes are never
  opened other than O_PATH (CVE-2020-35517); OPEN of one fails with EBADF as
  in the Rust virtiofsd (``is_safe_inode``).  Reopening a symlink's O_PATH
  fd fails with ELOOP in the kernel.
* An error of one request (EMFILE/ENFILE included, CVE-2020-10717) is raised
  to that request only and leaves the tables as they were.

Hot path: LOOKUP is openat + statx (attributes and mount id in one call);
GETATTR is one fstat; READ is one preadv straight into the guest buffers.

``--inode-file-handles`` (file_handles.py): nodes keep a file handle instead of
their O_PATH fd.  Every use of a node's fd goes through ``node.opened()``
(an O_PATH fd opened by handle for the one operation); OPEN opens the handle
with the guest's flags directly.  Handle nodes do not count against the
guest's fd budget.  Outside the ``with`` nothing is held: an inode unlinked
on the host and no longer open anywhere gives ESTALE, as in the Rust
virtiofsd.  Node fds are always opened before switching to the guest's
credentials (open_by_handle_at needs CAP_DAC_READ_SEARCH in the effective
set, which a non-zero effective uid clears).

The class is composed of one module per group of operations over one shared
core (core.py: state and helpers): names.py (LOOKUP, FORGET, changes of the
tree), attrs.py, files.py, dirs.py, xattrs.py, locking.py.  ``--readonly``
wraps it in ``ReadOnlyFS`` (fs/readonly.py).
"""

from __future__ import annotations

from virtiofsd_py.fs.passthrough.attrs import AttrOps
from virtiofsd_py.fs.passthrough.core import PassthroughConfig
from virtiofsd_py.fs.passthrough.dirs import DirOps
from virtiofsd_py.fs.passthrough.files import FileOps
from virtiofsd_py.fs.passthrough.locking import LockOps
from virtiofsd_py.fs.passthrough.names import NameOps
from virtiofsd_py.fs.passthrough.xattrs import XattrOps

__all__ = ["PassthroughConfig", "PassthroughFS"]


class PassthroughFS(NameOps, AttrOps, FileOps, DirOps, XattrOps, LockOps):
    """``Filesystem`` over a host directory.  Thread-safe.

    Live migration of its tables is ``migration.migratable.PassthroughMigration``,
    built on it (the core knows only the hooks in ``hooks.py``)."""
