"""Keep only the capabilities passthrough needs (``--modcaps`` to adjust).

As the Rust virtiofsd: a daemon running as root (or as root of its own user
namespace) keeps CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD
and SETFCAP, plus DAC_READ_SEARCH, which open_by_handle_at(2) needs (file
handles for migration and ``--inode-file-handles``).  Everything else goes
from the effective, permitted and inheritable sets, the ambient set is
cleared, and the bounding set is cut to the same list (PR_CAPBSET_DROP), so
nothing can win them back.  capabilities(7); capset(2) with
``_LINUX_CAPABILITY_VERSION_3``.

Capabilities are per thread: :func:`restrict` runs before the event loop
and the worker threads exist, and they inherit the result.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable
from typing import Final

from virtiofsd_py.host import syscalls
from virtiofsd_py.host.syscalls import CapData

#: capability.h numbers, by the names --modcaps uses (lower case, no ``cap_``).
NAMES: Final[dict[str, int]] = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "linux_immutable": 9,
    "net_bind_service": 10,
    "net_broadcast": 11,
    "net_admin": 12,
    "net_raw": 13,
    "ipc_lock": 14,
    "ipc_owner": 15,
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_pacct": 20,
    "sys_admin": 21,
    "sys_boot": 22,
    "sys_nice": 23,
    "sys_resource": 24,
    "sys_time": 25,
    "sys_tty_config": 26,
    "mknod": 27,
    "lease": 28,
    "audit_write": 29,
    "audit_control": 30,
    "setfcap": 31,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "wake_alarm": 35,
    "block_suspend": 36,
    "audit_read": 37,
    "perfmon": 38,
    "bpf": 39,
    "checkpoint_restore": 40,
}

DEFAULT_KEEP: Final = frozenset(
    NAMES[n]
    for n in (
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "setgid",
        "setuid",
        "mknod",
        "setfcap",
    )
)


class CapabilityError(Exception):
    """A bad ``--modcaps`` or a capset that failed; the message is for the operator."""


def thread_caps() -> ctypes.Array[CapData]:
    """The calling thread's capability sets, as two words."""
    return syscalls.capget()


def set_thread_caps(data: ctypes.Array[CapData]) -> None:
    """Set the calling thread's capability sets (capabilities are per thread)."""
    syscalls.capset(data)


def parse_modcaps(spec: str | None, base: Iterable[int] = DEFAULT_KEEP) -> frozenset[int]:
    """``+sys_admin:-mknod`` (the Rust syntax): add or remove from ``base``."""
    keep = set(base)
    if not spec:
        return frozenset(keep)
    for item in spec.split(":"):
        if not item:
            continue
        sign, name = item[0], item[1:].strip().lower().removeprefix("cap_")
        if sign not in "+-" or name not in NAMES:
            raise CapabilityError(
                f"--modcaps {spec!r}: {item!r} is not +name or -name of a capability "
                "(e.g. +sys_admin:-mknod)"
            )
        (keep.add if sign == "+" else keep.discard)(NAMES[name])
    return frozenset(keep)


def names(caps: Iterable[int]) -> list[str]:
    by_number = {v: k for k, v in NAMES.items()}
    return [by_number.get(c, str(c)) for c in sorted(caps)]


@functools.cache
def last_cap() -> int:
    """The highest capability this kernel knows (read once: a chroot hides /proc)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(NAMES.values())


def _mask(caps: Iterable[int]) -> tuple[int, int]:
    m = 0
    for c in caps:
        m |= 1 << c
    return m & 0xFFFFFFFF, m >> 32


def get() -> tuple[frozenset[int], frozenset[int]]:
    """(effective, permitted) of the calling thread."""
    data = thread_caps()
    eff = data[0].effective | data[1].effective << 32
    perm = data[0].permitted | data[1].permitted << 32
    return (
        frozenset(c for c in range(64) if eff >> c & 1),
        frozenset(c for c in range(64) if perm >> c & 1),
    )


def in_bounding_set(cap: int) -> bool:
    return syscalls.prctl(syscalls.PR_CAPBSET_READ, cap) == 1


def restrict(keep: frozenset[int]) -> frozenset[int]:
    """Drop every capability not in ``keep``; returns what remains permitted.

    Bounding set first (PR_CAPBSET_DROP needs CAP_SETPCAP, which goes next).
    """
    _, permitted = get()
    for cap in range(last_cap() + 1):
        if cap not in keep and in_bounding_set(cap):
            try:
                syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)
            except OSError as e:
                raise CapabilityError(
                    f"cannot drop {names([cap])[0]} from the bounding set: {e}"
                ) from None
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    remaining = permitted & keep
    lo, hi = _mask(remaining)
    try:
        set_thread_caps((CapData * 2)(CapData(lo, lo, 0), CapData(hi, hi, 0)))
    except OSError as e:
        raise CapabilityError(str(e)) from None
    return remaining
