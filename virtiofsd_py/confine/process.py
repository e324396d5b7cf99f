"""Start-up confinement, in order: sandbox (may fork), capabilities, seccomp.

``app/startup.py`` calls :func:`confine` after opening the listening socket
and before the event loop exists.  The order matters: the sandbox needs
CAP_SYS_ADMIN for its mounts, so capabilities are dropped after it; the
seccomp filter comes last, and every thread created afterwards (the event
loop's, the worker pool) inherits both.

:func:`confine` returns the :class:`~virtiofsd_py.confine.sandbox.SandboxView`
of the serving process: the paths the file system must use from then on
are the caller's to pass on, not kept here.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from typing import Protocol

from virtiofsd_py.confine import chroot, sandbox
from virtiofsd_py.confine.sandbox import IdMapping, SandboxView
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


def check_shared_dir(shared_dir: str) -> None:
    """Refuse a share that is no directory we can open, before anything is set up."""
    try:
        sandbox.check_shared_dir(shared_dir)
    except sandbox.SandboxError as e:
        raise ConfinementError(str(e)) from None


def _enter(opts: _Opts) -> SandboxView:
    """Enter the sandbox ``opts.sandbox`` names (checked by ``check_options``)."""
    shared_dir = opts.shared_dir if opts.backend == "passthrough" else None
    if opts.sandbox == "none":
        return sandbox.unconfined(shared_dir)
    if shared_dir is not None:
        shared_dir = sandbox.check_shared_dir(shared_dir)
    sandbox.preload()
    if opts.sandbox == "chroot":
        return chroot.enter_chroot(shared_dir)
    return sandbox.enter_namespace(
        shared_dir,
        parse_id_maps(opts.uid_map, "--uid-map"),
        parse_id_maps(opts.gid_map, "--gid-map"),
    )


def install_seccomp(action: str, extra: Iterable[str] = ()) -> None:
    """The seccomp filter (``--seccomp``) over the daemon's allow-list plus ``extra``."""
    if action != "none":
        # libuv would set up an io_uring (a large kernel surface) for its
        # epoll batching; plain epoll is what the allow-list covers.
        os.environ["UV_USE_IO_URING"] = "0"
    try:
        seccomp.install(action, frozenset(extra))
    except (OSError, seccomp.SeccompError) as e:
        raise ConfinementError(str(e)) from None
    if action != "none":
        log.debug("seccomp filter installed (action %s)", action)


def confine(opts: _Opts, listener: _Listener) -> SandboxView | int:
    """Enter the sandbox and restrict the process.

    Returns what the process that goes on to serve sees.  In the supervising
    parent of a namespace sandbox it returns the exit code to exit with once
    the sandboxed child has ended (``-N``: killed by signal N, see
    :func:`sandbox.exit_like`).
    """
    capabilities.last_cap()  # read while /proc is a path (a chroot hides it)
    try:
        check_options(opts)
        relative = _reachable_from_fd_dir(listener.created) if opts.sandbox == "chroot" else None
        view = _enter(opts)
    except (sandbox.SandboxError, capabilities.CapabilityError) as e:
        raise ConfinementError(str(e)) from None
    if view.child_pid is not None:
        log.debug("sandboxed daemon is pid %d", view.child_pid)
        # Only the child accepts: a second front-end must not queue on our copy.
        listener.sock.close()
        return sandbox.supervise(view.child_pid, listener.close)
    if relative is not None:
        listener.created[:] = relative  # an absolute path would name a file in the share
    elif view.mode != "none":
        listener.created.clear()  # not reachable from inside; the parent removes them
    if view.mode == "none":
        log.warning("running without a sandbox (--sandbox none): confinement is by *at() only")
    elif view.shared_dir is None:
        log.info("sandbox %s: no host directory", view.mode)
    else:
        log.info("sandbox %s: serving %s as %s", view.mode, opts.shared_dir, view.shared_dir)
    try:
        _, permitted = capabilities.get()
        if permitted:
            kept = capabilities.restrict(capabilities.parse_modcaps(opts.modcaps))
            log.debug("capabilities kept: %s", ", ".join(capabilities.names(kept)) or "none")
    except (OSError, capabilities.CapabilityError) as e:
        raise ConfinementError(str(e)) from None
    install_seccomp(opts.seccomp)
    return view


def _reachable_from_fd_dir(paths: Sequence[str]) -> list[str]:
    """``paths`` as a chroot'ed process names them: ``N/name`` from its working
    directory, the fd directory; the directory fds stay open for good."""
    return [chroot.fd_relative(p)[1] for p in paths]
