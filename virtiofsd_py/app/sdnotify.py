"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

The protocol is newline-separated ``KEY=VALUE`` assignments in a single
datagram on an ``AF_UNIX``/``SOCK_DGRAM`` socket (sd_notify(3), "Notes").
``$NOTIFY_SOCKET`` is a filesystem path, or an abstract socket name written
with a leading ``@``.  Without the variable every call is a no-op, so the
daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("virtiofsd_py.app.sdnotify")


def notify_address() -> str | bytes | None:
    """Where to send, from ``$NOTIFY_SOCKET``; None when unset or unsupported."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        return b"\0" + addr[1:].encode()
    if addr[0] == "/":
        return addr
    log.warning("NOTIFY_SOCKET=%s: only unix socket paths and @abstract names are supported", addr)
    return None


class Notifier:
    """Notifications to the service manager of this process (``$NOTIFY_SOCKET``).

    ``prepare`` connects once, so later notifications work from inside a
    sandbox (no path lookup, only ``send``); unprepared, each one opens its
    own socket.
    """

    def __init__(self) -> None:
        self._connected: socket.socket | None = None

    def prepare(self) -> None:
        """Connect to ``$NOTIFY_SOCKET`` now (before the sandbox hides its path)."""
        addr = notify_address()
        if addr is None or self._connected is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(addr)
        except OSError as e:
            s.close()
            log.warning("sd_notify: cannot connect to %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
            return
        self._connected = s

    def close(self) -> None:
        s, self._connected = self._connected, None
        if s is not None:
            s.close()

    def notify(self, *assignments: str) -> bool:
        """Send ``assignments`` (e.g. ``"READY=1"``, ``"STATUS=..."``) in one datagram.

        Returns whether a datagram was sent.  A failure is logged, never raised:
        the service manager being gone must not take the daemon down.
        """
        for a in assignments:
            if "=" not in a or "\n" in a:
                raise ValueError(f"not a KEY=VALUE line: {a!r}")
        addr = notify_address()
        if addr is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._connected is not None:
                self._connected.send(data)
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                    s.sendto(data, addr)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
            return False
        return True

    def ready(self, status: str) -> bool:
        """Tell the service manager that startup finished (Type=notify)."""
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")
