"""The queue worker that serves: compiled (virtio/_cworker.pyx) or pure (virtio/worker.py).

Chosen once, at import, through ``host.native`` (``VIRTIOFSD_PY_PUREPYTHON=1``
forces the pure one); both have the same API and behaviour, the pure one is
the reference.  ``PureQueueWorker`` stays importable for the tests that run
both twins.
"""

from __future__ import annotations

from typing import Any

from virtiofsd_py.host import native
from virtiofsd_py.virtio.worker import FastCall
from virtiofsd_py.virtio.worker import QueueWorker as PureQueueWorker

#: What a backend offers as fast operations: a ``VFSD_FAST_OPS_CAPSULE``
#: PyCapsule (include/vfsd_fastops.h; compiled worker only) or a ``FastCall``.
FastOps = Any

QueueWorker: Any = PureQueueWorker
CompiledQueueWorker: Any = None

if not native.PURE:
    try:
        from virtiofsd_py.virtio._cworker import QueueWorker as _Compiled
    except ImportError as e:
        native.loaded("virtio._cworker", False, str(e))
    else:
        native.loaded("virtio._cworker", True)
        QueueWorker = CompiledQueueWorker = _Compiled
else:
    native.loaded("virtio._cworker", False)

__all__ = ["CompiledQueueWorker", "FastCall", "FastOps", "PureQueueWorker", "QueueWorker"]
