#!/usr/bin/env python3
"""Have a QEMU >= 9.0 write (and optionally load) a mapped-ram migration file.

Save: boots QEMU (TCG, -S), lets it run --run-seconds (firmware only, or the
tiny guest of build_guest.sh with --guest), stops it, sets the `mapped-ram`
capability (plus `multifd` with --multifd) and runs `migrate file:OUT/qemu-mapped-ram.bin`.
Also writes `OUT/ram.pmem` (pmemsave of guest-physical [0, mem) of the stopped
guest), `OUT/info-ramblock.txt`, `OUT/query-migrate.json`, `OUT/run-info.json`.

Load (--load FILE): starts a second QEMU with `-S -incoming defer`, sets the same
capabilities and runs `migrate-incoming file:FILE`; prints the final status
(completed or failed with QEMU's error) and writes `OUT/load-result.json`.

Standard library only; QMP helpers come from run_migration.py beside it.
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_migration import QMP, poll_migration  # noqa: E402


def qemu_cmd(args, extra):
    cmd = [args.qemu, "-machine", args.machine, "-accel", "tcg", "-m", str(args.mem),
           "-nodefaults", "-no-user-config", "-display", "none"]
    if args.bios_dir:
        cmd += ["-L", args.bios_dir]
    if args.guest:
        cmd += ["-kernel", os.path.join(args.guest, "vmlinuz"),
                "-initrd", os.path.join(args.guest, "initrd.gz"),
                "-append", "console=ttyS0 init_on_free=1 WL_SEED=1 WL_MIB=8 WL_DELAY_MS=20"]
    return cmd + extra


def caps(args):
    c = [{"capability": "mapped-ram", "state": True}]
    if args.multifd:
        c.append({"capability": "multifd", "state": True})
    return c


def run_qemu(args, out, name, extra):
    sock = os.path.join(out, "qmp-%s.sock" % name)
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = qemu_cmd(args, extra + ["-qmp", "unix:%s,server=on,wait=off" % sock])
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(out, "qemu-%s.out" % name), "w"),
                            stderr=subprocess.STDOUT)
    return proc, sock, cmd


def save(args, out, transcript, info):
    proc, sock, cmd = run_qemu(args, out, "save",
                               ["-S", "-serial", "file:" + os.path.join(out, "guest.log")])
    info["save_cmd"] = cmd
    try:
        q = QMP(sock, transcript, "save")
        info["query-version"] = q.execute("query-version")
        q.execute("cont")
        time.sleep(args.run_seconds)
        q.execute("stop")
        with open(os.path.join(out, "info-ramblock.txt"), "w") as f:
            f.write(q.hmp("info ramblock"))
        q.execute("migrate-set-capabilities", {"capabilities": caps(args)})
        info["capabilities"] = caps(args)
        path = os.path.join(out, "qemu-mapped-ram.bin")
        if os.path.exists(path):
            os.unlink(path)
        q.execute("migrate", {"uri": "file:" + path})
        res = poll_migration(q, "save", out)
        info["save_status"] = res.get("status")
        with open(os.path.join(out, "query-migrate.json"), "w") as f:
            json.dump(res, f, indent=2, sort_keys=True)
        q.execute("pmemsave", {"val": 0, "size": args.mem * 1024 * 1024,
                               "filename": os.path.join(out, "ram.pmem")})
        q.execute("quit", check=False)
        proc.wait(timeout=30)
        print("saved", path, "size", os.path.getsize(path),
              "allocated", os.stat(path).st_blocks * 512, flush=True)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def load(args, out, transcript, info):
    proc, sock, cmd = run_qemu(args, out, "load", ["-S", "-incoming", "defer", "-serial", "null"])
    info["load_cmd"] = cmd
    result = {"file": args.load}
    try:
        q = QMP(sock, transcript, "load")
        q.execute("migrate-set-capabilities", {"capabilities": caps(args)})
        q.execute("migrate-incoming", {"uri": "file:" + os.path.abspath(args.load)})
        try:
            res = poll_migration(q, "load", out, timeout=120)
            result["status"] = res.get("status")
            if args.mem:
                q.execute("pmemsave", {"val": 0, "size": args.mem * 1024 * 1024,
                                       "filename": os.path.join(out, "loaded.pmem")})
        except RuntimeError as e:
            result["status"] = "failed"
            result["error"] = str(e)
        q.execute("quit", check=False)
    except (EOFError, OSError) as e:
        result["status"] = "qemu exited"
        result["error"] = str(e)
    finally:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
        with open(os.path.join(out, "qemu-load.out")) as f:
            result["qemu_output"] = f.read()[-2000:]
    with open(os.path.join(out, "load-result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print("load:", json.dumps(result), flush=True)
    return 0 if result["status"] == "completed" else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--qemu", default="/opt/qemu-newer/usr/bin/qemu-system-x86_64")
    ap.add_argument("--bios-dir", help="passed as -L (default: share/qemu beside the binary's bin/)")
    ap.add_argument("--guest", help="folder with vmlinuz and initrd.gz (build_guest.sh); "
                                    "without it only the firmware runs")
    ap.add_argument("--machine", default="pc")
    ap.add_argument("--mem", type=int, default=128, help="guest RAM in MiB")
    ap.add_argument("--run-seconds", type=float, default=2.0)
    ap.add_argument("--multifd", action="store_true")
    ap.add_argument("--load", help="a mapped-ram file for a fresh QEMU to load (skips saving)")
    args = ap.parse_args()
    if args.bios_dir is None:
        guess = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.qemu))), "share", "qemu")
        args.bios_dir = guess if os.path.isdir(guess) else None
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    info = {"args": vars(args)}
    transcript = open(os.path.join(out, "qmp-transcript.jsonl"), "a")
    try:
        if args.load:
            return load(args, out, transcript, info)
        save(args, out, transcript, info)
        return 0
    finally:
        with open(os.path.join(out, "run-info.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        transcript.close()


if __name__ == "__main__":
    sys.exit(main())
