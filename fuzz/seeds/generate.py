#!/usr/bin/env python3
"""Regenerate the committed fuzz seeds from the real QEMU 7.2 vectors.

Usage (from the repository root):
    python3 fuzz/seeds/generate.py [PATH/TO/qemu-vectors]

The default vectors folder is ../shared/qemu-vectors next to the checkout.
Writes fuzz/seeds/<target>/<name> files; the layouts are documented in
fuzz/src/lib.rs. Deterministic: the same vectors give the same files.
Only a small, varied selection is kept (a few hundred KiB at most): the
fuzzer's corpus (fuzz/corpus, git-ignored) grows from these.
"""

import lzma
import os
import shutil
import struct
import sys

PAGE = 4096
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def vectors_dir():
    if len(sys.argv) > 1:
        return sys.argv[1]
    return os.path.join(os.path.dirname(ROOT), "shared", "qemu-vectors")


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


def main():
    records = list(read_vectors(vectors_dir()))
    assert len(records) == 9349, len(records)
    for t in ("xbzrle_decode", "xbzrle_encode_diff", "xbzrle_roundtrip", "zero_diff"):
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

    total = 0
    for dirpath, _, files in os.walk(HERE):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    print("seeds written under %s: %d bytes in all" % (HERE, total))


if __name__ == "__main__":
    main()
