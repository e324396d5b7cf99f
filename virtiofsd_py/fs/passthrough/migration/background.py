"""``Background``: one daemon thread doing a migration chore while requests run.

Preparing paths (source), finding deferred nodes and re-taking locks
(destination) each run ``_run`` once on a thread of their own, check
``_stop`` between steps, and are stopped (and waited for) when migration
is switched off or the tables are dropped.
"""

from __future__ import annotations

import threading


class Background:
    name = "vfsd-background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask ``_run`` to end and wait for it (unless called from it)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        raise NotImplementedError
