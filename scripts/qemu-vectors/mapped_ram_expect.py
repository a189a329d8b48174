#!/usr/bin/env python3
"""Writes the expected facts of a QEMU mapped-ram file, computed independently
of the Rust reader (for stream/tests/mapped_ram_qemu.rs):
one line per block: name used_length bitmap_offset pages_offset present_pages sha256(block),
then `pmem` lines: sha256 of guest-physical [0, 0xa0000) and [0x100000, end) of a
pmemsave of the same stopped guest (pc.ram outside the legacy VGA/ROM window).

usage: mapped_ram_expect.py FILE [PMEM] > expected.txt
"""
import hashlib
import struct
import sys


def main():
    d = open(sys.argv[1], "rb").read()
    p = d.index(b"\x03ram") + 4 + 8  # START ... "ram", instance, version
    hdr = struct.unpack(">Q", d[p:p + 8])[0]
    p += 8
    total, seen = hdr & ~0xfff, 0
    while seen < total:
        n = d[p]
        name = d[p + 1:p + 1 + n].decode()
        p += 1 + n
        used = struct.unpack(">Q", d[p:p + 8])[0]
        p += 8
        _ver, _ps, bo, po = struct.unpack(">IQQQ", d[p:p + 28])
        pages = used // 4096
        words = (pages + 63) // 64
        bm = struct.unpack("<%dQ" % words, d[bo:bo + 8 * words])
        present = 0
        h = hashlib.sha256()
        for i in range(pages):
            if bm[i // 64] >> (i % 64) & 1:
                present += 1
                h.update(d[po + i * 4096:po + (i + 1) * 4096])
            else:
                h.update(bytes(4096))
        print("block", name, used, bo, po, present, h.hexdigest())
        seen += used
        p = po + used
    if len(sys.argv) > 2:
        m = open(sys.argv[2], "rb").read()
        print("pmem", 0, 0xA0000, hashlib.sha256(m[:0xA0000]).hexdigest())
        print("pmem", 0x100000, len(m), hashlib.sha256(m[0x100000:]).hexdigest())


if __name__ == "__main__":
    main()
