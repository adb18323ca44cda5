#!/usr/bin/env python3
"""Writes a few well-formed inputs per target into fuzz/corpus/<target>/ (the fuzzer starts
from them: a valid ring and request is far from random bytes). Layouts: devices::fuzzing."""
import os
import struct

NEXT, WRITE, INDIRECT = 1, 2, 4
here = os.path.dirname(os.path.abspath(__file__))


class Image:
    """Guest memory from address 0; queue i's rings at i * 0x400, 16 entries each."""

    def __init__(self):
        self.b = bytearray(0x3000)

    def put(self, at, data):
        self.b[at:at + len(data)] = data

    def desc(self, q, i, addr, length, flags, nxt=0):
        self.put(q * 0x400 + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, q, first, bufs):
        """bufs: (addr, len, flags) in slots first.., published in the avail ring."""
        for k, (addr, length, flags) in enumerate(bufs):
            last = k + 1 == len(bufs)
            self.desc(q, first + k, addr, length, flags | (0 if last else NEXT), 0 if last else first + k + 1)
        avail = q * 0x400 + 0x100
        idx = struct.unpack_from("<H", self.b, avail + 2)[0]
        struct.pack_into("<H", self.b, avail + 4 + 2 * (idx % 16), first)
        struct.pack_into("<H", self.b, avail + 2, idx + 1)


def write(target, name, data):
    d = os.path.join(here, "..", "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(bytes(data))


# chain: flags (1 = indirect), head (u16), queue size exponent, table at 0.
img = Image()
img.desc(0, 0, 0x1000, 16, NEXT, 1)
img.desc(0, 1, 0x1100, 512, WRITE | NEXT, 2)
img.desc(0, 2, 0x1400, 1, WRITE)
img.desc(0, 3, 0x2000, 48, INDIRECT)
img.put(0x2000, struct.pack("<QIHH", 0x1000, 16, NEXT, 1) + struct.pack("<QIHH", 0x1100, 512, WRITE | NEXT, 2)
        + struct.pack("<QIHH", 0x1400, 1, WRITE, 0))
write("virtio_chain", "direct", bytes([1, 0, 0, 4]) + img.b)
write("virtio_chain", "indirect", bytes([1, 3, 0, 4]) + img.b)

# block: IN, OUT and GET_ID requests.
for name, kind, data_flags in [("in", 0, WRITE), ("out", 1, 0), ("get_id", 8, WRITE), ("flush", 4, None)]:
    img = Image()
    img.put(0x1000, struct.pack("<IIQ", kind, 0, 2))
    bufs = [(0x1000, 16, 0)]
    if data_flags is not None:
        bufs.append((0x1200, 512, data_flags))
    bufs.append((0x1600, 1, WRITE))
    img.chain(0, 0, bufs)
    write("virtio_block", name, bytes([1, 0]) + img.b)

# rng: two writable buffers.
img = Image()
img.chain(0, 0, [(0x1000, 64, WRITE)])
img.chain(0, 1, [(0x1100, 16, WRITE), (0x1200, 16, WRITE)])
write("virtio_rng", "two", bytes([0, 0]) + img.b)

# net: an rx buffer (queue 0) with one frame waiting, a tx frame (queue 1).
img = Image()
img.chain(0, 0, [(0x1000, 1526, WRITE)])
img.put(0x2000, bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + b"payload")
img.chain(1, 0, [(0x2000, 12 + 6 + 6 + 2 + 7, 0)])
write("virtio_net", "rx_tx", bytes([0, 1]) + img.b)

# vsock: rx buffers (queue 0), a REQUEST then a RW packet on tx (queue 1), an event buffer.
def vsock_hdr(op, length=0, src_port=1234, dst_port=1025):
    return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, 0, 65536, 0)

img = Image()
img.chain(0, 0, [(0x1000, 44 + 256, WRITE)])
img.chain(0, 1, [(0x1200, 44 + 256, WRITE)])
img.put(0x2000, vsock_hdr(1))
img.chain(1, 0, [(0x2000, 44, 0)])
img.put(0x2100, vsock_hdr(5, 5) + b"hello")
img.chain(1, 1, [(0x2100, 49, 0)])
img.chain(2, 0, [(0x2800, 4, WRITE)])
write("virtio_vsock", "request_rw", bytes([0, 0]) + img.b)

# balloon: inflate and deflate page lists, a statistics buffer, a reported range.
img = Image()
img.put(0x1000, struct.pack("<4I", 4, 5, 6, 7))
img.chain(0, 0, [(0x1000, 16, 0)])
img.chain(1, 0, [(0x1000, 8, 0)])
img.put(0x1100, struct.pack("<HQHQ", 4, 1 << 20, 5, 64 << 10))
img.chain(2, 0, [(0x1100, 20, 0)])
img.chain(3, 0, [(0x8000, 0x4000, WRITE)])
write("virtio_balloon", "all_queues", bytes([4 | 8, 0]) + img.b)

# pci_config: 8-byte ops (kind | len << 4, offset[3], value[4]).
def op(kind, length, offset, value):
    return bytes([kind | (length << 4)]) + struct.pack("<I", offset)[:3] + struct.pack("<I", value)

ops = [
    op(0, 2, 0, 0x8000_0810),  # CONFIG_ADDRESS: bus 0, dev 1, BAR0
    op(1, 2, 0, 0xffff_ffff),  # size the BAR
    op(2, 2, 0, 0),
    op(1, 2, 0, 0xc000_0000),  # place it
    op(0, 2, 0, 0x8000_0804),  # command
    op(1, 1, 0, 0x0006),  # memory + bus master
    op(4, 2, (1 << 15) | 0x34, 0),  # ECAM: capabilities pointer
    op(5, 2, (1 << 15) | 0x40, 0),
    op(6, 2, 0x14, 0),  # a BAR read (device status)
    op(7, 0, 0, 0),
]
write("pci_config", "bar_and_command", b"".join(ops))
