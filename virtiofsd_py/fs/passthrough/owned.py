"""``OwnedFd``: the base of every table entry that owns one host fd.

The entry closes its fd once, when asked or when the last reference to it
dies; an operation that keeps the entry in a local variable therefore keeps
the fd open (and its number from being reused) until it is done.
"""

from __future__ import annotations

import os


class OwnedFd:
    __slots__ = ("fd",)

    fd: int  # -1 once closed

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()
