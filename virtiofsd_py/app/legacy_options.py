"""The legacy C virtiofsd's ``-o opt[,opt...]`` and ``-d`` syntax, deprecated.

libvirt still generates ``-o source=DIR,cache=none,xattr,...`` for a daemon
whose vhost-user descriptor lacks the ``separate-options`` feature, and old
scripts carry it too.  The Rust virtiofsd accepts it (with a deprecation
warning) and so do we: ``apply`` rewrites the parsed namespace as if the
modern options had been given, returning the warnings to log.

Option names are those of QEMU's docs/tools/virtiofsd.rst (the C daemon);
``loglevel`` is the Rust daemon's spelling of ``log_level``.  An option
whose meaning we cannot give (``timeout``, ``norace``, enabling ``modcaps``)
is refused, never dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

DEPRECATED_O = (
    "use of the deprecated option format '-o': please give options separately "
    "(e.g. '--cache auto' instead of '-o cache=auto')"
)
DEPRECATED_D = "use of the deprecated flag '-d': please use '--log-level debug'"


class LegacyOptionError(ValueError):
    """An ``-o`` item we do not know or cannot honour."""


def split_items(value: str) -> list[str]:
    """Split on commas; ``,,`` is a literal comma (QEMU option syntax, as libvirt
    escapes paths with virQEMUBuildBufferEscapeComma)."""
    items: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(value):
        c = value[i]
        if c == ",":
            if value.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    items.append("".join(cur))
    return [item for item in items if item]


_CACHE = {"none": "never", "auto": "auto", "always": "always", "metadata": "metadata"}
_LOG_LEVELS = {"err": "error", "error": "error", "warn": "warn", "info": "info", "debug": "debug"}
_SANDBOX = ("namespace", "chroot", "none")

#: Flags: item -> (namespace attribute, value).
_FLAGS: dict[str, tuple[str, object]] = {
    "xattr": ("xattr", True),
    "no_xattr": ("xattr", False),
    "readdirplus": ("no_readdirplus", False),
    "no_readdirplus": ("no_readdirplus", True),
    "writeback": ("writeback", True),
    "no_writeback": ("writeback", False),
    "allow_direct_io": ("allow_direct_io", True),
    "no_allow_direct_io": ("allow_direct_io", False),
    "announce_submounts": ("announce_submounts", True),
    "killpriv_v2": ("killpriv_v2", True),
    "no_killpriv_v2": ("killpriv_v2", False),
    "posix_acl": ("posix_acl", True),
    "no_posix_acl": ("posix_acl", False),
    "security_label": ("security_label", True),
    "no_security_label": ("security_label", False),
    # Lock forwarding to the host: on by default here, as posix_lock was in
    # the C daemon; "no_*" keeps the guest's locks local to the guest.
    "flock": ("flock_locks", True),
    "no_flock": ("flock_locks", False),
    "posix_lock": ("posix_locks", True),
    "no_posix_lock": ("posix_locks", False),
    "debug": ("log_level", "debug"),
}


def _choice(table: dict[str, str] | tuple[str, ...], key: str) -> Callable[[str], str]:
    def conv(value: str) -> str:
        if value not in table:
            raise LegacyOptionError(f"invalid value {value!r} for '-o {key}'")
        return table[value] if isinstance(table, dict) else value

    return conv


def _text(value: str) -> str:
    return value


#: Valued items: key -> (namespace attribute, converter, appends).
_VALUED: dict[str, tuple[str, Callable[[str], str], bool]] = {
    "source": ("shared_dir", _text, False),
    "cache": ("cache", _choice(_CACHE, "cache"), False),
    "log_level": ("log_level", _choice(_LOG_LEVELS, "log_level"), False),
    "loglevel": ("log_level", _choice(_LOG_LEVELS, "loglevel"), False),
    "sandbox": ("sandbox", _choice(_SANDBOX, "sandbox"), False),
    "xattrmap": ("xattrmap", _text, False),
    "modcaps": ("modcaps", _text, True),
}


def apply(ns: argparse.Namespace) -> list[str]:
    """Fold ``ns.o`` (list of ``-o`` values) and ``ns.d`` into modern options.

    As in the Rust virtiofsd, ``-o`` items win over separate options given
    on the same command line.  Returns the deprecation warnings to log.
    """
    warnings: list[str] = []
    values: list[str] = getattr(ns, "o", None) or []
    for value in values:
        for item in split_items(value):
            key, eq, arg = item.partition("=")
            if eq:
                if key not in _VALUED:
                    raise LegacyOptionError(f"unsupported compat option '-o {item}'")
                attr, conv, appends = _VALUED[key]
                converted = conv(arg)
                if appends:
                    setattr(ns, attr, [*(getattr(ns, attr, None) or []), converted])
                else:
                    setattr(ns, attr, converted)
            elif item in _FLAGS:
                attr, flag = _FLAGS[item]
                setattr(ns, attr, flag)
            else:
                raise LegacyOptionError(f"unsupported compat option '-o {item}'")
    if values:
        warnings.append(DEPRECATED_O)
    ns.o = None
    if getattr(ns, "d", False):
        ns.log_level = "debug"
        warnings.append(DEPRECATED_D)
    if getattr(ns, "inode_file_handles", None) == "fallback":
        ns.inode_file_handles = "prefer"
        warnings.append(
            "use of the deprecated value 'fallback' for '--inode-file-handles': please use 'prefer'"
        )
    return warnings
