"""tests/test_migration_deferred.py again, with ``--inode-file-handles=prefer``."""

from __future__ import annotations

from handles_prefer import prefer_handles  # noqa: F401
from test_migration_deferred import *  # noqa: F403
