"""``--sandbox chroot``: chroot(2) into the share, working directory on the fd directory.

``chroot`` (root only, as in the Rust virtiofsd; meant for containers whose
runtime already made the namespaces): no namespaces and no fork.  The
process opens ``/proc/self/fd`` and the share first, chroot(2)s into the
share and then ``fchdir``s to the fd directory, which stays its working
directory for good.  The passthrough reaches ``/proc`` only through
``PassthroughConfig.proc_self_fd``, so it is given ``"."``: magic links are
``./N``, fdinfo ``./../fdinfo/N`` -- paths built from fd numbers only.  Why
the working directory rather than only a directory fd: xattr calls on a
symlink or device node need a *path* (f*xattr() refuse O_PATH fds), and the
``*xattrat()`` calls that take a directory fd exist only from Linux 6.13,
so they would need this as a fallback anyway; the Rust virtiofsd does the
same (it ``fchdir``s to its ``/proc/self/fd`` fd around those calls).  The
working directory is per fs_struct; worker threads that unshare theirs
(``creds.Umask``) copy it, so it is set before any thread exists.

What a working directory outside the chroot means: a relative path is
resolved from it and ``..`` there is *not* stopped by the chroot (the
process root is never crossed), so ``../../..`` reaches the host's ``/``.
Nothing in the daemon resolves a guest-supplied path against the working
directory: every guest name is one component (``/`` and NUL refused) used
with the ``dir_fd`` of a node, ``..`` at the share's root is answered from
the root itself, migration resolves paths from the root fd, and the only
relative paths without a ``dir_fd`` are the ``./N`` ones above and the
socket/pid files' ``N/name`` (:func:`fd_relative`).  A daemon running
arbitrary code can walk out the same way (as from the Rust virtiofsd's
``/proc/self/fd`` fd): chroot is a second line against path confusions,
not against a compromised process -- ``namespace`` is that.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Final

from virtiofsd_py.confine.sandbox import SandboxError, SandboxView

#: ``proc_self_fd`` inside the chroot: the working directory is the fd directory.
CHROOT_PROC_SELF_FD: Final = "."


def enter_chroot(shared_dir: str | None) -> SandboxView:
    """chroot(2) into the share, working directory on our ``/proc/self/fd``.

    ``shared_dir`` is absolute and checked (call ``sandbox.preload`` first);
    None (no host directory): an empty directory, removed once we are
    inside (a removed directory cannot gain entries).
    """
    empty = tempfile.mkdtemp(prefix="virtiofsd-py-root-") if shared_dir is None else None
    dir_flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    parent_fd = proc_fd = root_fd = -1
    try:
        if empty is not None:
            parent_fd = os.open(os.path.dirname(empty), dir_flags)
        proc_fd = os.open("/proc/self/fd", dir_flags)
        root_fd = os.open(shared_dir or str(empty), dir_flags)
        # By fd: the path may have been swapped since it was checked.
        os.fchdir(root_fd)
        os.chroot(".")
        os.fchdir(proc_fd)
    except OSError as e:
        raise SandboxError(f"--sandbox chroot: {e}") from None
    finally:
        if parent_fd >= 0:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.basename(str(empty)), dir_fd=parent_fd)
        for fd in (root_fd, proc_fd, parent_fd):
            if fd >= 0:
                os.close(fd)
    return SandboxView("chroot", None if shared_dir is None else "/", CHROOT_PROC_SELF_FD)


def fd_relative(path: str) -> tuple[int, str]:
    """An O_PATH fd of ``path``'s directory and ``"N/name"``, the same file named from
    a working directory that is our fd directory (how a chroot'ed process reaches
    its socket and pid files); the caller keeps the fd open."""
    head, name = os.path.split(os.path.abspath(path))
    try:
        fd = os.open(head, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SandboxError(f"{head}: {e.strerror}") from None
    return fd, f"{fd}/{name}"
