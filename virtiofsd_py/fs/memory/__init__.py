"""The in-memory backend (``--backend memory``): ``MemoryFS`` and its ``MemoryConfig``."""

from virtiofsd_py.fs.memory.filesystem import MemoryFS
from virtiofsd_py.fs.memory.nodes import MemoryConfig

__all__ = ["MemoryConfig", "MemoryFS"]
