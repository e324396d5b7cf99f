"""``PassthroughMigration``: live migration of a ``PassthroughFS`` (a ``Migratable``).

The daemon makes one per passthrough backend it serves and hands it to the
device-state envelope (virtiofsd_py/migration/envelope.py); the backend
itself knows nothing of migration beyond the hooks load.py installs.
"""

from __future__ import annotations

from virtiofsd_py.fs.passthrough.filesystem import PassthroughFS
from virtiofsd_py.fs.passthrough.migration.config import MigrationConfig
from virtiofsd_py.fs.passthrough.migration.export import Preparer, export_state
from virtiofsd_py.fs.passthrough.migration.load import import_state
from virtiofsd_py.fs.passthrough.migration.schema import PassthroughState


class PassthroughMigration:
    """Saves and loads the tables of ``fs`` as ``config`` (``--migration-*``) says."""

    def __init__(self, fs: PassthroughFS, config: MigrationConfig | None = None) -> None:
        self.fs = fs
        self.config = config or MigrationConfig()
        self.preparer: Preparer | None = None

    def prepare_migration(self, enabled: bool) -> None:
        """LOG_ALL on: work out the paths while the guest runs; off: stop."""
        if self.preparer is not None:
            self.preparer.stop()
            self.preparer = None
        if enabled:
            self.preparer = Preparer(self.fs)
            self.preparer.start()

    def export_state(self) -> PassthroughState:
        self.fs.settle_migration()  # placeholders' paths are the source's: find them first
        return export_state(self.fs, self.config, self.preparer)

    def import_state(self, state: PassthroughState) -> None:
        import_state(self.fs, self.config, state)
