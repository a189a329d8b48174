#!/usr/bin/env python3
"""Regenerate fuzz/seeds/mapped_ram_parse/ (run from the repository root).

qemu10-firmware: the committed QEMU 10.0.2 mapped-ram file
(stream/tests/data/qemu10-mapped-ram.bin.zst, needs the zstd tool) as a
SparseFile input (fuzz/src/lib.rs): every non-zero run of the file, with each
page's data cut to its first 32 bytes, and after the RAM only the stream up to the
end of the first device section, then EOF and a small VM description naming it,
so the seed stays small and is still a complete file.
precopy-two-blocks: a two-block file in the layout precopy's writer makes,
built here byte by byte (bitmap after each header, pages at the next MiB).
"""
import json
import os
import struct
import subprocess

OUT = "fuzz/seeds/mapped_ram_parse"


def pieces_input(pieces):
    out, end = b"", 0
    for off, b in pieces:
        out += struct.pack(">IH", off - end, len(b)) + b
        end = off + len(b)
    return out


def runs(d, lo, hi, cap):
    """Non-zero runs of d[lo:hi], each cut to cap bytes."""
    res, i = [], lo
    while i < hi:
        if d[i] == 0:
            i += 1
            continue
        j = i
        while j < hi and (any(d[j:j + 64]) if j + 64 <= hi else d[j] != 0):
            j += 64 if j + 64 <= hi else 1
        j = min(j, hi)
        res.append((i, d[i:min(j, i + cap)]))
        i = j
    return res


def qemu_seed():
    d = subprocess.run(["zstd", "-dc", "stream/tests/data/qemu10-mapped-ram.bin.zst"],
                       check=True, capture_output=True).stdout
    p = d.index(b"\x03ram") + 12
    total = struct.unpack(">Q", d[p:p + 8])[0] & ~0xfff
    pieces, seen, start = [], 0, 0
    p += 8
    while seen < total:
        n = d[p]
        used = struct.unpack(">Q", d[p + 1 + n:p + 9 + n])[0]
        hdr = p + 9 + n
        _v, _ps, bo, po = struct.unpack(">IQQQ", d[hdr:hdr + 28])
        bm_end = bo + ((used // 4096 + 63) // 64) * 8
        pieces += runs(d, start, bm_end, 1 << 15)
        for pg in range(used // 4096):
            a = po + pg * 4096
            if any(d[a:a + 4096]):
                pieces.append((a, d[a:a + 32]))
        seen += used
        p = start = po + used
    # The tail up to the end of QEMU's first device section (`timer`), then EOF and a
    # small VM description listing it: a complete file, as the reader requires (QEMU's
    # own VM description is ~100 KB).
    t0 = d.index(b"\x05timer", start) - 5
    sid = d[t0 + 1:t0 + 5]
    t1 = d.index(b"\x7e" + sid, t0 + 14) + 5
    j = json.dumps({"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0}]},
                   separators=(",", ":")).encode()
    pieces.append((start, d[start:t1] + b"\x00\x06" + struct.pack(">I", len(j)) + j))
    # merge adjacent pieces, split ones over 65535 bytes
    merged = []
    for off, b in sorted(pieces):
        if merged and merged[-1][0] + len(merged[-1][1]) == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + b)
        else:
            merged.append((off, b))
    final = []
    for off, b in merged:
        for k in range(0, len(b), 60000):
            final.append((off + k, b[k:k + 60000]))
    return pieces_input(final)


def precopy_seed():
    def name(s):
        return bytes([len(s)]) + s.encode()
    head = struct.pack(">II", 0x5145564D, 3) + b"\x07" + struct.pack(">I", 2) + b"pc"
    head += b"\x05" + name("configuration/capabilities") + struct.pack(">II", 1, 1) + name("mapped-ram")
    head += b"\x01" + struct.pack(">I", 0) + name("ram") + struct.pack(">II", 0, 4)
    blocks = [("pc.ram", 8 * 4096), ("pc.bios", 2 * 4096)]
    head += struct.pack(">Q", sum(u for _, u in blocks) | 4)
    pieces, cur, start = [], head, 0
    for i, (nm, used) in enumerate(blocks):
        cur += name(nm) + struct.pack(">Q", used)
        bo = start + len(cur) + 28
        po = (bo + 8 + (1 << 20) - 1) & ~((1 << 20) - 1)
        cur += struct.pack(">IQQQ", 1, 4096, bo, po) + struct.pack("<Q", 0b11)
        pieces.append((start, cur))
        pieces.append((po, bytes([0x11 * (i + 1)]) * 64))
        pieces.append((po + 4096, bytes([0x22 * (i + 1)]) * 64))
        cur, start = b"", po + used
    tail = struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 0)
    tail += b"\x03" + struct.pack(">I", 0) + struct.pack(">Q", 0x10) + b"\x7e" + struct.pack(">I", 0)
    tail += b"\x00"
    pieces.append((start - 1, b"\x00" + tail))
    return pieces_input(pieces)


def main():
    os.makedirs(OUT, exist_ok=True)
    for nm, data in (("qemu10-firmware", qemu_seed()), ("precopy-two-blocks", precopy_seed())):
        with open(os.path.join(OUT, nm), "wb") as f:
            f.write(data)
        print(nm, len(data), "bytes")


if __name__ == "__main__":
    main()
