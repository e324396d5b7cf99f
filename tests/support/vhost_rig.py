"""An in-process vhost-user back-end over real memfd rings, for unit tests.

The handler echoes the readable bytes into the writable buffers, so each
test sees exactly when a request was processed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from virtiofsd_py.testing.frontend import driver as drv
from virtiofsd_py.vhost import protocol as p
from virtiofsd_py.vhost.backend import BackendConfig, Reply, VhostUserBackend
from virtiofsd_py.vhost.connection import StateTransfers
from virtiofsd_py.virtio.runner import QueueRunner
from virtiofsd_py.virtio.types import MemoryRegion

GPA_BASE = 0x4000_0000
F_PROTO = p.bit(p.VHOST_USER_F_PROTOCOL_FEATURES)
F_BASE = p.bit(p.VIRTIO_F_VERSION_1) | p.bit(p.VIRTIO_RING_F_EVENT_IDX)
REPLY_ACK = p.bit(p.ProtocolFeature.REPLY_ACK)


def echo(readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
    data = b"".join(bytes(v) for v in readable)
    n = 0
    for w in writable:
        chunk = data[n : n + len(w)]
        w[: len(chunk)] = chunk
        n += len(chunk)
    return n


class Rig:
    def __init__(  # type: ignore[no-untyped-def]
        self,
        handler=echo,
        pool: int = 0,
        tag: str | None = None,
        *,
        worker: type | None = None,
        **runner_kw,
    ) -> None:
        """``worker``: serve request queues with this ``QueueWorker`` class."""
        self.loop = asyncio.get_running_loop()
        self.runner = QueueRunner(
            self.loop,
            handler,
            thread_pool_size=pool,
            queue_threads=worker is not None,
            worker=worker,
            **runner_kw,
        )
        self.backend = VhostUserBackend(self.runner, BackendConfig(max_queues=3, tag=tag))
        self.dmem = drv.GuestMemory(8 << 20, gpa_base=GPA_BASE)
        self.queues: dict[int, drv.SplitQueue] = {}
        #: Device-state transfers run as the connection runs them: after the reply.
        self.transfers = StateTransfers()

    async def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: list[int] | None = None,
        need_reply: bool = False,
    ) -> Reply | None:
        flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        reply = await self.backend.handle(p.Message(request, flags, payload, fds or []))
        if reply is not None and reply.transfer is not None:
            self.transfers.start(reply.transfer)
        return reply

    async def u64(self, request: int, value: int, **kw: object) -> Reply | None:
        return await self.send(request, p.U64.pack(value), **kw)  # type: ignore[arg-type]

    async def setup(self, features: int = F_BASE | F_PROTO, protocol: int = REPLY_ACK) -> None:
        await self.u64(p.MessageType.SET_PROTOCOL_FEATURES, protocol)
        await self.send(p.MessageType.SET_OWNER)
        await self.u64(p.MessageType.SET_FEATURES, features)
        region = MemoryRegion(GPA_BASE, self.dmem.size, self.dmem.user_addr, 0)
        await self.send(
            p.MessageType.ADD_MEM_REG, p.encode_single_region(region), [os.dup(self.dmem.fd)]
        )

    async def start_ring(self, index: int, size: int = 16) -> drv.SplitQueue:
        q = drv.SplitQueue(self.dmem, index, size)
        self.queues[index] = q
        await self.send(p.MessageType.SET_VRING_NUM, p.VRING_STATE.pack(index, size))
        await self.send(p.MessageType.SET_VRING_BASE, p.VRING_STATE.pack(index, 0))
        u = self.dmem.gpa_to_user
        await self.send(
            p.MessageType.SET_VRING_ADDR,
            p.VRING_ADDR.pack(index, 0, u(q.desc_gpa), u(q.used_gpa), u(q.avail_gpa), 0),
        )
        await self.u64(p.MessageType.SET_VRING_CALL, index, fds=[os.dup(q.call_fd)])
        await self.u64(p.MessageType.SET_VRING_KICK, index, fds=[os.dup(q.kick_fd)])
        return q

    def submit(self, q: drv.SplitQueue, data: bytes) -> drv.Chain:
        gpa = self.dmem.alloc(len(data))
        self.dmem.write(gpa, data)
        out = self.dmem.alloc(len(data))
        chain = q.add([drv.Buffer(gpa, len(data))], [drv.Buffer(out, len(data))])
        q.kick(force=True)
        return chain

    async def completions(self, q: drv.SplitQueue, count: int = 1) -> list[drv.Used]:
        return await asyncio.wait_for(
            self.loop.run_in_executor(None, lambda: q.wait_used(5.0, min_count=count)), 10
        )

    async def close(self) -> None:
        await self.transfers.cancel()
        await self.backend.close()
        self.runner.close()
        for q in self.queues.values():
            q.close()
        self.dmem.close()


def u64_of(reply: Reply | None) -> int:
    assert reply is not None
    _request, flags, size = p.HEADER.unpack_from(reply.data)
    assert flags & p.FLAG_REPLY and size == 8
    return int(p.U64.unpack_from(reply.data, 12)[0])
