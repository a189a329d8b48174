#!/usr/bin/env python3
"""Derive the test-vector files from two raw QEMU 7.2 migration streams.

    extract.py --xbzrle xbzrle-stream.bin [--plain plain-stream.bin]
               [--query-migrate query-migrate-xbzrle.json] [--run-info run-info.json]
               [--pmem source-ram.pmem --guest-log guest.log] --out DIR

Writes into DIR (uncompressed; make-vectors.sh compresses the big ones):

  xbzrle-vectors.bin        every XBZRLE record: u32 LE 4096, old page,
                            u32 LE enc_len, delta, u32 LE 4096, new page
  xbzrle-vectors-index.tsv  one line per record (block, page offset, stream
                            offset, section number and type, named, enc_len,
                            runs, changed bytes)
  page-trace.txt            '<z|p|x> <hex global address>' per page record,
                            'sync' where a new pass over RAM begins
  tiny-cases.json           a few short records spelled out run by run
  expected.json             counts, per-block SHA-256, statistics (the parts
                            the given inputs allow)

Written from the stream layout documented in precopy-stream (stream/src/format.rs) and the vectors
README (container, section types, 'ram' record flags, XBZRLE runs), not from
QEMU's source. Standard library only. Only what QEMU 7.2 wrote in our runs is
accepted (no configuration subsections, no COMMAND or compressed records):
anything else stops with an error naming the byte offset.
"""
import argparse
import hashlib
import json
import os
import struct
import sys

PAGE = 4096
MAGIC = 0x5145564D
# section types
EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x7E)
SECTION_NAME = {START: "START", PART: "PART", END: "END", FULL: "FULL"}
# 'ram' record flags
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE, F_XBZRLE = 0x02, 0x04, 0x08, 0x10, 0x20, 0x40
TRACE_HEADER = ("# page sequence of a real QEMU 7.2 migration stream: "
                "'sync' = a new pass; '<z|p|x> <hex address>'")
NOTE = "new = old with each 'changes' range replaced by new_hex; all other bytes equal"


class StreamError(Exception):
    pass


class Cur:
    """A cursor over the stream bytes; every read checks the length."""

    def __init__(self, data):
        self.d = data
        self.pos = 0

    def need(self, n, what):
        if self.pos + n > len(self.d):
            raise StreamError("at byte %d: stream ends inside %s" % (self.pos, what))

    def u8(self, what="u8"):
        self.need(1, what)
        v = self.d[self.pos]
        self.pos += 1
        return v

    def be16(self, what="be16"):
        self.need(2, what)
        (v,) = struct.unpack_from(">H", self.d, self.pos)
        self.pos += 2
        return v

    def be32(self, what="be32"):
        self.need(4, what)
        (v,) = struct.unpack_from(">I", self.d, self.pos)
        self.pos += 4
        return v

    def be64(self, what="be64"):
        self.need(8, what)
        (v,) = struct.unpack_from(">Q", self.d, self.pos)
        self.pos += 8
        return v

    def take(self, n, what):
        self.need(n, what)
        v = self.d[self.pos:self.pos + n]
        self.pos += n
        return v

    def name(self, what):
        return self.take(self.u8(what), what).decode()


def uleb(delta, i, where):
    """One ULEB128 value of at most 2 bytes; returns (value, next index)."""
    if i >= len(delta):
        raise StreamError("%s: delta ends inside a run length" % where)
    b = delta[i]
    if b < 0x80:
        return b, i + 1
    if i + 1 >= len(delta) or delta[i + 1] >= 0x80:
        raise StreamError("%s: run length longer than 2 bytes or cut" % where)
    return (b & 0x7F) | (delta[i + 1] << 7), i + 2


def runs_of(delta, where):
    """The (zero_run, literal_len, literal) triples of a delta."""
    out, i, pos = [], 0, 0
    while i < len(delta):
        z, i = uleb(delta, i, where)
        n, i = uleb(delta, i, where)
        if (z == 0 and out) or n == 0:
            raise StreamError("%s: zero-length run" % where)
        if i + n > len(delta) or pos + z + n > PAGE:
            raise StreamError("%s: run passes the end of the delta or page" % where)
        out.append((z, n, bytes(delta[i:i + n])))
        i += n
        pos += z + n
    return out


def apply_delta(page, runs):
    pos = 0
    for z, n, lit in runs:
        pos += z
        page[pos:pos + n] = lit
        pos += n


def changes_of(old, new):
    """Maximal ranges where old and new differ: [(offset, old bytes, new bytes)]."""
    out, i = [], 0
    while i < PAGE:
        if old[i] != new[i]:
            j = i
            while j < PAGE and old[j] != new[j]:
                j += 1
            out.append((i, bytes(old[i:j]), bytes(new[i:j])))
            i = j
        else:
            i += 1
    return out


def canonical(old, new):
    """Canonical XBZRLE encoding: maximal alternating runs, trailing unchanged run left out."""
    out = bytearray()

    def put(v):
        if v < 0x80:
            out.append(v)
        else:
            out.extend(((v & 0x7F) | 0x80, v >> 7))

    i = 0
    while i < PAGE:
        z = i
        while z < PAGE and old[z] == new[z]:
            z += 1
        if z == PAGE:
            break
        n = z
        while n < PAGE and old[n] != new[n]:
            n += 1
        put(z - i)
        put(n - z)
        out.extend(new[z:n])
        i = n
    return bytes(out)


class Parsed:
    """Everything one pass over a stream finds."""

    def __init__(self):
        self.machine = None
        self.blocks = []          # [(name, used_length)] in MEM_SIZE order
        self.mem_size_total = 0
        self.ram = {}             # name -> bytearray
        self.counts = {"zero": 0, "page": 0, "xbzrle": 0}
        self.zero_nonzero_fill = 0
        self.named = 0
        self.continued = 0
        self.eos = 0
        self.sections = {"START": 0, "PART": 0, "END": 0, "FULL": 0}
        self.per_section = []     # dicts like expected.json's ram_records_per_section
        self.ram_end = None
        self.first_non_ram = None
        self.vmdesc_at = None
        self.vmdesc_devices = None
        self.vectors = []         # dicts: old, new, enc, block, offset, pos, section, named
        self.trace = []           # lines


def parse(data, want_vectors, want_trace):
    p = Parsed()
    c = Cur(data)
    if c.be32("magic") != MAGIC:
        raise StreamError("not a QEMU migration stream (magic)")
    if c.be32("version") != 3:
        raise StreamError("stream version is not 3")
    if c.u8("configuration section") != CONFIG:
        raise StreamError("at byte 8: no configuration section")
    p.machine = c.take(c.be32("machine type length"), "machine type").decode()
    if c.pos < len(data) and data[c.pos] == SUBSECTION:
        raise StreamError("at byte %d: configuration subsections are not handled" % c.pos)

    ram_id = None
    section_index = 0
    block = None                  # previous page record's block (carries across sections)
    base = {}                     # block name -> global address of its first byte
    last_addr = None
    while True:
        at = c.pos
        kind = c.u8("section type")
        if kind in (START, FULL):
            sid = c.be32("section id")
            idstr = c.name("section id string")
            instance = c.be32("instance id")
            version = c.be32("version id")
            if idstr != "ram":
                p.ram_end = at
                p.first_non_ram = "%s section '%s' (id %d, instance %d, version %d)" % (
                    SECTION_NAME[kind], idstr, sid, instance, version)
                break
            if kind == FULL:
                raise StreamError("at byte %d: 'ram' as a FULL section" % at)
            ram_id = sid
        elif kind in (PART, END):
            sid = c.be32("section id")
            if sid != ram_id:
                p.ram_end = at
                p.first_non_ram = "%s section id %d" % (SECTION_NAME[kind], sid)
                break
        elif kind == EOF:
            p.ram_end = at
            p.first_non_ram = "EOF"
            break
        else:
            raise StreamError("at byte %d: section type 0x%02x not handled" % (at, kind))
        section_index += 1
        sname = SECTION_NAME[kind]
        p.sections[sname] += 1
        sec_counts = {"zero": 0, "page": 0, "xbzrle": 0}
        # records up to EOS
        while True:
            rec_at = c.pos
            hdr = c.be64("record header")
            flags, addr = hdr & 0xFFF, hdr & ~0xFFF
            if flags & F_EOS:
                p.eos += 1
                break
            if flags & F_MEM_SIZE:
                total = addr
                p.mem_size_total = total
                got = 0
                while got < total:
                    name = c.name("block name")
                    used = c.be64("block length")
                    p.blocks.append((name, used))
                    base[name] = got
                    p.ram[name] = bytearray(used)
                    got += used
                if got != total:
                    raise StreamError("at byte %d: MEM_SIZE lengths do not add up" % rec_at)
                continue
            if flags & F_CONTINUE:
                if block is None:
                    raise StreamError("at byte %d: CONTINUE without a previous block" % rec_at)
                p.continued += 1
                named = False
            else:
                block = c.name("block name")
                if block not in p.ram:
                    raise StreamError("at byte %d: unknown block %r" % (rec_at, block))
                p.named += 1
                named = True
            ram = p.ram[block]
            if addr + PAGE > len(ram):
                raise StreamError("at byte %d: page past the end of %s" % (rec_at, block))
            if flags & F_ZERO:
                fill = c.u8("fill byte")
                if fill:
                    p.zero_nonzero_fill += 1
                ram[addr:addr + PAGE] = bytes([fill]) * PAGE
                k = "zero"
            elif flags & F_PAGE:
                ram[addr:addr + PAGE] = c.take(PAGE, "page")
                k = "page"
            elif flags & F_XBZRLE:
                if c.u8("xbzrle encoding") != 0x01:
                    raise StreamError("at byte %d: XBZRLE encoding is not 0x01" % rec_at)
                n = c.be16("xbzrle length")
                if not 1 <= n <= PAGE:
                    raise StreamError("at byte %d: XBZRLE length %d" % (rec_at, n))
                enc = c.take(n, "xbzrle delta")
                where = "record at byte %d" % rec_at
                runs = runs_of(enc, where)
                page = ram[addr:addr + PAGE]
                old = bytes(page) if want_vectors else None
                apply_delta(page, runs)
                ram[addr:addr + PAGE] = page
                if want_vectors:
                    p.vectors.append({"old": old, "new": bytes(page), "enc": bytes(enc),
                                      "runs": runs, "block": block, "offset": addr,
                                      "pos": rec_at, "section": section_index,
                                      "section_type": sname, "named": named,
                                      "record": bytes(data[rec_at:c.pos]), "header": hdr})
                k = "xbzrle"
            else:
                raise StreamError("at byte %d: record flags 0x%03x not handled" % (rec_at, flags))
            p.counts[k] += 1
            sec_counts[k] += 1
            if want_trace:
                g = base[block] + addr
                if last_addr is not None and g <= last_addr:
                    p.trace.append("sync")
                last_addr = g
                p.trace.append("%s %x" % (k[0], g))
        if c.u8("section footer") != FOOTER or c.be32("footer section id") != ram_id:
            raise StreamError("at byte %d: no section footer after EOS" % (c.pos - 5))
        if any(sec_counts.values()):
            p.per_section.append({"section_index": section_index, "section_type": sname,
                                  **sec_counts})
    # VM description: 0x06, be32 length, JSON to the end, right after the EOF byte.
    pos = data.find(b"\x00\x06", p.ram_end)
    while pos >= 0:
        if pos + 6 <= len(data):
            (n,) = struct.unpack_from(">I", data, pos + 2)
            if pos + 6 + n == len(data) and data[pos + 6:pos + 7] == b"{":
                p.vmdesc_at = pos + 1
                p.vmdesc_devices = len(json.loads(data[pos + 6:])["devices"])
                break
        pos = data.find(b"\x00\x06", pos + 1)
    return p


def sha(b):
    return hashlib.sha256(b).hexdigest()


def write_vectors(p, out):
    h = hashlib.sha256()
    size = 0
    with open(os.path.join(out, "xbzrle-vectors.bin"), "wb") as f:
        for v in p.vectors:
            rec = b"".join((struct.pack("<I", PAGE), v["old"], struct.pack("<I", len(v["enc"])),
                            v["enc"], struct.pack("<I", PAGE), v["new"]))
            f.write(rec)
            h.update(rec)
            size += len(rec)
    with open(os.path.join(out, "xbzrle-vectors-index.tsv"), "w") as f:
        f.write("index\tblock\toffset\tstream_pos\tsection_index\tsection_type\tnamed\t"
                "enc_len\truns\tchanged_bytes\n")
        for i, v in enumerate(p.vectors):
            changed = sum(a != b for a, b in zip(v["old"], v["new"]))
            f.write("%d\t%s\t0x%x\t%d\t%d\t%s\t%d\t%d\t%d\t%d\n" % (
                i, v["block"], v["offset"], v["pos"], v["section"], v["section_type"],
                int(v["named"]), len(v["enc"]), len(v["runs"]), changed))
    return size, h.hexdigest()


def tiny_cases(p):
    """Short records (at most 4 runs): the first three, and the first whose
    page changes at byte 0 (first zero run 0)."""
    short = [i for i, v in enumerate(p.vectors) if len(v["runs"]) <= 4]
    picks = short[:3]
    first0 = next((i for i in short if p.vectors[i]["runs"][0][0] == 0), None)
    if first0 is not None and first0 not in picks:
        picks.append(first0)
    out = []
    for i in picks:
        v = p.vectors[i]
        out.append({
            "vector_index": i,
            "block": v["block"],
            "page_offset_in_block": "0x%x" % v["offset"],
            "stream_pos": v["pos"],
            "encoded_hex": v["enc"].hex(),
            "runs": [{"zero_run": z, "literal_len": n, "literal_hex": lit.hex()}
                     for z, n, lit in v["runs"]],
            "changes": [{"page_offset": o, "old_hex": a.hex(), "new_hex": b.hex()}
                        for o, a, b in changes_of(v["old"], v["new"])],
            "old_sha256": sha(v["old"]),
            "new_sha256": sha(v["new"]),
            "note": NOTE,
            "record_hex": v["record"].hex(),
            "record_header_be64": "0x%016x" % v["header"],
        })
    return out


def vector_stats(p, size, digest):
    encs = [v["enc"] for v in p.vectors]
    hist = {}
    for e in encs:
        b = 4
        while b < len(e):
            b *= 2
        hist[b] = hist.get(b, 0) + 1
    return {
        "count": len(encs),
        "uncompressed_bytes": size,
        "uncompressed_sha256": digest,
        "non_canonical_encodings": sum(canonical(v["old"], v["new"]) != v["enc"]
                                       for v in p.vectors),
        "first_zero_run_is_zero": sum(v["runs"][0][0] == 0 for v in p.vectors),
        "with_two_byte_uleb128": sum(any(z >= 0x80 or n >= 0x80 for z, n, _ in v["runs"])
                                     for v in p.vectors),
        "with_literal_run_of_128_or_more": sum(any(n >= 128 for _, n, _ in v["runs"])
                                               for v in p.vectors),
        "longest_literal_run": max((n for v in p.vectors for _, n, _ in v["runs"]), default=0),
        "longest_encoding": max(map(len, encs), default=0),
        "shortest_encoding": min(map(len, encs), default=0),
        "max_runs_in_one_record": max((len(v["runs"]) for v in p.vectors), default=0),
        "encoded_len_histogram_pow2_upper_bound": {str(k): hist[k] for k in sorted(hist)},
    }


def stream_stats(p, data, xbzrle):
    s = {"bytes": len(data), "sha256": sha(data), "records": dict(p.counts)}
    if xbzrle:
        s["zero_records_with_nonzero_fill"] = p.zero_nonzero_fill
        s["xbzrle_encoded_bytes_total"] = sum(len(v["enc"]) for v in p.vectors)
    s["records_with_block_name"] = p.named
    if xbzrle:
        s["records_with_continue"] = p.continued
    s["ram_sections"] = dict(p.sections)
    if xbzrle:
        s["eos_markers"] = p.eos
    s["ram_data_ends_at"] = p.ram_end
    if xbzrle:
        s["first_non_ram_section"] = p.first_non_ram + ": device state, not parsed"
        s["vmdescription_at"] = p.vmdesc_at
        s["vmdescription_devices"] = p.vmdesc_devices
    return s


def pmem_compare(p, pmem_path, guest_log):
    """pc.ram against a pmemsave of the stopped source, leaving out 0xA0000-0xFFFFF."""
    ram = p.ram["pc.ram"]
    with open(pmem_path, "rb") as f:
        pmem = f.read()
    workload = set()
    if guest_log:
        with open(guest_log, "rb") as f:
            for line in f.read().decode(errors="replace").splitlines():
                line = line.strip()
                if line.startswith("WORKLOAD pfnrun "):
                    for run in line[len("WORKLOAD pfnrun "):].split():
                        _, pfn, n = run.split(":")
                        workload.update(range(int(pfn, 16), int(pfn, 16) + int(n)))
    compared, differing, wl, wl_diff = 0, [], 0, 0
    for pn in range(min(len(ram), len(pmem)) // PAGE):
        if 0xA0 <= pn < 0x100:
            continue
        compared += 1
        a = pn * PAGE
        same = ram[a:a + PAGE] == pmem[a:a + PAGE]
        if not same:
            differing.append(a)
        if pn in workload:
            wl += 1
            wl_diff += not same
    return {
        "pages_compared": compared,
        "pages_differing": len(differing),
        "first_differing_offsets": ["0x%x" % a for a in differing[:16]],
        "workload_pages": wl,
        "workload_pages_differing": wl_diff,
        "non_workload_pages_differing": len(differing) - wl_diff,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--xbzrle", required=True, help="the XBZRLE stream (uncompressed)")
    ap.add_argument("--plain", help="the plain stream made by the second QEMU (uncompressed)")
    ap.add_argument("--query-migrate", help="QEMU's final query-migrate of the XBZRLE run")
    ap.add_argument("--run-info", help="run-info.json of run_migration.py (for the QEMU version)")
    ap.add_argument("--pmem", help="pmemsave of the stopped source")
    ap.add_argument("--guest-log", help="guest serial log (workload page frames)")
    ap.add_argument("--label", default="regenerated")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    with open(args.xbzrle, "rb") as f:
        xdata = f.read()
    x = parse(xdata, want_vectors=True, want_trace=True)
    size, digest = write_vectors(x, args.out)
    with open(os.path.join(args.out, "page-trace.txt"), "w") as f:
        f.write(TRACE_HEADER + "\n")
        for line in x.trace:
            f.write(line + "\n")
    with open(os.path.join(args.out, "tiny-cases.json"), "w") as f:
        json.dump(tiny_cases(x), f, indent=2)

    exp = {"label": args.label}
    if args.run_info:
        with open(args.run_info) as f:
            info = json.load(f)
        ver = info.get("query-version", {})
        exp["qemu"] = {"package": ver.get("package", "").strip(), "qemu": ver.get("qemu")}
    exp["machine_type_in_stream"] = x.machine
    exp["page_size"] = PAGE
    exp["mem_size_total"] = x.mem_size_total
    pl = None
    if args.plain:
        with open(args.plain, "rb") as f:
            pdata = f.read()
        pl = parse(pdata, want_vectors=False, want_trace=False)
    exp["blocks"] = []
    for name, length in x.blocks:
        b = {"name": name, "length": length, "sha256": sha(x.ram[name])}
        if pl is not None:
            b["matches_plain"] = pl.ram.get(name) == x.ram[name]
        exp["blocks"].append(b)
    exp["xbzrle_stream"] = stream_stats(x, xdata, True)
    if pl is not None:
        exp["plain_stream"] = stream_stats(pl, pdata, False)
    exp["vectors"] = vector_stats(x, size, digest)
    checks = {}
    if pl is not None:
        checks["ram_blocks_identical_xbzrle_vs_plain"] = all(
            b["matches_plain"] for b in exp["blocks"])
    if args.query_migrate:
        with open(args.query_migrate) as f:
            qm = json.load(f)
        exp["query_migrate_xbzrle_cache"] = qm["xbzrle-cache"]
        exp["query_migrate_ram"] = {k: qm["ram"][k] for k in (
            "normal", "duplicate", "dirty-sync-count", "transferred", "total", "skipped")}
        xc = qm["xbzrle-cache"]
        formula = (sum(len(v["enc"]) + 3 for v in x.vectors) + PAGE * xc["overflow"]
                   == xc["bytes"])
        exp["derived"] = {
            "xbzrle_pages_skipped_unchanged": xc["pages"] - x.counts["xbzrle"] - xc["overflow"],
            "note": "QEMU 7.2 counts xbzrle-cache.pages = cache hits = XBZRLE records + overflow"
                    " + unchanged pages skipped (not in the stream); xbzrle-cache.bytes ="
                    " sum(enc_len+3) + 4096*overflow",
            "xbzrle_bytes_formula_holds": formula,
        }
        checks["normal_pages_match_query_migrate"] = qm["ram"]["normal"] == x.counts["page"]
        checks["zero_pages_match_query_migrate"] = qm["ram"]["duplicate"] == x.counts["zero"]
        checks["xbzrle_bytes_match_query_migrate"] = formula
    exp["ram_records_per_section"] = x.per_section
    checks["all_xbzrle_records_canonical"] = exp["vectors"]["non_canonical_encodings"] == 0
    exp["checks"] = checks
    if args.pmem:
        exp["pmemsave_comparison"] = pmem_compare(x, args.pmem, args.guest_log)
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(exp, f, indent=2)
    print("extract: %d XBZRLE records, %d trace lines, %d sync lines" % (
        len(x.vectors), len(x.trace), x.trace.count("sync")))
    if pl is not None and not checks["ram_blocks_identical_xbzrle_vs_plain"]:
        print("extract: RAM from the XBZRLE stream differs from the plain stream", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
