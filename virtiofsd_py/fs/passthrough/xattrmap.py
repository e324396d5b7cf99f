"""``--xattrmap``: rename, hide or refuse extended attribute names.

Rule syntax (Rust virtiofsd ``doc/xattr-mapping.md``): rules follow each
other, optionally separated by white space; each rule's first character is
its field separator::

    :type:scope:key:prepend:      type  = prefix | ok | bad | unsupported
    :map:key:prepend:             scope = client | server | all

The first matching rule decides.  A *client* name (getxattr, setxattr,
removexattr) matches when it starts with ``key``; a *server* name (each
name listxattr returns from the host) matches when it starts with
``prepend``.

=============  ==============================  ==============================
type           client name                     server name
=============  ==============================  ==============================
prefix         ``prepend + name`` to the host  ``name[len(prepend):]`` shown
ok             unchanged                       shown unchanged
bad            EPERM (getxattr: ENODATA)       hidden
unsupported    ENOTSUP                         hidden
=============  ==============================  ==============================

``map`` must be the last rule and expands to ``prefix:all:key:prepend``,
then (``key`` not empty) ``bad:all:prepend:key`` and ``ok:all::``, or (``key``
empty) ``bad:all::``.  A name no rule matches is refused (EPERM) or hidden.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Final, Literal

RuleType = Literal["prefix", "ok", "bad", "unsupported"]
_TYPES: Final = ("prefix", "ok", "bad", "unsupported", "map")
SECURITY_CAPABILITY: Final = b"security.capability"
_SCOPES: Final = {"client": (True, False), "server": (False, True), "all": (True, True)}


class XattrMapError(ValueError):
    """A --xattrmap string that does not parse; the message names the rule."""


@dataclass(frozen=True, slots=True)
class Rule:
    type: RuleType
    client: bool
    server: bool
    key: bytes
    prepend: bytes


def _fields(text: str, pos: int, count: int, rule_no: int) -> tuple[list[str], int]:
    sep = text[pos]
    out: list[str] = []
    pos += 1
    for _ in range(count):
        end = text.find(sep, pos)
        if end < 0:
            raise XattrMapError(f"xattrmap rule {rule_no}: incomplete rule (separator {sep!r})")
        out.append(text[pos:end])
        pos = end + 1
    return out, pos


def parse(text: str) -> tuple[Rule, ...]:
    """Parse a --xattrmap string into its (expanded) rules."""
    rules: list[Rule] = []
    pos = 0
    n = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            break
        n += 1
        if text[pos].isalnum():
            raise XattrMapError(f"xattrmap rule {n}: the separator must not be {text[pos]!r}")
        sep = text[pos]
        # Peek at the type to know how many fields follow.
        end = text.find(sep, pos + 1)
        kind = text[pos + 1 : end] if end >= 0 else ""
        if kind not in _TYPES:
            raise XattrMapError(
                f"xattrmap rule {n}: type {kind!r} is not one of {', '.join(_TYPES)}"
            )
        if kind == "map":
            (_, key, prepend), pos = _fields(text, pos, 3, n)
            if text[pos:].strip():
                raise XattrMapError(f"xattrmap rule {n}: a map rule must be the last rule")
            rules.extend(_expand_map(key.encode(), prepend.encode()))
            continue
        (_, scope, key, prepend), pos = _fields(text, pos, 4, n)
        if scope not in _SCOPES:
            raise XattrMapError(
                f"xattrmap rule {n}: scope {scope!r} is not one of {', '.join(_SCOPES)}"
            )
        client, server = _SCOPES[scope]
        rules.append(Rule(kind, client, server, key.encode(), prepend.encode()))  # type: ignore[arg-type]
    if not rules:
        raise XattrMapError("xattrmap: no rules")
    return tuple(rules)


def _expand_map(key: bytes, prepend: bytes) -> list[Rule]:
    out = [Rule("prefix", True, True, key, prepend)]
    if key:
        out.append(Rule("bad", True, True, prepend, key))
        out.append(Rule("ok", True, True, b"", b""))
    else:
        out.append(Rule("bad", True, True, b"", b""))
    return out


def _err(code: int, name: bytes) -> OSError:
    return OSError(code, f"xattr {name!r}: {os.strerror(code)} (xattrmap)")


class XattrMap:
    """A parsed --xattrmap, applied to names in both directions."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.rules = parse(text)

    def to_host(self, name: bytes) -> bytes:
        """The host name for a guest name; EPERM (bad, no rule) or ENOTSUP."""
        for r in self.rules:
            if r.client and name.startswith(r.key):
                if r.type == "prefix":
                    return r.prepend + name
                if r.type == "ok":
                    return name
                raise _err(errno.ENOTSUP if r.type == "unsupported" else errno.EPERM, name)
        raise _err(errno.EPERM, name)

    def to_guest(self, name: bytes) -> bytes | None:
        """The guest name for a host name, or None when it is hidden."""
        for r in self.rules:
            if r.server and name.startswith(r.prepend):
                if r.type == "prefix":
                    return name[len(r.prepend) :]
                if r.type == "ok":
                    return name
                return None
        return None

    def remapped_capability(self) -> bytes | None:
        """Where the guest's ``security.capability`` lives on the host, if renamed.

        The host kernel clears ``security.capability`` when a file is written,
        truncated or chowned, so a modified binary loses its file
        capabilities.  Once a rule renames that attribute (say to
        ``user.virtiofs.security.capability``), the kernel no longer knows to
        clear it and the daemon must (CVE-2021-20263).  None when the name is
        not renamed or is refused outright (the guest cannot set it then).
        """
        try:
            host = self.to_host(SECURITY_CAPABILITY)
        except OSError:
            return None
        return None if host == SECURITY_CAPABILITY else host
