#!/usr/bin/env python3
"""Regenerate the committed fuzz seeds from the real QEMU 7.2 vectors.

Usage (from the repository root):
    python3 fuzz/seeds/generate.py [PATH/TO/qemu-vectors]

The vectors folder is the argument, else $PRECOPY_VECTORS, else
../shared/qemu-vectors next to the checkout (scripts/qemu-vectors/make-vectors.sh
makes one; a regenerated set gives other seeds than the committed ones).
Writes fuzz/seeds/<target>/<name> files; the layouts are documented in
fuzz/src/lib.rs. Deterministic: the same vectors give the same files.
Only a small, varied selection is kept (a few hundred KiB at most): the
fuzzer's corpus (fuzz/corpus, git-ignored) grows from these.
"""

import lzma
import json
import os
import shutil
import struct
import sys

PAGE = 4096
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def vectors_dir():
    if len(sys.argv) > 1:
        d = sys.argv[1]
    elif os.environ.get("PRECOPY_VECTORS"):
        d = os.environ["PRECOPY_VECTORS"]
    else:
        d = os.path.join(os.path.dirname(ROOT), "shared", "qemu-vectors")
    if not os.path.isdir(d):
        sys.exit("generate.py: QEMU vectors not found (looked in %s); get them with "
                 "scripts/qemu-vectors/make-vectors.sh OUT, then pass OUT or set "
                 "PRECOPY_VECTORS=OUT. The committed seeds need no vectors." % d)
    return d


def read_vectors(path):
    """Yields (old, enc, new) for every record of xbzrle-vectors.bin.xz."""
    data = lzma.open(os.path.join(path, "xbzrle-vectors.bin.xz")).read()
    pos = 0
    while pos < len(data):
        parts = []
        for _ in range(3):
            (n,) = struct.unpack_from("<I", data, pos)
            pos += 4
            parts.append(data[pos : pos + n])
            pos += n
        yield tuple(parts)


def runs_of(old, new):
    """Canonical runs: list of (zero_run, literal_start, literal_len)."""
    runs, i = [], 0
    while i < PAGE:
        z = 0
        while i < PAGE and old[i] == new[i]:
            z, i = z + 1, i + 1
        if i == PAGE:
            break
        s = i
        while i < PAGE and old[i] != new[i]:
            i += 1
        runs.append((z, s, i - s))
    return runs


def pattern_page(seed):
    """Mirror of precopy_fuzz::pattern_page."""
    if seed == 0:
        return bytes(PAGE)
    out = bytearray(PAGE)
    for i in range(PAGE):
        lo = ((i & 0xFF) * (seed | 1) + seed) & 0xFF
        r = (i >> 8) % 8
        out[i] = ((lo << r) | (lo >> (8 - r))) & 0xFF if r else lo
    return bytes(out)


def page_pair_input(old, new, seed, out_len_field):
    """Page-pair layout whose old->new xor mask equals the real pair's."""
    out = bytearray([seed]) + struct.pack("<H", out_len_field)
    pos = 0
    for z, s, n in runs_of(old, new):
        skip = s - pos
        while n > 0:
            k = min(n, 128)
            body = bytes(old[s + j] ^ new[s + j] for j in range(k))
            out += struct.pack("<HB", skip, k - 1) + body
            s, n, skip, pos = s + k, n - k, 0, s + k
    # the fuzz input's old page is pattern_page(seed), not the real old page,
    # but the xor mask (which decides every run boundary and the overflow)
    # is the real one
    return bytes(out)


def select(records):
    """A varied selection: per encoded-length bucket, plus the extremes."""
    chosen, per_bucket = {}, {}
    # the extremes live among the long deltas; only those are walked
    big = {i: runs_of(r[0], r[2]) for i, r in enumerate(records) if len(r[1]) >= 1024}
    most_runs = max(big, key=lambda i: len(big[i]))
    longest_lit = max(big, key=lambda i: max(n for _, _, n in big[i]))
    starts_at_zero = [i for i, r in enumerate(records) if r[1][0] == 0][:3]
    for i, (old, enc, new) in enumerate(records):
        b = max(len(enc) - 1, 1).bit_length()
        if per_bucket.get(b, 0) < 3:
            per_bucket[b] = per_bucket.get(b, 0) + 1
            chosen[i] = "len%d" % len(enc)
    chosen[most_runs] = "most-runs"
    chosen[longest_lit] = "longest-literal"
    for i in starts_at_zero:
        chosen[i] = "zero-run-0"
    for i in (0, 626):  # tiny-cases.json worked examples
        chosen[i] = "tiny"
    return sorted(chosen.items())


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def ram_records(buf, pos):
    """Walks ram records from pos up to and including EOS; yields
    (start, end, flags, addr)."""
    while True:
        hdr, = struct.unpack_from(">Q", buf, pos)
        flags, addr, p = hdr & 0xFFF, hdr & ~0xFFF, pos + 8
        if not flags & 0x20 and flags & (0x02 | 0x08 | 0x40):
            p += 1 + buf[p]
        if flags & 0x02:
            p += 1
        elif flags & 0x08:
            p += PAGE
        elif flags & 0x40:
            p += 3 + struct.unpack_from(">H", buf, p + 1)[0]
        elif flags & 0x10:
            yield pos, p, flags, addr
            return
        elif flags & 0x04:
            sum_len = 0
            while sum_len < addr:
                n = buf[p]
                sum_len += struct.unpack_from(">Q", buf, p + 1 + n)[0]
                p += 1 + n + 8
        else:
            raise ValueError("unexpected ram flags %#x at %d" % (flags, pos))
        yield pos, p, flags, addr
        pos = p


def readdress(rec, addr):
    """A CONTINUE page record with its page address replaced."""
    hdr, = struct.unpack_from(">Q", rec, 0)
    return struct.pack(">Q", addr | (hdr & 0xFFF)) + rec[8:]


def stream_seeds(vdir):
    """Stream prefixes and real records, re-framed into small streams.

    Real bytes: the file header, configuration and MEM_SIZE block list of
    xbzrle-stream.bin, its first page records, real XBZRLE records (moved to
    pages inside a shrunk pc.ram so the 2 MiB loader limit accepts them),
    and the first bytes of the first device section (a foreign section).
    """
    idx = [l.split("\t") for l in lzma.open(os.path.join(vdir, "xbzrle-vectors-index.tsv.xz"), "rt").read().splitlines()[1:]]
    last = int(idx[40][3]) + 8 + 3 + int(idx[40][7])
    x = lzma.open(os.path.join(vdir, "xbzrle-stream.bin.xz"))
    head = x.read(300000)
    x.seek(int(idx[0][3]))
    xb = x.read(last - int(idx[0][3]))
    x.seek(72143688)  # first device section (README: SECTION_FULL 'timer')
    device = x.read(256)
    plain = lzma.open(os.path.join(vdir, "plain-stream.bin.xz")).read(8192)

    assert head[:4] == b"QEVM"
    start_sec = 0x1A  # after magic, version, configuration
    assert head[start_sec] == 0x01
    mem_at = start_sec + 17
    recs = list(ram_records(head, mem_at))
    mem_start, mem_end, _, total = recs[0]
    eos_end = recs[-1][1]
    footer = head[eos_end : eos_end + 5]
    assert footer[0] == 0x7E
    part = head[eos_end + 5 : eos_end + 10]
    assert part[0] == 0x02
    first = []
    for r in ram_records(head, eos_end + 10):
        first.append(r)
        if len(first) == 16:
            break
    pages = head[first[0][0] : first[-1][1]]

    # MEM_SIZE with pc.ram shrunk to 512 KiB (the other blocks as sent)
    blocks, p = [], mem_start + 8
    while p < mem_end:
        n = head[p]
        name = head[p + 1 : p + 1 + n]
        length, = struct.unpack_from(">Q", head, p + 1 + n)
        blocks.append((name, 0x80000 if name == b"pc.ram" else length))
        p += 1 + n + 8
    small_total = sum(l for _, l in blocks)
    mem_size = struct.pack(">Q", small_total | 0x04) + b"".join(
        bytes([len(n)]) + n + struct.pack(">Q", l) for n, l in blocks
    )
    eos = struct.pack(">Q", 0x10)
    prefix = head[:mem_start] + mem_size + eos + footer
    real_prefix = head[:eos_end] + footer

    xrecs = []
    for k, row in enumerate(idx[:41]):
        at = int(row[3]) - int(idx[0][3])
        assert row[6] == "0", "named XBZRLE record in the selection"
        rec = xb[at : at + 8 + 3 + int(row[7])]
        assert struct.unpack_from(">Q", rec)[0] & 0xFFF == 0x60
        xrecs.append(readdress(rec, (k * 0x3000) % 0x80000))
    sec_id = part[1:5]
    vmdesc = b'{"page_size":4096,"devices":[]}'
    small = (
        prefix + part + pages + eos + footer
        + part + b"".join(xrecs[:30]) + eos + footer
        + b"\x03" + sec_id + b"".join(xrecs[30:]) + eos + footer
        + b"\x00\x06" + struct.pack(">I", len(vmdesc)) + vmdesc
    )
    foreign = prefix + part + pages + eos + footer + part + b"".join(xrecs[:8]) + eos + footer + device
    for target in ("stream_records", "stream_load"):
        write(target, "qemu-small-ram-xbzrle", b"\x00" + small)
        write(target, "qemu-small-ram-xbzrle-pieces", b"\x07" + small)
        write(target, "qemu-foreign-section", b"\x02" + foreign)
        write(target, "qemu-prefix-4k", b"\x1f" + head[:4096])
        write(target, "plain-prefix-8k", b"\x3f" + plain)
    write("stream_records", "qemu-real-mem-size", b"\x05" + real_prefix + part + pages)


def device_state_seeds(vdir):
    """stream_device_state: `[chunk] tail`, tails of QEMU streams from the first device
    section: hand-made (two sections, small VM description; without one) and the real
    one of the plain stream (its first sections, then EOF and a VM description listing them)."""
    def section(sid, name, inst, data):
        n = name.encode()
        return (b"\x04" + struct.pack(">I", sid) + bytes([len(n)]) + n + struct.pack(">II", inst, 1)
                + data + b"\x7e" + struct.pack(">I", sid))

    def vmdesc(devs):
        j = json.dumps({"page_size": 4096, "devices": [{"name": n, "instance_id": i} for n, i in devs]},
                       separators=(",", ":")).encode()
        return b"\x00\x06" + struct.pack(">I", len(j)) + j

    body = section(0, "timer", 0, bytes(24)) + section(3, "cpu", 0, b"\x7e\x00\x00\x00\x03" + bytes(9))
    write("stream_device_state", "hand-vmdesc", b"\x00" + body + vmdesc([("timer", 0), ("cpu", 0)]))
    write("stream_device_state", "hand-no-vmdesc", b"\x03" + body + b"\x00")
    write("stream_device_state", "hand-cut", b"\x01" + body[:-3])
    if vdir is None:
        return
    plain = lzma.open(os.path.join(vdir, "plain-stream.bin.xz")).read()
    start = plain.find(b"\x04\x00\x00\x00\x00\x05timer")
    if start < 0:
        return
    # The first three real sections, split by their footers (ids 0, then the next ones).
    real, at, devs = b"", start, []
    for _ in range(3):
        sid = struct.unpack(">I", plain[at + 1:at + 5])[0]
        nlen = plain[at + 5]
        name = plain[at + 6:at + 6 + nlen].decode()
        inst = struct.unpack(">I", plain[at + 6 + nlen:at + 10 + nlen])[0]
        end = plain.index(b"\x7e" + struct.pack(">I", sid), at + 14 + nlen) + 5
        real += plain[at:end]
        devs.append((name, inst))
        at = end
    write("stream_device_state", "qemu-real-first-sections", b"\x00" + real + vmdesc(devs))


def multifd_seeds():
    """multifd_channel: a hello, then page-channel records (our layout, stream::multifd)."""
    shutil.rmtree(os.path.join(HERE, "multifd_channel"), ignore_errors=True)
    hello = struct.pack(">II", 0x50434D46, 1) + bytes(range(16)) + struct.pack(">HH", 1, 2)

    def rec(flags, addr, name=None):
        out = struct.pack(">Q", addr | flags)
        if name is not None:
            out += bytes([len(name)]) + name
        return out

    page = rec(0x08, 0x1000, b"pc.ram") + bytes(range(256)) * 16
    zero = rec(0x02 | 0x20, 0x2000) + b"\x00"
    xbz = rec(0x40 | 0x20, 0x1000) + b"\x01" + struct.pack(">H", 4) + b"\x64\x01\x77\x00"
    vga = rec(0x08, 0x1000, b"vga") + b"\x5a" * PAGE
    flush = lambda k: rec(0x200, k << 12)
    eos = rec(0x10, 0)
    body = page + zero + flush(1) + xbz + vga + flush(2) + eos
    write("multifd_channel", "hand-channel", hello + body)
    write("multifd_channel", "hand-trailing", hello + body + eos)
    write("multifd_channel", "hand-cut", hello + body[:-5])
    write("multifd_channel", "hand-mem-size", hello + rec(0x04, 0x8000) + b"\x06pc.ram" + struct.pack(">Q", 0x8000))
    write("multifd_channel", "hand-outside", hello + rec(0x08, 0x9000, b"pc.ram") + b"\x00" * PAGE)
    write("multifd_channel", "hand-main-hello", hello[:24] + struct.pack(">HH", 0, 2) + eos)
    write("multifd_channel", "hand-qevm", b"QEVM\x00\x00\x00\x03")


def compressed_seeds():
    """stream_compressed: [method u8][level u8] frame. zlib frames from Python's zlib,
    zstd frames from the zstd command line (skipped when it is missing)."""
    import subprocess
    import zlib
    shutil.rmtree(os.path.join(HERE, "stream_compressed"), ignore_errors=True)
    pages = {
        "text": (b"precopy migrates guest memory; " * 200)[:PAGE],
        "mostly-zero": b"\x00" * 4000 + bytes(range(96)),
        "pattern": bytes(pattern_page(7)),
    }
    for name, page in pages.items():
        assert len(page) == PAGE, name
        write("stream_compressed", "zlib-" + name, b"\x02\x01" + zlib.compress(page, 1))
        try:
            z = subprocess.run(["zstd", "-1", "-q", "-c", "--no-check"], input=page,
                               capture_output=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        write("stream_compressed", "zstd-" + name, b"\x01\x01" + z)
        write("stream_compressed", "zstd-" + name + "-cut", b"\x01\x01" + z[:-3])
    # A frame that inflates past a page, and an unknown method byte.
    big = zlib.compress(b"\x00" * (PAGE + 1), 1)
    write("stream_compressed", "zlib-past-page", b"\x02\x01" + big)
    write("stream_compressed", "unknown-method", b"\x07\x01" + zlib.compress(b"\x00" * PAGE))


def main():
    records = list(read_vectors(vectors_dir()))
    assert len(records) == 9349, len(records)
    for t in ("xbzrle_decode", "xbzrle_encode_diff", "xbzrle_roundtrip", "zero_diff",
              "stream_records", "stream_load"):
        shutil.rmtree(os.path.join(HERE, t), ignore_errors=True)

    for i, why in select(records):
        old, enc, new = records[i]
        name = "qemu-%04d-%s" % (i, why)
        write("xbzrle_decode", name, bytes([i % 251 + 1]) + enc)
        # exact page-sized buffer (QEMU's policy), and the overflow edge
        pp = page_pair_input(old, new, i % 251 + 1, PAGE)
        write("xbzrle_encode_diff", name, pp)
        write("xbzrle_encode_diff", name + "-edge", pp[:1] + struct.pack("<H", 0x8000 | 7) + pp[3:])
        write("xbzrle_roundtrip", name, pp)

    # hand-made decode cases: every refusal kind and the boundaries
    for name, delta in [
        ("empty", b""),
        ("one-byte", b"\x00"),
        ("last-byte", b"\xff\x1f\x01\x5a"),
        ("whole-page-literal", b"\x00\x80\x20" + bytes(range(256)) * 16),
        ("past-end", b"\xff\x1f\x02\x01\x02"),
        ("three-byte-uleb", b"\x80\x80\x01\x01\x00"),
        ("empty-literal", b"\x05\x00\x00\x00"),
        ("empty-zero-run", b"\x00\x01\xaa\x00\x01\xbb"),
        ("literal-past-input", b"\x10\x05\x01\x02"),
        ("truncated-literal-len", b"\x10\x01\xaa\x10"),
    ]:
        write("xbzrle_decode", "hand-" + name, b"\x07" + delta)

    # hand-made page pairs: comb patterns at the overflow edge, dense pages
    for name, ops in [
        ("identical", b""),
        ("comb2-full", struct.pack("<HBBB", 0, 0xFF, 0x5A, 1)),
        ("comb3-full", struct.pack("<HBBB", 0, 0xFF, 0x5A, 2)),
        ("random-like", struct.pack("<HBBB", 0, 0xFF, 0xC3, 0)),
        ("block-edges", b"".join(struct.pack("<HBB", 63, 1, 0x11) + b"\x22" for _ in range(8))),
    ]:
        for fld, tag in ((PAGE, ""), (0x8000 | 8, "-edge")):
            pp = bytes([0x33]) + struct.pack("<H", fld) + ops
            write("xbzrle_encode_diff", "hand-" + name + tag, pp)
        write("xbzrle_roundtrip", "hand-" + name, bytes([0]) + struct.pack("<H", PAGE) + ops)

    # zero buffers: lengths and alignments around block sizes
    for length in (0, 1, 7, 63, 64, 65, 4095, 4096, 4097, 8192):
        for align in (0, 1, 63):
            hdr = struct.pack("<HB", length, align)
            write("zero_diff", "zero-%d-a%d" % (length, align), hdr)
            if length:
                for at, tag in ((0, "first"), (length // 2, "mid"), (length - 1, "last")):
                    write("zero_diff", "zero-%d-a%d-%s" % (length, align, tag), hdr + struct.pack("<HB", at, 1))

    stream_seeds(vectors_dir())
    device_state_seeds(vectors_dir())
    multifd_seeds()
    compressed_seeds()

    total = 0
    for dirpath, _, files in os.walk(HERE):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print("seeds written under %s: %d bytes in all" % (HERE, total))


if __name__ == "__main__":
    main()
