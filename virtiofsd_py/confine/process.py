"""Start-up confinement, in order: sandbox (may fork), capabilities, seccomp.

``daemon.run`` calls :func:`confine` after opening the listening socket and
before the event loop exists.  The order matters: the sandbox needs
CAP_SYS_ADMIN for its mounts, so capabilities are dropped after it; the
seccomp filter comes last, and every thread created afterwards (the event
loop's, the worker pool) inherits both.

The confinement is process-wide, so the paths the file system must use
inside it are kept here (:func:`fs_paths`) rather than threaded through
every caller.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from typing import Protocol

from virtiofsd_py.confine import sandbox
from virtiofsd_py.confine.sandbox import Confinement, IdMapping
from virtiofsd_py.host import capabilities, seccomp

log = logging.getLogger("virtiofsd_py")


class ConfinementError(Exception):
    """The confinement asked for cannot be set up; the message is for the operator."""


class _Opts(Protocol):
    """The options confinement reads (``app/options.Options``)."""

    @property
    def shared_dir(self) -> str | None: ...
    @property
    def backend(self) -> str: ...
    @property
    def sandbox(self) -> str: ...
    @property
    def seccomp(self) -> str: ...
    @property
    def modcaps(self) -> str | None: ...
    @property
    def uid_map(self) -> tuple[str, ...]: ...
    @property
    def gid_map(self) -> tuple[str, ...]: ...


class _Listener(Protocol):
    created: list[str]
    sock: socket.socket

    def close(self) -> None: ...


_current: Confinement | None = None


def parse_id_maps(values: Sequence[str], what: str) -> list[IdMapping]:
    try:
        return [IdMapping.parse(v) for v in values]
    except ValueError as e:
        raise ConfinementError(f"{what}: {e}") from None


def check_options(opts: _Opts) -> None:
    """Option-time checks (syntax and combinations), before anything is changed."""
    capabilities.parse_modcaps(opts.modcaps)
    uid_map = parse_id_maps(opts.uid_map, "--uid-map")
    gid_map = parse_id_maps(opts.gid_map, "--gid-map")
    if opts.seccomp not in seccomp.ACTIONS:
        raise ConfinementError(f"--seccomp {opts.seccomp}: expected one of {seccomp.ACTIONS}")
    try:
        sandbox.check_request(opts.sandbox, uid_map, gid_map)
    except sandbox.SandboxError as e:
        raise ConfinementError(str(e)) from None


def fs_paths(shared_dir: str) -> tuple[str, str]:
    """(shared directory, /proc/self/fd) as the serving process sees them now."""
    if _current is None or _current.mode == "none":
        return shared_dir, "/proc/self/fd"
    return _current.shared_dir, _current.proc_self_fd


def _reachable_from_fd_dir(paths: Sequence[str]) -> list[str]:
    """``paths`` as a chroot'ed process names them: ``N/name`` from its working
    directory, the fd directory; the directory fds stay open for good."""
    return [sandbox.fd_relative(p)[1] for p in paths]


def confine(opts: _Opts, listener: _Listener) -> Confinement | int:
    """Enter the sandbox and restrict the process.

    Returns the :class:`Confinement` in the process that goes on to serve.
    In the supervising parent of a namespace sandbox it returns the exit
    code to exit with once the sandboxed child has ended (``-N``: killed by
    signal N, see :func:`sandbox.exit_like`).
    """
    global _current
    capabilities.last_cap()  # read while /proc is a path (a chroot hides it)
    try:
        check_options(opts)
        relative = _reachable_from_fd_dir(listener.created) if opts.sandbox == "chroot" else None
        where = sandbox.enter(
            opts.sandbox,
            opts.shared_dir if opts.backend == "passthrough" else None,
            parse_id_maps(opts.uid_map, "--uid-map"),
            parse_id_maps(opts.gid_map, "--gid-map"),
        )
    except (sandbox.SandboxError, capabilities.CapabilityError) as e:
        raise ConfinementError(str(e)) from None
    if where.child_pid is not None:
        log.debug("sandboxed daemon is pid %d", where.child_pid)
        # Only the child accepts: a second front-end must not queue on our copy.
        listener.sock.close()
        return sandbox.supervise(where.child_pid, listener.close)
    if relative is not None:
        listener.created[:] = relative  # an absolute path would name a file in the share
    elif where.mode != "none":
        listener.created.clear()  # not reachable from inside; the parent removes them
    _current = where
    if where.mode == "none":
        log.warning("running without a sandbox (--sandbox none): confinement is by *at() only")
    else:
        shown = opts.shared_dir if opts.backend == "passthrough" else "no host directory"
        log.info("sandbox %s: serving %s as %s", where.mode, shown, where.shared_dir)
    try:
        _, permitted = capabilities.get()
        if permitted:
            kept = capabilities.restrict(capabilities.parse_modcaps(opts.modcaps))
            log.debug("capabilities kept: %s", ", ".join(capabilities.names(kept)) or "none")
        if opts.seccomp != "none":
            # libuv would set up an io_uring (a large kernel surface) for its
            # epoll batching; plain epoll is what the allow-list covers.
            os.environ["UV_USE_IO_URING"] = "0"
        seccomp.install(opts.seccomp)
    except (OSError, capabilities.CapabilityError, seccomp.SeccompError) as e:
        raise ConfinementError(str(e)) from None
    if opts.seccomp != "none":
        log.debug("seccomp filter installed (action %s)", opts.seccomp)
    return where
