"""A tiny classic-BPF assembler for seccomp filters (linux/filter.h, linux/seccomp.h).

Only what an allow-list needs: load a 32-bit word of ``struct seccomp_data``,
compare with a constant and jump, return a constant.  Jumps are resolved
from labels, so a program is written top to bottom without counting.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# linux/bpf_common.h
BPF_LD: Final = 0x00
BPF_JMP: Final = 0x05
BPF_RET: Final = 0x06
BPF_W: Final = 0x00
BPF_ABS: Final = 0x20
BPF_JEQ: Final = 0x10
BPF_JGE: Final = 0x30
BPF_K: Final = 0x00

#: struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
OFFSET_NR: Final = 0
OFFSET_ARCH: Final = 4

#: struct sock_filter: __u16 code; __u8 jt; __u8 jf; __u32 k.
SOCK_FILTER: Final = struct.Struct("=HBBI")
#: BPF_MAXINSNS
MAX_INSNS: Final = 4096


class BpfError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Label:
    name: str


@dataclass(slots=True)
class _Insn:
    code: int
    k: int
    jt: str | None = None
    jf: str | None = None


class Program:
    """Instructions in order; ``label()`` marks the next instruction."""

    def __init__(self) -> None:
        self._insns: list[_Insn] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise BpfError(f"label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def load_word(self, offset: int) -> None:
        self._insns.append(_Insn(BPF_LD | BPF_W | BPF_ABS, offset))

    def jump_eq(self, k: int, true: str | None, false: str | None = None) -> None:
        """``if A == k goto true else goto false`` (None: the next instruction)."""
        self._insns.append(_Insn(BPF_JMP | BPF_JEQ | BPF_K, k, true, false))

    def jump_ge(self, k: int, true: str | None, false: str | None = None) -> None:
        self._insns.append(_Insn(BPF_JMP | BPF_JGE | BPF_K, k, true, false))

    def ret(self, k: int) -> None:
        self._insns.append(_Insn(BPF_RET | BPF_K, k))

    def __len__(self) -> int:
        return len(self._insns)

    def _offset(self, at: int, target: str | None) -> int:
        if target is None:
            return 0
        try:
            dest = self._labels[target]
        except KeyError:
            raise BpfError(f"undefined label {target!r}") from None
        off = dest - at - 1
        if not 0 <= off <= 255:
            raise BpfError(f"jump to {target!r} from {at} out of range ({off})")
        return off

    def assemble(self) -> bytes:
        """The ``struct sock_filter`` array."""
        if not self._insns or len(self._insns) > MAX_INSNS:
            raise BpfError(f"program of {len(self._insns)} instructions")
        if self._insns[-1].code != BPF_RET | BPF_K:
            raise BpfError("a program must end with a return")
        out = bytearray()
        for i, insn in enumerate(self._insns):
            jt, jf = self._offset(i, insn.jt), self._offset(i, insn.jf)
            out += SOCK_FILTER.pack(insn.code, jt, jf, insn.k & 0xFFFFFFFF)
        return bytes(out)


def run(program: bytes, nr: int, arch: int) -> int:
    """Interpret ``program`` on a syscall ``nr`` of ``arch`` (for tests): the return value."""
    data = struct.pack("=IIQ6Q", nr, arch, 0, *([0] * 6))
    insns = [SOCK_FILTER.unpack_from(program, o) for o in range(0, len(program), SOCK_FILTER.size)]
    pc, acc = 0, 0
    while pc < len(insns):
        code, jt, jf, k = insns[pc]
        if code == BPF_LD | BPF_W | BPF_ABS:
            (acc,) = struct.unpack_from("=I", data, k)
        elif code == BPF_JMP | BPF_JEQ | BPF_K:
            pc += jt if acc == k else jf
        elif code == BPF_JMP | BPF_JGE | BPF_K:
            pc += jt if acc >= k else jf
        elif code == BPF_RET | BPF_K:
            return int(k)
        else:
            raise BpfError(f"unknown opcode {code:#x} at {pc}")
        pc += 1
    raise BpfError("fell off the end of the program")
