"""``--migration-*``: how the passthrough's tables are sent and found again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MigrationMode = Literal["find-paths", "file-handles"]
OnError = Literal["abort", "guest-error"]


@dataclass(frozen=True, slots=True)
class MigrationConfig:
    """The Rust virtiofsd's ``--migration-*`` options."""

    #: Source: what to send to find inodes again.
    mode: MigrationMode = "find-paths"
    #: Destination: a node that cannot be found fails the load, or becomes EIO.
    on_error: OnError = "abort"
    #: Destination: the inode found must have the very file handle the source sent.
    verify_handles: bool = False
    #: Source: re-check every path at switch-over even when nothing was renamed.
    confirm_paths: bool = False
