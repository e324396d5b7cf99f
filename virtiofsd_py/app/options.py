"""Command-line options, named and spelled as the Rust virtiofsd names them.

Existing QEMU and libvirt command lines must keep working, so every option
the Rust virtiofsd has is recognised.  Options whose feature is built act;
options not built yet are accepted only where ignoring them cannot change
what the guest sees or weaken isolation, and otherwise refused with a clear
message (``OptionError``), never silently ignored.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from virtiofsd_py.app import legacy_options

CACHE_MODES = ("auto", "always", "metadata", "never")
SD_LISTEN_FDS_START = 3
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
BACKENDS = ("passthrough", "memory")
MOUNT_HELP = (
    "Serve the backend through the host kernel's FUSE on MOUNTPOINT instead of a "
    "vhost-user socket (SHARED_DIR is the passthrough's --shared-dir)"
)


class OptionError(Exception):
    pass


@dataclass(slots=True)
class Options:
    shared_dir: str | None
    socket_path: str | None
    fd: int | None
    socket_group: str | None
    tag: str | None
    thread_pool_size: int
    cache: str
    readonly: bool
    xattr: bool
    readdirplus: bool
    allow_direct_io: bool
    rlimit_nofile: int | None
    log_level: str
    syslog: bool
    print_capabilities: bool
    sandbox: str
    seccomp: str
    inode_file_handles: str
    xattrmap: str | None = None
    posix_acl: bool = False
    security_label: bool = False
    writeback: bool = False
    allow_mmap: bool = False
    killpriv_v2: bool = False
    announce_submounts: bool = False
    preserve_noatime: bool = False
    translate_uid: tuple[str, ...] = ()
    translate_gid: tuple[str, ...] = ()
    migration_mode: str = "find-paths"
    migration_on_error: str = "abort"
    migration_verify_handles: bool = False
    migration_confirm_paths: bool = False
    #: Forward the guest's flock()/fcntl() locks to the host (legacy -o no_flock/no_posix_lock).
    flock_locks: bool = True
    posix_locks: bool = True
    #: --metrics ADDR (see metrics_server.parse_address).
    metrics: str | None = None
    #: Deprecated syntax used on the command line: warnings to log at startup.
    deprecations: tuple[str, ...] = ()
    #: ``--backend``: "passthrough" (--shared-dir) or "memory" (fs/memory.py).
    backend: str = "passthrough"
    #: ``virtiofsd-py mount``: where the host mount goes (mount.py).
    mountpoint: str | None = None
    #: ``--modcaps`` (capabilities.py), ``--uid-map``/``--gid-map`` (sandbox.py).
    modcaps: str | None = None
    uid_map: tuple[str, ...] = ()
    gid_map: tuple[str, ...] = ()


def build_parser(*, mount: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="virtiofsd-py mount" if mount else "virtiofsd-py",
        description="vhost-user virtio-fs back-end (a Python virtiofsd).",
        allow_abbrev=False,
    )
    add = ap.add_argument
    add("--shared-dir", metavar="DIR", help="Shared directory path")
    add(
        "--backend",
        choices=BACKENDS,
        default="passthrough",
        help="virtiofsd-py only: what to serve, the shared directory (passthrough, default) "
        "or a file system held in memory (memory; no --shared-dir)",
    )
    if mount:
        add("paths", nargs="+", metavar="[SHARED_DIR] MOUNTPOINT", help=MOUNT_HELP)
    add("--tag", help="Tag the virtio device advertises (offers VHOST_USER_PROTOCOL_F_CONFIG)")
    add("--socket-path", metavar="PATH", help="vhost-user socket path")
    add("--socket", dest="socket_path", metavar="PATH", help="Same as --socket-path [deprecated]")
    add("--socket-group", metavar="GROUP", help="Name of the group to own the socket")
    add("--fd", type=int, metavar="FD", help="File descriptor of an already listening socket")
    add(
        "--thread-pool-size",
        type=int,
        default=0,
        metavar="N",
        help="Worker threads for requests; 0 runs them on the event loop (default 0)",
    )
    add("--cache", choices=CACHE_MODES, default="auto", help="Cache policy (default auto)")
    add("--readonly", action="store_true", help="Share is read-only: every change gets EROFS")
    add("--xattr", action="store_true", help="Enable extended attributes")
    add(
        "--xattrmap",
        metavar="RULES",
        help="Rules translating xattr names between guest and host (implies --xattr)",
    )
    add("--posix-acl", action="store_true", help="Enable POSIX ACLs (implies --xattr)")
    add(
        "--security-label",
        action="store_true",
        help="Set the guest's security label on new nodes (implies --xattr)",
    )
    add("--writeback", action="store_true", help="Enable the guest's writeback cache")
    add(
        "--allow-mmap",
        action="store_true",
        help="Allow shared mmap of files opened with direct I/O",
    )
    add(
        "--killpriv-v2",
        action="store_true",
        help="Let the daemon clear set-id bits on write/truncate (FUSE_HANDLE_KILLPRIV_V2)",
    )
    add(
        "--no-killpriv-v2",
        dest="killpriv_v2",
        action="store_false",
        help="Disable KILLPRIV V2 support [default]",
    )
    add(
        "--announce-submounts",
        action="store_true",
        help="Tell the guest about host mounts inside the share (FUSE_ATTR_SUBMOUNT)",
    )
    add("--preserve-noatime", action="store_true", help="Keep O_NOATIME from the guest")
    add(
        "--translate-uid",
        action="append",
        default=[],
        metavar="MAP",
        help="UID translation: guest|host|squash-guest|squash-host|map:A:B:N, forbid-guest:A:N",
    )
    add(
        "--translate-gid",
        action="append",
        default=[],
        metavar="MAP",
        help="GID translation, as --translate-uid",
    )
    add("--no-readdirplus", action="store_true", help="Disable READDIRPLUS")
    add(
        "--allow-direct-io",
        action="store_true",
        help="Honor O_DIRECT from the guest (default: strip it)",
    )
    add(
        "--rlimit-nofile",
        type=int,
        metavar="N",
        help="Raise RLIMIT_NOFILE to N (default: the hard limit)",
    )
    add("--log-level", choices=LOG_LEVELS, default="info", help="Log level (default info)")
    add("--syslog", action="store_true", help="Log to syslog instead of stderr")
    add(
        "--print-capabilities",
        action="store_true",
        help="Print vhost-user.json backend program capabilities and exit",
    )
    add(
        "--sandbox",
        choices=("namespace", "chroot", "none"),
        default="namespace",
        help="Sandbox mechanism: namespace (default: pid/mount/net namespaces, pivot_root), "
        "chroot, none",
    )
    add(
        "--seccomp",
        choices=("none", "kill", "log", "trap"),
        default="kill",
        help="Action on a system call outside the allow-list (default kill)",
    )
    add(
        "--modcaps",
        metavar="CAPS",
        help="Modify the kept capabilities, e.g. +sys_admin:-mknod",
    )
    add(
        "--uid-map",
        action="append",
        default=[],
        metavar=":NS_UID:HOST_UID:COUNT:",
        help="UID map of the user namespace (unprivileged --sandbox namespace)",
    )
    add(
        "--gid-map",
        action="append",
        default=[],
        metavar=":NS_GID:HOST_GID:COUNT:",
        help="GID map of the user namespace (unprivileged --sandbox namespace)",
    )
    add(
        "--inode-file-handles",
        choices=("never", "prefer", "mandatory", "fallback"),
        default="never",
        help="Keep inodes as file handles instead of fds; 'prefer' falls back to fds, "
        "'mandatory' refuses to start without them (default never); "
        "'fallback' is a deprecated name of 'prefer'",
    )
    add(
        "--migration-mode",
        choices=("find-paths", "file-handles"),
        default="find-paths",
        help="Source: send paths (default) or file handles to find inodes after migration",
    )
    add(
        "--migration-on-error",
        choices=("abort", "guest-error"),
        default="abort",
        help="Destination: an inode not found fails the migration (default) or gets EIO",
    )
    add(
        "--migration-verify-handles",
        action="store_true",
        help="Destination: require each inode found to have the source's file handle",
    )
    add(
        "--migration-confirm-paths",
        action="store_true",
        help="Source: re-check every path at switch-over",
    )
    add(
        "--metrics",
        metavar="ADDR",
        help="Serve Prometheus metrics on a unix socket (PATH, unix:PATH) or a loopback "
        "TCP port ([127.0.0.1:|[::1]:]PORT); SIGUSR1 logs them in any case",
    )
    add(
        "-o",
        action="append",
        metavar="OPT[,OPT...]",
        help="Options in the legacy C virtiofsd format, e.g. source=DIR,cache=none,xattr "
        "[deprecated]",
    )
    add("-d", action="store_true", help="Same as --log-level debug [deprecated]")
    add("-f", "--foreground", action="store_true", help="No effect [deprecated]")
    add("-V", "--version", action="version", version="virtiofsd-py 0.1.0")
    # Recognised but not built yet: each refused with a message when used.
    not_built = "Recognised, not implemented yet in virtiofsd-py: refused"
    for flag in _NOT_BUILT_FLAGS:
        add(flag, action="store_true", help=not_built)
    for opt in _NOT_BUILT_VALUES:
        add(opt, action="append", metavar="VALUE", help=not_built)
    ap.set_defaults(flock_locks=True, posix_locks=True)
    return ap


#: Options whose absence of implementation would change what the guest sees
#: or what isolation the operator asked for.
_NOT_BUILT_FLAGS: tuple[str, ...] = ()
_NOT_BUILT_VALUES: tuple[str, ...] = ()


def systemd_listen_fd() -> int | None:
    """The socket systemd passed us (sd_listen_fds(3): LISTEN_PID, LISTEN_FDS, fd 3)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    if count > 1:
        raise OptionError(f"systemd passed {count} sockets; exactly one is supported")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return SD_LISTEN_FDS_START


def _mount_paths(opts: Options, paths: list[str]) -> None:
    """``mount [SHARED_DIR] MOUNTPOINT``: SHARED_DIR for the passthrough only."""
    if opts.backend != "passthrough" and opts.shared_dir:
        raise OptionError(f"--shared-dir makes no sense with --backend {opts.backend}")
    want = 2 if opts.backend == "passthrough" else 1
    if opts.shared_dir and want == 2:
        want = 1  # --shared-dir given as an option
    if len(paths) != want:
        usage = "SHARED_DIR MOUNTPOINT" if want == 2 else "MOUNTPOINT"
        raise OptionError(f"mount: expected {usage}, got {len(paths)} path(s)")
    if opts.socket_path is not None or opts.fd is not None:
        raise OptionError("mount: --socket-path/--fd make no sense for a host mount")
    if want == 2:
        opts.shared_dir = paths[0]
    opts.mountpoint = paths[-1]


def _dest(opt: str) -> str:
    return opt.lstrip("-").replace("-", "_")


def _check_maps(opts: Options) -> None:
    """Refuse malformed --xattrmap / --translate-* at startup, with the parser's message."""
    from virtiofsd_py.fs.passthrough.idmap import IdMap, IdMapError
    from virtiofsd_py.fs.passthrough.xattrmap import XattrMap, XattrMapError

    try:
        if opts.xattrmap is not None:
            XattrMap(opts.xattrmap)
        IdMap(opts.translate_uid)
        IdMap(opts.translate_gid)
    except (XattrMapError, IdMapError) as e:
        raise OptionError(str(e)) from None


def _check_confinement(opts: Options) -> None:
    """--sandbox/--seccomp/--modcaps/--uid-map/--gid-map (confinement.py)."""
    from virtiofsd_py.confine.process import ConfinementError, check_options
    from virtiofsd_py.host.capabilities import CapabilityError

    try:
        check_options(opts)
    except (ConfinementError, CapabilityError) as e:
        raise OptionError(str(e)) from None


def parse_args(argv: list[str] | None = None, *, mount: bool = False) -> Options:
    """Options of the daemon, or of ``virtiofsd-py mount`` (``mount``: no socket, paths)."""
    ns = build_parser(mount=mount).parse_args(argv)
    try:
        deprecations = legacy_options.apply(ns)
    except legacy_options.LegacyOptionError as e:
        raise OptionError(str(e)) from None
    used = [f for f in _NOT_BUILT_FLAGS if getattr(ns, _dest(f))]
    used += [o for o in _NOT_BUILT_VALUES if getattr(ns, _dest(o))]
    if used:
        raise OptionError(
            f"{', '.join(used)}: not implemented yet in virtiofsd-py; refusing to start "
            "rather than ignore it"
        )
    opts = Options(
        shared_dir=ns.shared_dir,
        socket_path=ns.socket_path,
        fd=ns.fd,
        socket_group=ns.socket_group,
        tag=ns.tag,
        thread_pool_size=ns.thread_pool_size,
        cache=ns.cache,
        readonly=ns.readonly,
        xattr=ns.xattr,
        readdirplus=not ns.no_readdirplus,
        allow_direct_io=ns.allow_direct_io,
        rlimit_nofile=ns.rlimit_nofile,
        log_level=ns.log_level,
        syslog=ns.syslog,
        print_capabilities=ns.print_capabilities,
        sandbox=ns.sandbox,
        seccomp=ns.seccomp,
        inode_file_handles=ns.inode_file_handles,
        xattrmap=ns.xattrmap,
        posix_acl=ns.posix_acl,
        security_label=ns.security_label,
        writeback=ns.writeback,
        allow_mmap=ns.allow_mmap,
        killpriv_v2=ns.killpriv_v2,
        announce_submounts=ns.announce_submounts,
        preserve_noatime=ns.preserve_noatime,
        translate_uid=tuple(ns.translate_uid),
        translate_gid=tuple(ns.translate_gid),
        migration_mode=ns.migration_mode,
        migration_on_error=ns.migration_on_error,
        migration_verify_handles=ns.migration_verify_handles,
        migration_confirm_paths=ns.migration_confirm_paths,
        flock_locks=ns.flock_locks,
        posix_locks=ns.posix_locks,
        metrics=ns.metrics,
        deprecations=tuple(deprecations),
        backend=ns.backend,
        modcaps=ns.modcaps,
        uid_map=tuple(ns.uid_map),
        gid_map=tuple(ns.gid_map),
    )
    # As the Rust virtiofsd: these need xattrs, and ACLs rule out id translation.
    if opts.xattrmap is not None or opts.posix_acl or opts.security_label:
        opts.xattr = True
    if opts.posix_acl and (opts.translate_uid or opts.translate_gid):
        raise OptionError("--translate-uid/--translate-gid cannot be used with --posix-acl")
    _check_maps(opts)
    _check_confinement(opts)
    if opts.metrics is not None:
        from virtiofsd_py.app.metrics_server import AddressError, parse_address

        try:
            parse_address(opts.metrics)
        except AddressError as e:
            raise OptionError(str(e)) from None
    if opts.print_capabilities:
        return opts
    if opts.backend == "memory":
        opts.flock_locks = opts.posix_locks = False  # fs/memory.py takes no locks
    if mount:
        _mount_paths(opts, ns.paths)
        # The mount must be made in the host's mount namespace; the namespace and
        # chroot sandboxes are not applied to host mounts (yet): say so, never weaken
        # isolation silently.  Without an explicit --sandbox the default is none here.
        explicit = any(a == "--sandbox" or a.startswith("--sandbox=") for a in argv or ())
        if explicit and opts.sandbox != "none":
            raise OptionError(f"mount: --sandbox {opts.sandbox} is not built for host mounts")
        opts.sandbox = "none"
    elif opts.backend == "passthrough" and not opts.shared_dir:
        raise OptionError("--shared-dir is required")
    elif opts.backend != "passthrough" and opts.shared_dir:
        raise OptionError(f"--shared-dir makes no sense with --backend {opts.backend}")
    if mount:
        if opts.thread_pool_size < 0:
            raise OptionError("--thread-pool-size must be >= 0")
        return opts
    if opts.socket_path is not None and opts.fd is not None:
        raise OptionError("--socket-path and --fd are mutually exclusive")
    if opts.socket_path is None and opts.fd is None:
        opts.fd = systemd_listen_fd()
        if opts.fd is None:
            raise OptionError("one of --socket-path and --fd is required (or systemd's LISTEN_FDS)")
    if opts.thread_pool_size < 0:
        raise OptionError("--thread-pool-size must be >= 0")
    if opts.tag is not None and not 0 < len(opts.tag.encode()) <= 36:
        raise OptionError("--tag must be 1 to 36 bytes")
    return opts
