"""Where a virtqueue and the guest memory lie, as the front-end describes them.

Plain values shared by the transport (vhost/ decodes them off the wire) and
the device side (virtio/ maps and walks them), so that virtio/ needs nothing
from vhost/.  Field meanings: vhost-user.rst, "A vring address description"
and "Memory regions description".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class MemoryRegion:
    """One region of guest memory shared through an fd."""

    guest_phys_addr: int
    size: int
    #: Where the region lies in the front-end's (QEMU's) address space: ring
    #: addresses are given in that space.
    userspace_addr: int
    mmap_offset: int


@dataclass(slots=True, frozen=True)
class VringAddr:
    """The areas of one split ring, as front-end virtual addresses."""

    index: int
    #: VHOST_VRING_F_LOG (bit 0): log writes to the used ring at ``log_guest_addr``.
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    #: Guest-physical address of the used ring, for dirty-page logging.
    log_guest_addr: int
