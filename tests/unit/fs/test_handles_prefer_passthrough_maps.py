"""tests/test_passthrough_maps.py again, with ``--inode-file-handles=prefer``."""

from __future__ import annotations

from handles_prefer import prefer_handles  # noqa: F401
from test_passthrough_maps import *  # noqa: F403
