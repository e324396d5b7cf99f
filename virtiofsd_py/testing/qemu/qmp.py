"""A small synchronous QMP client (QEMU docs/interop/qmp-spec.rst).

One JSON object per line in both directions. After the server's greeting the
client must send ``qmp_capabilities``. Replies carry the ``id`` of their
command; asynchronous ``event`` messages may arrive at any time and are
collected in ``events`` for ``wait_event``.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from typing import Any


class QMPError(Exception):
    """QEMU answered a command with an ``error`` object."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class QMPClient:
    """QMP over an already connected stream socket."""

    def __init__(self, sock: socket.socket, timeout: float = 30) -> None:
        self._sock = sock
        self._buf = b""
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        greeting = self._read_message(time.monotonic() + timeout)
        if "QMP" not in greeting:
            raise ConnectionError(f"not a QMP greeting: {greeting!r}")
        self.greeting: dict[str, Any] = greeting["QMP"]
        self.execute("qmp_capabilities", timeout=timeout)

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no QMP message before the deadline")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, timeout: float = 60, **arguments: Any) -> Any:
        """Run a command; return its ``return`` value or raise QMPError."""
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if "event" in reply:
                self.events.append(reply)
            elif reply.get("id") == msg_id:
                if "error" in reply:
                    raise QMPError(command, reply["error"])
                return reply.get("return")

    def wait_event(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """Remove and return the first collected or arriving event ``name``."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name:
                    return self.events.pop(i)
            msg = self._read_message(deadline)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        """Close the connection."""
        self._sock.close()
