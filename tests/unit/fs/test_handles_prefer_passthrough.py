"""tests/test_passthrough.py again, with ``--inode-file-handles=prefer``."""

from __future__ import annotations

from handles_prefer import prefer_handles  # noqa: F401
from test_passthrough import *  # noqa: F403

# These assert which O_PATH fds the nodes hold (or that lookups run out of
# them); tests/test_passthrough_handles.py has their file-handle counterparts.
del test_lookup_counts_and_forget_closes  # noqa: F821
del test_escape_attempts_never_read_outside  # noqa: F821
del test_emfile_goes_to_the_request_and_the_daemon_keeps_serving  # noqa: F821
del test_guest_fd_budget_gives_enfile_and_recovers  # noqa: F821
