"""``--sandbox namespace``, and what every sandbox mode shares.

The *at()-relative, no-symlink-following confinement of ``fs/passthrough/``
is the first line; the sandbox is the second, for the day the first has a
hole: a daemon that escaped the share finds nothing worth having.

Shared by the modes (``chroot.py`` is the other one; ``process.py`` picks
one): the option rules (:func:`check_request`), the check of the share,
:func:`preload`, and :class:`SandboxView`, what the serving process sees
afterwards.

``namespace`` (the default, as in the Rust virtiofsd) follows the order of
its ``sandbox.rs``:

1. not root: ``unshare(CLONE_NEWUSER)`` and an id map (our own uid/gid, or
   ``--uid-map``/``--gid-map`` through newuidmap(1)/newgidmap(1), run by a
   helper process still in the parent user namespace);
2. ``unshare(CLONE_NEWPID)`` and ``fork()``: the child is pid 1 of a new pid
   namespace and serves; the parent stays outside, forwards signals to it,
   removes the socket and pid files when it ends and exits as it did;
3. the child enters new mount and network namespaces, makes every mount a
   slave (nothing propagates back to the host), mounts a fresh ``proc``
   (only the daemon's own processes are in it), and ``pivot_root``s into a
   small read-only tmpfs that holds just that proc at ``/proc`` and a
   recursive bind of the shared directory at ``/shared``; the old root is
   detached.

Difference from the Rust virtiofsd: it pivots into the shared directory
itself and keeps only an fd on ``/proc/self/fd``.  Here the share's root
node never resolves ``..`` (passthrough refuses it), so a tmpfs holding a
private ``/proc`` beside the share costs nothing and keeps ``/proc`` an
ordinary path for the few readers outside the file system.

Python and uvloop must start after this: ``unshare(CLONE_NEWUSER)`` fails
in a process with more than one thread, and the event loop is created in
the child only.  Modules are imported before the pivot (:func:`preload`),
since ``sys.path`` is not reachable afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import pkgutil
import select
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from virtiofsd_py.host import syscalls

SandboxMode = Literal["namespace", "chroot", "none"]
MODES: Final[tuple[SandboxMode, ...]] = get_args(SandboxMode)
#: Where the share and proc appear inside the namespace sandbox.
JAIL_SHARED: Final = "/shared"
JAIL_PROC: Final = "/proc"

CHROOT_NEEDS_ROOT: Final = (
    "--sandbox chroot needs root (chroot(2) needs CAP_SYS_CHROOT); "
    "use --sandbox namespace, which works unprivileged in a user namespace"
)
#: Signals the supervising parent passes on to the sandboxed child.
FORWARDED_SIGNALS: Final = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

#: Modules imported lazily somewhere at run time (by us or the stdlib).
_PRELOAD_STDLIB: Final = (
    "asyncio",
    "concurrent.futures.thread",
    "concurrent.futures.process",
    "encodings.idna",
    "encodings.utf_8",
    "encodings.latin_1",
    "logging.handlers",
    "msgpack",
    "uvloop",
    "traceback",
    "linecache",
    "tokenize",
    "json",
    "tempfile",
    "shutil",
)


class SandboxError(Exception):
    """The sandbox asked for cannot be set up; the message is for the operator."""


@dataclass(frozen=True, slots=True)
class IdMapping:
    """One ``--uid-map``/``--gid-map`` range: ``:namespace_id:host_id:count:``."""

    inside: int
    outside: int
    count: int

    @classmethod
    def parse(cls, text: str) -> IdMapping:
        """Rust virtiofsd syntax: the first character is the separator, e.g. ``:0:1000:1:``."""
        if len(text) < 2:
            raise ValueError(f"id map {text!r}: expected :namespace_id:host_id:count:")
        sep = text[0]
        parts = text[1:].removesuffix(sep).split(sep)
        if len(parts) != 3:
            raise ValueError(f"id map {text!r}: expected :namespace_id:host_id:count:")
        try:
            inside, outside, count = (int(p, 10) for p in parts)
        except ValueError:
            raise ValueError(f"id map {text!r}: ids and count must be numbers") from None
        if min(inside, outside) < 0 or count < 1 or max(inside, outside) + count > 1 << 32:
            raise ValueError(f"id map {text!r}: out of range")
        return cls(inside, outside, count)


@dataclass(frozen=True, slots=True)
class SandboxView:
    """What the serving process sees once the sandbox is in place: the paths it
    must use for the share and for its own fds (the host's are gone)."""

    mode: SandboxMode
    #: Path of the shared directory as this process now sees it (None: no host directory).
    shared_dir: str | None
    #: Path of this process's fd directory (``PassthroughConfig.proc_self_fd``).
    proc_self_fd: str = "/proc/self/fd"
    #: Set in the supervising parent only: the pid of the sandboxed child.
    child_pid: int | None = None


def unconfined(shared_dir: str | None) -> SandboxView:
    """``--sandbox none`` (and the host mount): the host's own paths."""
    return SandboxView("none", shared_dir)


def check_request(mode: str, uid_map: Sequence[IdMapping], gid_map: Sequence[IdMapping]) -> None:
    """Refuse impossible combinations before anything is changed (Rust's rules)."""
    if mode not in MODES:
        raise SandboxError(f"--sandbox {mode}: expected one of {', '.join(MODES)}")
    root = os.geteuid() == 0
    if (uid_map or gid_map) and (root or mode != "namespace"):
        raise SandboxError(
            "--uid-map/--gid-map apply to the user namespace of an unprivileged "
            "daemon: use them with --sandbox namespace, not as root"
        )
    if mode == "chroot" and not root:
        raise SandboxError(CHROOT_NEEDS_ROOT)


def preload() -> None:
    """Import every module the daemon may import lazily, while sys.path is reachable."""
    for name in _PRELOAD_STDLIB:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Every module of this distribution, found from where this file is (no import
    # of the layers above confine/).
    top = __name__.partition(".")[0]
    tree = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for info in pkgutil.walk_packages([tree], f"{top}."):
        if info.name.startswith((f"{top}.testing", f"{top}.__main__")):
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if e.name is None or e.name.partition(".")[0] == top:
                raise
            # A module of an optional extra (fs/pyfuse3_adapter without pyfuse3):
            # not preloaded, and not imported later either.
    tempfile.gettempdir()  # probes the host's temp directories once, and caches the answer


def check_shared_dir(shared_dir: str) -> str:
    """The absolute path of ``shared_dir``, refused unless it is a directory we can open."""
    path = os.path.abspath(shared_dir)
    try:
        os.close(os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except OSError as e:
        raise SandboxError(f"shared directory {path}: {e.strerror}") from None
    return path


def enter_namespace(
    shared_dir: str | None,
    uid_map: Sequence[IdMapping] = (),
    gid_map: Sequence[IdMapping] = (),
) -> SandboxView:
    """Enter the namespace sandbox: this forks; both processes return (the parent's
    view has ``child_pid``).

    ``shared_dir`` (absolute, checked) None: a back-end without a host
    directory, nothing of the host is bound into the sandbox.  Call
    :func:`preload` first.
    """
    try:
        if os.geteuid() != 0:
            _enter_user_namespace(uid_map, gid_map)
        syscalls.unshare(syscalls.CLONE_NEWPID)
    except OSError as e:
        raise SandboxError(
            f"--sandbox namespace: cannot create namespaces ({e.strerror}); "
            "run as root, allow unprivileged user namespaces, or choose --sandbox none"
        ) from None
    # The parent holds the write end until it exits: the child sees it gone
    # (POLLHUP) if the parent died before PR_SET_PDEATHSIG was in place.
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
    # Held back until supervise() forwards them: a SIGTERM right after the
    # fork must reach the child, not end the parent alone.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    child = os.fork()
    if child:
        os.close(lifeline_r)
        return SandboxView("namespace", shared_dir, child_pid=child)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    try:
        os.close(lifeline_w)
        syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
        if not _parent_alive(lifeline_r):
            os._exit(1)
        os.close(lifeline_r)
        _build_jail(shared_dir)
    except BaseException as e:  # the parent reports our exit status
        _report_child_failure(e)
        os._exit(1)
    return SandboxView(
        "namespace", None if shared_dir is None else JAIL_SHARED, JAIL_PROC + "/self/fd"
    )


def _parent_alive(lifeline: int) -> bool:
    poller = select.poll()
    poller.register(lifeline, select.POLLIN)
    return not poller.poll(0)


def _report_child_failure(e: BaseException) -> None:
    msg = f"virtiofsd-py: sandbox setup failed: {e}\n"
    with contextlib.suppress(OSError):
        os.write(2, msg.encode(errors="replace"))


def _enter_user_namespace(uid_map: Sequence[IdMapping], gid_map: Sequence[IdMapping]) -> None:
    """An unprivileged daemon gets its capabilities from a user namespace of its own."""
    uid, gid = os.geteuid(), os.getegid()
    if not uid_map and not gid_map:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
        # user_namespaces(7): one line mapping our own id may be written by
        # ourselves; gid_map needs setgroups denied first.
        _write_proc("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write_proc("/proc/self/setgroups", "deny\n")
        _write_proc("/proc/self/gid_map", f"{gid} {gid} 1\n")
        return
    tools = {name: shutil.which(name) for name in ("newuidmap", "newgidmap")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        raise SandboxError(f"--uid-map/--gid-map need {' and '.join(missing)} (package uidmap)")
    umap = uid_map or (IdMapping(uid, uid, 1),)
    gmap = gid_map or (IdMapping(gid, gid, 1),)
    go_r, go_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # stays in the parent user namespace, maps it from outside
        os.close(go_w)
        code = 1
        try:
            if os.read(go_r, 1) == b"g":
                target = str(os.getppid())
                for tool, ranges in (("newuidmap", umap), ("newgidmap", gmap)):
                    args = [str(n) for m in ranges for n in (m.inside, m.outside, m.count)]
                    subprocess.run([str(tools[tool]), target, *args], check=True)
                code = 0
        finally:
            os._exit(code)
    os.close(go_r)
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
    finally:
        os.write(go_w, b"g")
        os.close(go_w)
    _, status = os.waitpid(helper, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SandboxError("newuidmap/newgidmap failed to set up --uid-map/--gid-map")
    if any(m.inside == 0 for m in umap) and any(m.inside == 0 for m in gmap):
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)


def _write_proc(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _jail_base() -> str:
    for candidate in ("/tmp", "/mnt", "/run", "/media"):
        if os.path.isdir(candidate) and not os.path.islink(candidate):
            return candidate
    raise SandboxError("no directory to mount the sandbox's root on (/tmp, /mnt, /run)")


def _build_jail(shared_dir: str | None) -> None:
    """In the child: new mount+net namespaces, the tmpfs root, pivot_root into it."""
    syscalls.unshare(syscalls.CLONE_NEWNS | syscalls.CLONE_NEWNET)
    # Opened in the new namespace (a bind source must be one of its mounts).
    share_fd = -1
    if shared_dir is not None:
        share_fd = os.open(shared_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        syscalls.mount(None, "/", None, syscalls.MS_SLAVE | syscalls.MS_REC)
        base = _jail_base()
        hardening = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        syscalls.mount("tmpfs", base, "tmpfs", hardening, "mode=0755,size=16k,nr_inodes=16")
        proc = base + JAIL_PROC
        share = base + JAIL_SHARED
        os.mkdir(proc, 0o555)
        os.mkdir(share, 0o555)
        syscalls.mount("proc", proc, "proc", hardening | syscalls.MS_RELATIME)
        # The share by its fd: a mount on an ancestor (the tmpfs on /tmp) may hide its path.
        if share_fd >= 0:
            syscalls.mount(
                f"/proc/self/fd/{share_fd}", share, None, syscalls.MS_BIND | syscalls.MS_REC
            )
        syscalls.mount(None, base, None, syscalls.MS_REMOUNT | syscalls.MS_RDONLY | hardening)
        old_root = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.chdir(base)
            syscalls.pivot_root(".", ".")
            os.fchdir(old_root)
            syscalls.mount(None, ".", None, syscalls.MS_SLAVE | syscalls.MS_REC)
            syscalls.umount2(".", syscalls.MNT_DETACH)
        finally:
            os.close(old_root)
        os.chdir("/")
    finally:
        if share_fd >= 0:
            os.close(share_fd)


def supervise(child: int, cleanup: Callable[[], None]) -> int:
    """Parent of a sandboxed child: forward signals, wait, clean up, report its status.

    Returns the exit code, or ``-signal`` when the child was killed.
    """

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, sig)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except ChildProcessError:
            status = 1 << 8
        except OSError as e:  # pragma: no cover - EINTR is retried by Python (PEP 475)
            if e.errno == errno.EINTR:
                continue
            raise
        if os.WIFSTOPPED(status):
            continue
        break
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    cleanup()
    return os.waitstatus_to_exitcode(status)


def exit_like(code: int) -> int:
    """Exit the way the child did: re-raise its fatal signal, else return its code."""
    if code >= 0:
        return code
    sig = -code
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the child dumped its own core
    with contextlib.suppress(ValueError, OSError):  # SIGKILL has no disposition to reset
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    os.kill(os.getpid(), sig)
    return 128 + sig
