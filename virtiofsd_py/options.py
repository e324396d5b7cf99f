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

CACHE_MODES = ("auto", "always", "metadata", "never")
SD_LISTEN_FDS_START = 3
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="virtiofsd-py",
        description="vhost-user virtio-fs back-end (a Python virtiofsd).",
        allow_abbrev=False,
    )
    add = ap.add_argument
    add("--shared-dir", metavar="DIR", help="Shared directory path")
    add("--tag", help="Tag the virtio device advertises (offers VHOST_USER_PROTOCOL_F_CONFIG)")
    add("--socket-path", metavar="PATH", help="vhost-user socket path")
    add("--socket", dest="socket_path", metavar="PATH", help=argparse.SUPPRESS)
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
    add("--no-killpriv-v2", dest="killpriv_v2", action="store_false", help=argparse.SUPPRESS)
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
        default="none",
        help="Sandbox mechanism; only 'none' is built so far (default none)",
    )
    add(
        "--seccomp",
        choices=("none", "kill", "log", "trap"),
        default="none",
        help="seccomp action; only 'none' is built so far (default none)",
    )
    add(
        "--inode-file-handles",
        choices=("never", "prefer", "mandatory"),
        default="never",
        help="Use file handles for inodes; 'prefer' falls back to fds (default never)",
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
    add("-f", "--foreground", action="store_true", help=argparse.SUPPRESS)
    add("-V", "--version", action="version", version="virtiofsd-py 0.1.0")
    # Recognised but not built yet: each refused with a message when used.
    for flag in _NOT_BUILT_FLAGS:
        add(flag, action="store_true", help=argparse.SUPPRESS)
    for opt in _NOT_BUILT_VALUES:
        add(opt, action="append", help=argparse.SUPPRESS)
    return ap


#: Options whose absence of implementation would change what the guest sees
#: or what isolation the operator asked for.
_NOT_BUILT_FLAGS: tuple[str, ...] = ()
_NOT_BUILT_VALUES = (
    "--uid-map",
    "--gid-map",
    "--modcaps",
    "-o",
)


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


def _dest(opt: str) -> str:
    return opt.lstrip("-").replace("-", "_")


def _check_maps(opts: Options) -> None:
    """Refuse malformed --xattrmap / --translate-* at startup, with the parser's message."""
    from virtiofsd_py.fs.idmap import IdMap, IdMapError
    from virtiofsd_py.fs.xattrmap import XattrMap, XattrMapError

    try:
        if opts.xattrmap is not None:
            XattrMap(opts.xattrmap)
        IdMap(opts.translate_uid)
        IdMap(opts.translate_gid)
    except (XattrMapError, IdMapError) as e:
        raise OptionError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> Options:
    ns = build_parser().parse_args(argv)
    used = [f for f in _NOT_BUILT_FLAGS if getattr(ns, _dest(f))]
    used += [o for o in _NOT_BUILT_VALUES if getattr(ns, _dest(o))]
    if used:
        raise OptionError(
            f"{', '.join(used)}: not implemented yet in virtiofsd-py; refusing to start "
            "rather than ignore it"
        )
    if ns.sandbox != "none":
        raise OptionError(f"--sandbox {ns.sandbox}: not implemented yet; use --sandbox none")
    if ns.seccomp != "none":
        raise OptionError(f"--seccomp {ns.seccomp}: not implemented yet; use --seccomp none")
    if ns.inode_file_handles == "mandatory":
        raise OptionError("--inode-file-handles mandatory: not implemented yet")
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
    )
    # As the Rust virtiofsd: these need xattrs, and ACLs rule out id translation.
    if opts.xattrmap is not None or opts.posix_acl or opts.security_label:
        opts.xattr = True
    if opts.posix_acl and (opts.translate_uid or opts.translate_gid):
        raise OptionError("--translate-uid/--translate-gid cannot be used with --posix-acl")
    _check_maps(opts)
    if opts.print_capabilities:
        return opts
    if not opts.shared_dir:
        raise OptionError("--shared-dir is required")
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
