"""The one start-up sequence: everything that comes before the event loop.

In order, for the daemon (:func:`start_daemon`):

0. say which core serves (compiled or pure Python, ``host.native``), with
   one warning when the compiled core should be there and is not;
1. raise RLIMIT_NOFILE (``--rlimit-nofile``) and drop the supplementary
   groups (CVE-2022-0358: never act with the operator's groups);
2. check the share: a missing or non-directory ``--shared-dir`` is said
   before any file is created;
3. the service: connect to ``$NOTIFY_SOCKET`` and bind ``--metrics``
   (``service.prepare``), which the sandbox would no longer allow;
4. block the signals the sandbox forwards, until ``daemon.serve`` has its
   handlers (a SIGTERM as soon as the socket exists must stop us cleanly,
   and pid 1 of a namespace would drop it);
5. the listening socket and its pid file (:func:`open_listener`), and the
   directory for rejected migration states, while the host's tree is visible;
6. confinement (``confine.process.confine``): sandbox, capabilities, seccomp;
   in the supervising parent of a namespace sandbox the sequence ends here,
   with the child's exit status;
7. the back-end, on the paths the sandbox left (``backends.build``); a
   ``--backend MODULE:FACTORY`` one is imported and made before step 6
   (``backends.load_custom``), while the host's tree is visible.

``virtiofsd-py mount`` runs steps 0, 1, 2 and 7 (:func:`start_mount`; its
mount and seccomp filter follow in mount.py).  Every failure is a
:class:`StartupError`, which the command line turns into one log line and
exit status 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import resource
import signal
import socket
import stat
import tempfile
from dataclasses import dataclass

from virtiofsd_py import __version__
from virtiofsd_py.app import backends, service
from virtiofsd_py.app.backends import Backend
from virtiofsd_py.app.errors import StartupError, describe
from virtiofsd_py.app.options import Options
from virtiofsd_py.app.service import ServiceHooks
from virtiofsd_py.confine.process import ConfinementError, check_shared_dir, confine
from virtiofsd_py.confine.sandbox import FORWARDED_SIGNALS, unconfined
from virtiofsd_py.fs.passthrough.creds import drop_supplementary_groups
from virtiofsd_py.host import native
from virtiofsd_py.host.fdbudget import FD_TABLE_AT_START, reserve_fd_table

log = logging.getLogger("virtiofsd_py")


@dataclass(slots=True)
class Listener:
    sock: socket.socket
    #: Files we created and remove at exit (socket path, pid file).
    created: list[str]
    lock_fd: int | None = None

    def close(self) -> None:
        self.sock.close()
        for path in self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


@dataclass(slots=True)
class Started:
    """What start-up leaves the serving process; :meth:`close` once serving is over."""

    listener: Listener
    hooks: ServiceHooks
    backend: Backend
    #: Where rejected migration states go: the path and an fd reaching it from inside.
    state_dir: tuple[str, int] | None

    def close(self) -> None:
        self.listener.close()
        self.backend.close()


def _lock_pid_file(path: str) -> int:
    """Take ``path`` (flock) and write our pid: one daemon per socket."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        socket_path = path.removesuffix(".pid")
        raise StartupError(
            f"--socket-path {socket_path}: cannot create the pid file {path}: "
            f"{e.strerror or describe(e)}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"{path} is locked: another daemon is serving this socket") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _inherited(fd: int) -> Listener:
    """``--fd`` (or systemd's socket): it must be a listening unix socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise StartupError(f"--fd {fd}: {describe(e)}") from None
    if sock.family != socket.AF_UNIX or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()  # not ours to close
        raise StartupError(f"--fd {fd} is not a listening unix socket")
    return Listener(sock, [])


def _socket_gid(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"--socket-group {group}: no such group") from None


def open_listener(opts: Options) -> Listener:
    """The vhost-user socket: inherited (``--fd``) or bound at ``--socket-path``."""
    if opts.fd is not None:
        return _inherited(opts.fd)
    assert opts.socket_path is not None
    gid = None if opts.socket_group is None else _socket_gid(opts.socket_group)
    path = os.path.abspath(opts.socket_path)
    pid_path = path + ".pid"
    lock_fd = _lock_pid_file(pid_path)
    # Bound and set up under a temporary name, then renamed into place: the
    # socket path appears only once it accepts connections with its final mode.
    tmp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            sock.bind(tmp)
        except OSError as e:
            raise StartupError(f"--socket-path {path}: cannot bind: {describe(e)}") from None
        if gid is not None:
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o660)
        sock.listen(1)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise StartupError(f"--socket-path {path} exists and is not a socket")
        os.rename(tmp, path)  # replaces a stale socket: its owner no longer holds the lock
    except BaseException as e:
        sock.close()
        for p in (tmp, pid_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        os.close(lock_fd)
        if isinstance(e, OSError):
            raise StartupError(f"--socket-path {path}: {describe(e)}") from None
        raise
    return Listener(sock, [path, pid_path], lock_fd)


def rejected_state_dir(opts: Options) -> str:
    """Where a migration state that failed to load is kept: the runtime
    directory systemd gives us, else beside the socket, else the temp dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return runtime.split(":")[0]
    if opts.socket_path:
        return os.path.dirname(os.path.abspath(opts.socket_path))
    return tempfile.gettempdir()


def open_rejected_state_dir(opts: Options) -> tuple[str, int] | None:
    """``rejected_state_dir`` and an fd of it, opened while the host's tree is
    visible (the sandbox hides it later)."""
    try:
        path = rejected_state_dir(opts)
        return path, os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        log.warning("rejected migration states will not be kept: %s", e)
        return None


def raise_nofile_limit(wanted: int | None) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if target == soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
    except (ValueError, OSError) as e:
        if wanted is not None:
            why = describe(e) if isinstance(e, OSError) else str(e)
            raise StartupError(f"--rlimit-nofile {wanted}: {why}") from None
        log.warning("could not raise RLIMIT_NOFILE to %d: %s", target, e)


def announce_core() -> None:
    """Step 0: the version and the core in one line; a warning when a compiled
    module was expected (not forced off) but could not be imported."""
    log.info("virtiofsd-py %s, %s", __version__, native.describe())
    missing = native.missing()
    if missing:
        why = "; ".join(f"{name}: {err}" for name, err in sorted(missing.items()))
        log.warning(
            "the compiled core is not built (%s): serving with the pure-Python twins, "
            "which cost more CPU per request; reinstall with a C compiler and the "
            "Python headers to build it",
            why,
        )


def prepare_process(opts: Options) -> None:
    """Steps 0, 1 and 2, for the daemon and the host mount alike."""
    announce_core()
    raise_nofile_limit(opts.rlimit_nofile)
    drop_supplementary_groups()
    if opts.backend == "passthrough" and opts.shared_dir is not None:
        try:
            check_shared_dir(opts.shared_dir)
        except ConfinementError as e:
            raise StartupError(str(e)) from None


def start_daemon(opts: Options) -> Started | int:
    """The daemon's start-up; an ``int`` in the supervising parent of a namespace
    sandbox: the exit code of the child, which served (see ``sandbox.exit_like``)."""
    prepare_process(opts)
    hooks = service.prepare(opts)
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    listener = open_listener(opts)
    state_dir = open_rejected_state_dir(opts)
    try:
        made = backends.load_custom(opts)  # imports and opens while the host is visible
    except BaseException:
        listener.close()
        raise
    try:
        view = confine(opts, listener)
    except ConfinementError as e:
        listener.close()
        raise StartupError(str(e)) from None
    if isinstance(view, int):
        return view
    reserve_fd_table(FD_TABLE_AT_START)  # before any thread: then it costs nothing
    try:
        backend = backends.build(opts, view, made)
    except BaseException:
        listener.close()
        raise
    return Started(listener, hooks, backend, state_dir)


def start_mount(opts: Options) -> Backend:
    """``virtiofsd-py mount``'s start-up: no socket and no sandbox."""
    prepare_process(opts)
    return backends.build(opts, unconfined(opts.shared_dir))
