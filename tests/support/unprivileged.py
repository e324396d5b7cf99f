"""Running a command as an unprivileged user (``nobody``) and whether user
namespaces are open to it: the unprivileged sandbox and mount suites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ours_only

USER = 65534  # nobody: always there, owns nothing
REPO = Path(__file__).resolve().parents[2]
#: Settings that decide whether an unprivileged process may unshare(CLONE_NEWUSER).
USERNS_SYSCTLS = (
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def _blocked_ancestor(path: str, uid: int) -> str | None:
    """The outermost directory above ``path`` that ``uid`` (no groups) cannot enter."""
    parts = Path(path).resolve().parts
    for i in range(2, len(parts) + 1):
        d = os.path.join(*parts[:i])
        st = os.stat(d)
        if st.st_uid != uid and not st.st_mode & 0o001:
            return d
    return None


#: /dev/fuse of a container may be root's only (0600): the mount tests give
#: ``nobody`` a node of its own, in the private mount namespace.
_FUSE_NODE = (
    'f=$(mktemp -d) && mount -t tmpfs -o mode=0755 sb-fuse "$f" && '
    'mknod -m 0666 "$f/fuse" c 10 229 && mount --bind "$f/fuse" /dev/fuse && umount -l "$f" && '
)
#: $1 the prefix, $2 the directory in the way; the prefix is parked on $s meanwhile.
_PREFIX = (
    's=$(mktemp -d) && mount --bind "$1" "$s" && '
    'mount -t tmpfs -o mode=0755 sb-scaffold "$2" && mkdir -p "$1" && '
    'mount --bind "$s" "$1" && umount "$s" && rmdir "$s" && '
)


def as_user(argv: list[str], uid: int = USER, *, fuse: bool = False) -> list[str]:
    """``argv`` run as ``uid`` (its own gid, no groups), with this interpreter
    reachable (and ``/dev/fuse`` usable when ``fuse``)."""
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    blocked = _blocked_ancestor(sys.prefix, uid) or ""
    fuse = fuse and os.stat("/dev/fuse").st_mode & 0o006 != 0o006
    if not blocked and not fuse:
        return [*drop, *argv]
    script = (_FUSE_NODE if fuse else "") + (_PREFIX if blocked else "") + 'shift 2 && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            "sh", sys.prefix, blocked, *drop, *argv]  # fmt: skip


def userns_unavailable() -> str | None:
    """Why ``nobody`` cannot make a user namespace here, or None if it can."""
    r = subprocess.run(
        as_user(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount", "true"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode == 0:
        return None
    settings = ", ".join(
        f"{p.removeprefix('/proc/sys/').replace('/', '.')}={Path(p).read_text().strip()}"
        for p in USERNS_SYSCTLS
        if os.path.exists(p)
    )
    return f"unprivileged user namespaces refused ({r.stderr.strip()}); {settings}"
