"""The legacy C virtiofsd's ``-o opt[,opt...]`` and ``-d`` syntax, deprecated.

libvirt still generates ``-o source=DIR,cache=none,xattr,...`` for a daemon
whose vhost-user descriptor lacks the ``separate-options`` feature, and old
scripts carry it too.  The Rust virtiofsd accepts it (with a deprecation
warning) and so do we: ``apply`` rewrites the parsed namespace as if the
modern options had been given, returning the warnings to log.

Which item sets which option is declared with the option itself, in the
table of ``options.py`` (its ``legacy`` items); this module knows only the
syntax.  Item names are those of QEMU's docs/tools/virtiofsd.rst (the C
daemon); ``loglevel`` is the Rust daemon's spelling of ``log_level``.  An
item whose meaning we cannot give (``timeout``, ``norace``, ...) is refused,
never dropped.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

DEPRECATED_O = (
    "use of the deprecated option format '-o': please give options separately "
    "(e.g. '--cache auto' instead of '-o cache=auto')"
)
DEPRECATED_D = "use of the deprecated flag '-d': please use '--log-level debug'"


class LegacyOptionError(ValueError):
    """An ``-o`` item we do not know or cannot honour."""


@dataclass(frozen=True, slots=True)
class Switch:
    """``-o NAME``: sets its option to ``value``."""

    name: str
    value: object


@dataclass(frozen=True, slots=True)
class Valued:
    """``-o NAME=VALUE``: the legacy spellings accepted, each with the value it
    stands for; None: any text, taken as it is."""

    name: str
    values: Mapping[str, str] | None = None


Item = Switch | Valued


def switches(name: str, *, negated: bool = True) -> tuple[Switch, ...]:
    """``NAME`` turns a switch on and (``negated``) ``no_NAME`` turns it off."""
    on = Switch(name, True)
    return (on, Switch(f"no_{name}", False)) if negated else (on,)


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


def _set(ns: argparse.Namespace, dest: str, item: Item, arg: str | None) -> None:
    if isinstance(item, Switch):
        setattr(ns, dest, item.value)
        return
    assert arg is not None
    if item.values is not None:
        if arg not in item.values:
            raise LegacyOptionError(f"invalid value {arg!r} for '-o {item.name}'")
        arg = item.values[arg]
    setattr(ns, dest, arg)


def apply(ns: argparse.Namespace, items: Mapping[str, tuple[str, Item]]) -> list[str]:
    """Fold ``ns.o`` (the ``-o`` values) and ``ns.d`` into modern options.

    ``items``: item name -> (namespace attribute, item), from the options
    table.  As in the Rust virtiofsd, ``-o`` items win over separate options
    given on the same command line.  Returns the deprecation warnings to log.
    """
    warnings: list[str] = []
    values: list[str] = getattr(ns, "o", None) or []
    for value in values:
        for text in split_items(value):
            key, eq, arg = text.partition("=")
            entry = items.get(key)
            if entry is None or isinstance(entry[1], Valued) != bool(eq):
                raise LegacyOptionError(f"unsupported compat option '-o {text}'")
            dest, item = entry
            _set(ns, dest, item, arg if eq else None)
    if values:
        warnings.append(DEPRECATED_O)
    ns.o = None
    if getattr(ns, "d", False):
        ns.log_level = "debug"
        warnings.append(DEPRECATED_D)
    return warnings
