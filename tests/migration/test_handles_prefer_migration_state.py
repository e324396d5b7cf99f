"""tests/test_migration_state.py again, with ``--inode-file-handles=prefer``."""

from __future__ import annotations

from handles_prefer import prefer_handles  # noqa: F401
from test_migration_state import *  # noqa: F403
