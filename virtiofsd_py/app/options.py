"""Command-line options, named and spelled as the Rust virtiofsd names them.

Existing QEMU and libvirt command lines must keep working, so every option
the Rust virtiofsd has is recognised and acts.  Each option is declared
once, as a field of :class:`Options`: its type (``bool``: a switch;
``int``; a ``Literal``: the words it takes; ``tuple[str, ...]``: repeatable)
and its :class:`Opt` record (flags, help, the man page's group, the legacy
``-o`` items that set it).  From that one table come the argparse parser
and ``--help`` (:func:`build_parser`), the typed result (:func:`parse_args`),
the man page (``app/manpage.py``) and the legacy syntax (``legacy_options``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeVar, get_args, get_origin, get_type_hints

from virtiofsd_py import __version__
from virtiofsd_py.app import custom_backend, legacy_options
from virtiofsd_py.app.legacy_options import Item, Switch, Valued, switches
from virtiofsd_py.app.metrics_server import AddressError, parse_address
from virtiofsd_py.confine.process import ConfinementError, check_options
from virtiofsd_py.confine.sandbox import MODES as SANDBOX_MODES
from virtiofsd_py.confine.sandbox import SandboxMode
from virtiofsd_py.fs.cache import CacheMode
from virtiofsd_py.fs.passthrough.file_handles import InodeFileHandles
from virtiofsd_py.fs.passthrough.idmap import IdMap, IdMapError
from virtiofsd_py.fs.passthrough.migration.config import MigrationMode, OnError
from virtiofsd_py.fs.passthrough.xattrmap import XattrMap, XattrMapError
from virtiofsd_py.host import native
from virtiofsd_py.host.capabilities import CapabilityError

LogLevel = Literal["error", "warn", "info", "debug", "trace", "off"]
#: The ``--seccomp`` actions (``host/seccomp.py`` ACTIONS).
SeccompAction = Literal["none", "kill", "log", "trap"]

SD_LISTEN_FDS_START: Final = 3
MOUNT_HELP: Final = (
    "Serve the backend through the host kernel's FUSE on MOUNTPOINT instead of a "
    "vhost-user socket (SHARED_DIR is the passthrough's --shared-dir)"
)

# The groups of --help and of the man page's OPTIONS, in this order.
SOCKET: Final = "Socket"
SHARE: Final = "Share"
GUEST: Final = "Guest features"
CONFINEMENT: Final = "Confinement"
MIGRATION: Final = "Migration"
PROCESS: Final = "Process"
LEGACY: Final = "Legacy syntax"
GROUPS: Final = (SOCKET, SHARE, GUEST, CONFINEMENT, MIGRATION, PROCESS, LEGACY)


#: The C daemon's log levels (``-o log_level=``), with the names they have here.
_LEGACY_LOG_LEVELS: Final = {
    "err": "error", "error": "error", "warn": "warn", "info": "info", "debug": "debug",
}  # fmt: skip


class OptionError(Exception):
    """A bad command line; the message is for the operator (exit status 2)."""


@dataclass(frozen=True, slots=True)
class Opt:
    """How one option is spelled, documented and reached through ``-o``.

    The type and default are those of its :class:`Options` field.  An entry
    of :data:`EXTRA` (no field of its own) names its argparse ``action`` and,
    where it sets a field, the field as ``dest``.
    """

    flags: tuple[str, ...]
    help: str
    group: str
    metavar: str | None = None
    #: ``-o`` items of the legacy C virtiofsd that set this option.
    legacy: tuple[Item, ...] = ()
    #: Deprecated words still accepted, each with the word that replaced it.
    renamed: Mapping[str, str] = field(default_factory=dict)
    action: str | None = None
    dest: str | None = None


_T = TypeVar("_T")


def opt(
    default: _T,
    *flags: str,
    help: str,
    group: str,
    metavar: str | None = None,
    legacy: tuple[Item, ...] = (),
    renamed: Mapping[str, str] | None = None,
) -> _T:
    """A field of :class:`Options` declared as a command-line option."""
    record = Opt(flags, help, group, metavar, legacy, dict(renamed or {}))
    return field(default=default, metadata={"opt": record})


@dataclass(slots=True)
class Options:
    """The daemon's options: the table every other form is made from."""

    # -- socket ---------------------------------------------------------------------
    socket_path: str | None = opt(
        None, "--socket-path", "--socket", metavar="PATH", group=SOCKET,
        help="vhost-user socket path (--socket is its deprecated name)",
    )  # fmt: skip
    socket_group: str | None = opt(
        None, "--socket-group", metavar="GROUP", group=SOCKET,
        help="Name of the group to own the socket",
    )  # fmt: skip
    fd: int | None = opt(
        None, "--fd", metavar="FD", group=SOCKET,
        help="File descriptor of an already listening socket",
    )  # fmt: skip
    tag: str | None = opt(
        None, "--tag", metavar="TAG", group=SOCKET,
        help="Tag the virtio device advertises (offers VHOST_USER_PROTOCOL_F_CONFIG)",
    )  # fmt: skip
    # -- what is shared -------------------------------------------------------------
    shared_dir: str | None = opt(
        None, "--shared-dir", metavar="DIR", group=SHARE, legacy=(Valued("source"),),
        help="Shared directory path",
    )  # fmt: skip
    backend: str = opt(
        "passthrough", "--backend", group=SHARE, metavar="passthrough|memory|MODULE:FACTORY",
        help="virtiofsd-py only: what to serve, the shared directory (passthrough), "
        "a file system held in memory (memory; no --shared-dir), or what FACTORY in "
        "MODULE (a module name or a .py file) returns when called with the "
        "--backend-option values: a Filesystem, sync or async, or a pyfuse3.Operations "
        "(then --sandbox and --seccomp default to none). Default passthrough",
    )  # fmt: skip
    backend_option: tuple[str, ...] = opt(
        (), "--backend-option", metavar="KEY=VALUE", group=SHARE,
        help="virtiofsd-py only, repeatable: KEY=VALUE passed to a MODULE:FACTORY "
        "--backend's factory as the keyword argument KEY (a string)",
    )  # fmt: skip
    cache: CacheMode = opt(
        "auto", "--cache", group=SHARE,
        legacy=(Valued("cache", {"none": "never", "auto": "auto", "always": "always",
                                 "metadata": "metadata"}),),
        help="Cache policy",
    )  # fmt: skip
    readonly: bool = opt(
        False, "--readonly", group=SHARE, help="Share is read-only: every change gets EROFS"
    )
    xattr: bool = opt(
        False, "--xattr", group=SHARE, legacy=switches("xattr"),
        help="Enable extended attributes",
    )  # fmt: skip
    xattrmap: str | None = opt(
        None, "--xattrmap", metavar="RULES", group=SHARE, legacy=(Valued("xattrmap"),),
        help="Rules translating xattr names between guest and host (implies --xattr)",
    )  # fmt: skip
    posix_acl: bool = opt(
        False, "--posix-acl", group=SHARE, legacy=switches("posix_acl"),
        help="Enable POSIX ACLs (implies --xattr)",
    )  # fmt: skip
    security_label: bool = opt(
        False, "--security-label", group=SHARE, legacy=switches("security_label"),
        help="Set the guest's security label on new nodes (implies --xattr)",
    )  # fmt: skip
    translate_uid: tuple[str, ...] = opt(
        (), "--translate-uid", metavar="MAP", group=SHARE,
        help="UID translation: guest|host|squash-guest|squash-host|map:A:B:N, forbid-guest:A:N",
    )  # fmt: skip
    translate_gid: tuple[str, ...] = opt(
        (), "--translate-gid", metavar="MAP", group=SHARE,
        help="GID translation, as --translate-uid",
    )  # fmt: skip
    inode_file_handles: InodeFileHandles = opt(
        "never", "--inode-file-handles", group=SHARE, renamed={"fallback": "prefer"},
        help="Keep inodes as file handles instead of fds; 'prefer' falls back to fds, "
        "'mandatory' refuses to start without them",
    )  # fmt: skip
    announce_submounts: bool = opt(
        False, "--announce-submounts", group=SHARE,
        legacy=switches("announce_submounts", negated=False),
        help="Tell the guest about host mounts inside the share (FUSE_ATTR_SUBMOUNT)",
    )  # fmt: skip
    allow_direct_io: bool = opt(
        False, "--allow-direct-io", group=SHARE, legacy=switches("allow_direct_io"),
        help="Honor O_DIRECT from the guest (default: strip it)",
    )  # fmt: skip
    preserve_noatime: bool = opt(
        False, "--preserve-noatime", group=SHARE, help="Keep O_NOATIME from the guest"
    )
    # -- what FUSE_INIT offers the guest --------------------------------------------
    readdirplus: bool = opt(
        True, "--no-readdirplus", group=GUEST, legacy=switches("readdirplus"),
        help="Disable READDIRPLUS",
    )  # fmt: skip
    writeback: bool = opt(
        False, "--writeback", group=GUEST, legacy=switches("writeback"),
        help="Enable the guest's writeback cache",
    )  # fmt: skip
    allow_mmap: bool = opt(
        False, "--allow-mmap", group=GUEST,
        help="Allow shared mmap of files opened with direct I/O",
    )  # fmt: skip
    killpriv_v2: bool = opt(
        False, "--killpriv-v2", group=GUEST, legacy=switches("killpriv_v2"),
        help="Let the daemon clear set-id bits on write/truncate (FUSE_HANDLE_KILLPRIV_V2)",
    )  # fmt: skip
    flock_locks: bool = opt(
        True, group=GUEST, legacy=switches("flock"),
        help="Forward the guest's flock() locks to the host (the default; no_flock keeps "
        "them in the guest)",
    )  # fmt: skip
    posix_locks: bool = opt(
        True, group=GUEST, legacy=switches("posix_lock"),
        help="Forward the guest's fcntl() locks to the host (the default; no_posix_lock "
        "keeps them in the guest)",
    )  # fmt: skip
    # -- confinement ------------------------------------------------------------------
    sandbox: SandboxMode = opt(
        "namespace", "--sandbox", group=CONFINEMENT,
        legacy=(Valued("sandbox", {m: m for m in SANDBOX_MODES}),),
        help="Sandbox mechanism: namespace (pid/mount/net namespaces, pivot_root), "
        "chroot (root only), none",
    )  # fmt: skip
    seccomp: SeccompAction = opt(
        "kill", "--seccomp", group=CONFINEMENT,
        help="Action on a system call outside the allow-list",
    )  # fmt: skip
    modcaps: str | None = opt(
        None, "--modcaps", metavar="CAPS", group=CONFINEMENT, legacy=(Valued("modcaps"),),
        help="Modify the kept capabilities, e.g. +sys_admin:-mknod",
    )  # fmt: skip
    uid_map: tuple[str, ...] = opt(
        (), "--uid-map", metavar=":NS_UID:HOST_UID:COUNT:", group=CONFINEMENT,
        help="UID map of the user namespace (unprivileged --sandbox namespace)",
    )  # fmt: skip
    gid_map: tuple[str, ...] = opt(
        (), "--gid-map", metavar=":NS_GID:HOST_GID:COUNT:", group=CONFINEMENT,
        help="GID map of the user namespace (unprivileged --sandbox namespace)",
    )  # fmt: skip
    # -- migration --------------------------------------------------------------------
    migration_mode: MigrationMode = opt(
        "find-paths", "--migration-mode", group=MIGRATION,
        help="Source: send paths or file handles to find inodes after migration",
    )  # fmt: skip
    migration_on_error: OnError = opt(
        "abort", "--migration-on-error", group=MIGRATION,
        help="Destination: an inode not found fails the migration (abort) or gets EIO",
    )  # fmt: skip
    migration_verify_handles: bool = opt(
        False, "--migration-verify-handles", group=MIGRATION,
        help="Destination: require each inode found to have the source's file handle",
    )  # fmt: skip
    migration_confirm_paths: bool = opt(
        False, "--migration-confirm-paths", group=MIGRATION,
        help="Source: re-check every path at switch-over",
    )  # fmt: skip
    # -- the process ------------------------------------------------------------------
    thread_pool_size: int = opt(
        0, "--thread-pool-size", metavar="N", group=PROCESS,
        help="Worker threads for requests; 0 serves each request queue on its own thread"
        " (compiled core) or on the event loop (pure-Python core)",
    )  # fmt: skip
    rlimit_nofile: int | None = opt(
        None, "--rlimit-nofile", metavar="N", group=PROCESS,
        help="Raise RLIMIT_NOFILE to N (default: the hard limit)",
    )  # fmt: skip
    log_level: LogLevel = opt(
        "info", "--log-level", group=PROCESS,
        legacy=(
            Valued("log_level", _LEGACY_LOG_LEVELS),
            Valued("loglevel", _LEGACY_LOG_LEVELS),
            Switch("debug", "debug"),
        ),
        help="Log level",
    )  # fmt: skip
    syslog: bool = opt(False, "--syslog", group=PROCESS, help="Log to syslog instead of stderr")
    metrics: str | None = opt(
        None, "--metrics", metavar="ADDR", group=PROCESS,
        help="Serve Prometheus metrics on a unix socket (PATH, unix:PATH) or a loopback "
        "TCP port ([127.0.0.1:|[::1]:]PORT); SIGUSR1 logs them in any case",
    )  # fmt: skip
    print_capabilities: bool = opt(
        False, "--print-capabilities", group=PROCESS,
        help="Print vhost-user.json backend program capabilities and exit",
    )  # fmt: skip
    # -- not options: what parsing concluded ------------------------------------------
    #: Deprecated syntax used on the command line: warnings to log at start-up.
    deprecations: tuple[str, ...] = ()
    #: ``virtiofsd-py mount``: where the host mount goes (mount.py).
    mountpoint: str | None = None


#: Parser entries that are no field of their own.
EXTRA: Final = (
    Opt(("--no-killpriv-v2",), "Disable KILLPRIV V2 support [default]", GUEST,
        action="store_false", dest="killpriv_v2"),
    Opt(("-h", "--help"), "Print the options and exit", PROCESS, action="help"),
    Opt(("-V", "--version"), "Print the version and exit", PROCESS, action="version"),
    Opt(("-o",), "Options in the legacy C virtiofsd format, e.g. source=DIR,cache=none,xattr "
        "[deprecated]", LEGACY, metavar="OPT[,OPT...]", action="append"),
    Opt(("-d",), "Same as --log-level debug [deprecated]", LEGACY, action="store_true"),
    Opt(("-f", "--foreground"), "No effect [deprecated]", LEGACY, action="store_true"),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Entry:
    """One row of the table: an option with its field's type and default."""

    name: str
    opt: Opt
    hint: Any
    default: Any

    @property
    def choices(self) -> tuple[str, ...]:
        """The words a ``Literal`` option takes (renamed ones not included)."""
        return get_args(self.hint) if get_origin(self.hint) is Literal else ()

    @property
    def base(self) -> Any:
        """The type without ``| None``."""
        if isinstance(self.hint, types.UnionType):
            kept = [a for a in get_args(self.hint) if a is not type(None)]
            return kept[0] if len(kept) == 1 else self.hint
        return self.hint

    @property
    def help(self) -> str:
        """The help text, with the default and the renamed words appended."""
        text = self.opt.help
        if (self.choices or self.base is int) and self.default is not None:
            text += f" (default {self.default})"
        for old, new in self.opt.renamed.items():
            text += f"; '{old}' is a deprecated name of '{new}'"
        return text


@functools.cache
def table() -> tuple[Entry, ...]:
    """Every field of :class:`Options` declared as an option, in declaration order."""
    hints = get_type_hints(Options)
    return tuple(
        Entry(f.name, f.metadata["opt"], hints[f.name], f.default)
        for f in fields(Options)
        if "opt" in f.metadata
    )


@functools.cache
def legacy_items() -> dict[str, tuple[str, Item]]:
    """``-o`` item name -> (field, item), from the table."""
    return {item.name: (e.name, item) for e in table() for item in e.opt.legacy}


def _arguments(e: Entry) -> dict[str, Any]:
    kw: dict[str, Any] = {"dest": e.name, "help": e.help, "default": e.default}
    if e.base is bool:
        kw["action"] = "store_false" if e.default else "store_true"
    elif e.choices:
        kw["choices"] = (*e.choices, *e.opt.renamed)
    elif get_origin(e.base) is tuple:
        kw.update(action="append", default=[], metavar=e.opt.metavar)
    else:
        kw["metavar"] = e.opt.metavar
        if e.base is int:
            kw["type"] = int
    return kw


def build_parser(*, mount: bool = False) -> argparse.ArgumentParser:
    """The parser of the daemon's command line, or (``mount``) of ``virtiofsd-py mount``."""
    ap = argparse.ArgumentParser(
        prog="virtiofsd-py mount" if mount else "virtiofsd-py",
        description="vhost-user virtio-fs back-end (a Python virtiofsd).",
        allow_abbrev=False,
        add_help=False,
    )
    if mount:
        ap.add_argument("paths", nargs="+", metavar="[SHARED_DIR] MOUNTPOINT", help=MOUNT_HELP)
    groups = {title: ap.add_argument_group(title) for title in GROUPS}
    for e in table():
        if e.opt.flags:
            groups[e.opt.group].add_argument(*e.opt.flags, **_arguments(e))
        else:  # set through -o only
            ap.set_defaults(**{e.name: e.default})
    for x in EXTRA:
        kw: dict[str, Any] = {"action": x.action, "help": x.help}
        if x.action == "version":
            kw["version"] = f"virtiofsd-py {__version__} ({native.describe()})"
        if x.dest is not None:
            kw["dest"] = x.dest
        if x.metavar is not None:
            kw["metavar"] = x.metavar
        groups[x.group].add_argument(*x.flags, **kw)
    return ap


def _renamed_values(ns: argparse.Namespace) -> list[str]:
    """Replace deprecated words by their new names; the warnings to log."""
    warnings = []
    for e in table():
        old = getattr(ns, e.name)
        if e.opt.renamed and old in e.opt.renamed:
            setattr(ns, e.name, e.opt.renamed[old])
            warnings.append(
                f"use of the deprecated value '{old}' for '{e.opt.flags[0]}': "
                f"please use '{e.opt.renamed[old]}'"
            )
    return warnings


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


def _check_values(opts: Options) -> None:
    """Refuse malformed values at start-up, with their parser's message:
    --xattrmap, --translate-*, --metrics and the confinement options."""
    try:
        if opts.xattrmap is not None:
            XattrMap(opts.xattrmap)
        IdMap(opts.translate_uid)
        IdMap(opts.translate_gid)
        check_options(opts)
        if opts.metrics is not None:
            parse_address(opts.metrics)
    except (XattrMapError, IdMapError, ConfinementError, CapabilityError, AddressError) as e:
        raise OptionError(str(e)) from None


def _explicit(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in argv)


def _custom_backend(opts: Options, argv: list[str]) -> None:
    """Check ``--backend MODULE:FACTORY`` and its options.  Such a back-end is
    code the confinement knows nothing of (paths of its own, any syscall):
    --sandbox and --seccomp default to none for it, and are applied if given."""
    if not custom_backend.is_custom(opts.backend):
        if opts.backend_option:
            raise OptionError("--backend-option needs a --backend MODULE:FACTORY")
        return
    try:
        custom_backend.split_spec(opts.backend)
        custom_backend.parse_options(opts.backend_option)
    except ValueError as e:
        raise OptionError(str(e)) from None
    if not _explicit(argv, "--sandbox"):
        opts.sandbox = "none"
    if not _explicit(argv, "--seccomp"):
        opts.seccomp = "none"


def parse_args(argv: list[str] | None = None, *, mount: bool = False) -> Options:
    """Options of the daemon, or of ``virtiofsd-py mount`` (``mount``: no socket, paths)."""
    ns = build_parser(mount=mount).parse_args(argv)
    try:
        deprecations = legacy_options.apply(ns, legacy_items())
    except legacy_options.LegacyOptionError as e:
        raise OptionError(str(e)) from None
    deprecations += _renamed_values(ns)
    values = {row.name: getattr(ns, row.name) for row in table()}
    for row in table():
        if get_origin(row.base) is tuple:
            values[row.name] = tuple(values[row.name])
    opts = Options(**values, deprecations=tuple(deprecations))
    # As the Rust virtiofsd: these need xattrs, and ACLs rule out id translation.
    if opts.xattrmap is not None or opts.posix_acl or opts.security_label:
        opts.xattr = True
    if opts.posix_acl and (opts.translate_uid or opts.translate_gid):
        raise OptionError("--translate-uid/--translate-gid cannot be used with --posix-acl")
    _check_values(opts)
    if opts.print_capabilities:
        return opts
    _custom_backend(opts, argv if argv is not None else sys.argv[1:])
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
    if opts.thread_pool_size < 0:
        raise OptionError("--thread-pool-size must be >= 0")
    if mount:
        return opts
    if opts.socket_path is not None and opts.fd is not None:
        raise OptionError("--socket-path and --fd are mutually exclusive")
    if opts.socket_path is None and opts.fd is None:
        opts.fd = systemd_listen_fd()
        if opts.fd is None:
            raise OptionError("one of --socket-path and --fd is required (or systemd's LISTEN_FDS)")
    if opts.tag is not None and not 0 < len(opts.tag.encode()) <= 36:
        raise OptionError("--tag must be 1 to 36 bytes")
    return opts
