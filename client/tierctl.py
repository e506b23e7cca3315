"""tierctl: inspect and steer a running tierd from a shell.

Every command that prints data takes ``--json`` for scripts; the default is a table for people.
Exit status: 0 ok, 1 the daemon said no (e.g. no such key), 2 no daemon / bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tierd.errors import DaemonUnavailable, TierdError


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    return "\n".join(lines)


def _ago(ts: float) -> str:
    d = max(0.0, time.time() - ts)
    return f"{d:.0f}s ago" if d < 120 else f"{d / 60:.0f}m ago" if d < 7200 else f"{d / 3600:.1f}h ago"


def print_status(s: dict[str, Any]) -> None:
    d = s.get("daemon", {})
    print(
        f"tierd {d.get('version', '?')} (pid {d.get('pid', '?')}, {d.get('loop', '?')} loop, "
        f"up {d.get('uptime_s', 0):.0f}s) on {d.get('socket', '?')}"
    )
    rows = []
    for t in s["tiers"]:
        cap = t["capacity_bytes"]
        ratio = f"{t['ratio']:.2f}x" if "ratio" in t else "-"
        frag = f"{100 * t['fragmentation']:.1f}%" if "fragmentation" in t else "-"
        rows.append(
            [t["name"], human_bytes(t["used_bytes"]), human_bytes(cap),
             f"{100 * t['used_bytes'] / cap:.1f}%" if cap else "-", str(t["entries"]), ratio, frag]
        )  # fmt: skip
    print(_table(rows, ["TIER", "USED", "CAPACITY", "USE%", "ENTRIES", "RATIO", "FRAGMENTED"]))
    for t in s["tiers"]:
        if t["name"] == "disk":
            codecs = ", ".join(f"{k} {v}" for k, v in sorted(t.get("by_codec", {}).items())) or "none"
            print(
                f"disk: {t['path']}: {human_bytes(t['raw_bytes'])} of tensors stored in "
                f"{human_bytes(t['stored_bytes'])} (entries by codec: {codecs})"
            )
    print(f"clients {s['clients']}  leases {s['leases']}")
    c = s["counters"]
    print("counters " + "  ".join(f"{k} {v}" for k, v in c.items() if v or k in ("gets", "puts")))
    pl = s.get("placement")
    if pl:
        print(
            f"placement: {pl['policy']} eviction, demote above {pl['ram_high_watermark']:.0%} of RAM "
            f"down to {pl['ram_low_watermark']:.0%}; tag codecs {pl['tag_codecs'] or 'none'}"
        )
        cal = pl.get("calibration")
        if cal:
            z = ", ".join(f"{dt} {r['ratio']:.2f}x dec {r['decode_gbps']:.2f} GB/s"
                          for dt, r in sorted(cal.get("zstd", {}).items()))  # fmt: skip
            print(
                f"calibration: memcpy {cal['memcpy_gbps']:.1f} GB/s, disk write {cal['disk_write_gbps']:.2f} "
                f"/ read {cal['disk_read_gbps']:.2f} GB/s ({cal['disk_mode']}), zstd per core: {z}"
            )
        elif any(t["name"] == "disk" for t in s["tiers"]):
            print("calibration: running")


def print_entries(entries: list[dict[str, Any]]) -> None:
    if not entries:
        print("(no entries)")
        return
    rows = [
        [e["key"], f"v{e['version']}", e["dtype"], "x".join(map(str, e["shape"])) or "()",
         human_bytes(e["nbytes"]), ",".join(e["tiers"]), str(e["leases"]), ",".join(e["pinned"]) or "-",
         ",".join(e["tags"]) or "-"]
        for e in entries
    ]  # fmt: skip
    print(_table(rows, ["KEY", "VERSION", "DTYPE", "SHAPE", "SIZE", "TIERS", "LEASES", "PINNED", "TAGS"]))
    total = sum(e["nbytes"] for e in entries)
    print(f"{len(entries)} entries, {human_bytes(total)}")


def print_entry(e: dict[str, Any]) -> None:
    lossy = f" (lossy: max relative error {e['error_bound']:g})" if e.get("error_bound") else ""
    stored = e.get("stored_bytes")
    fields = [
        ("key", e["key"]), ("version", e["version"]), ("dtype", e["dtype"]), ("shape", e["shape"]),
        ("size", f"{human_bytes(e['nbytes'])} ({e['nbytes']} bytes)"),
        ("tiers", ", ".join(e["tiers"]) or "-"),
        ("encoding", f"{e['encoding']} on disk{lossy}" if stored is not None else "raw (RAM only)"),
        ("stored", f"{human_bytes(stored)} on disk ({e['nbytes'] / stored:.2f}x)"
                   if stored else "not on disk"),
        ("checksum", e.get("checksum") or "-"),
        ("leases", e["leases"]), ("pinned", ", ".join(e["pinned"]) or "no"),
        ("tags", ", ".join(e["tags"]) or "-"), ("durable", e["durable"]), ("scope", e["scope"]),
        ("ttl", f"{e['ttl']}s" if e["ttl"] else "none"),
        ("created", _ago(e["created"])), ("last access", _ago(e["last_access"])),
    ]  # fmt: skip
    w = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k.ljust(w)}  {v}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierctl",
        description="Inspect and steer a running tierd (its RAM tier, entries, leases and counters).",
        epilog="Exit status: 0 ok, 1 the daemon refused (e.g. no such key), 2 no daemon or bad usage.",
    )
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="tierd's socket (default: $TIERD_SOCKET, $XDG_RUNTIME_DIR/tierd/tierd.sock, /tmp/tierd-$UID/)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def cmd(name: str, help: str, json_flag: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
        return sp

    cmd("status", "tiers (used, capacity, fragmentation), clients, leases and counters")
    ls = cmd("ls", "list entries")
    ls.add_argument("--prefix", default="", help="only keys starting with this (e.g. a namespace 'qwen/')")
    ls.add_argument("prefix_pos", nargs="?", default=None, metavar="PREFIX", help="same as --prefix")
    cmd("show", "one entry: dtype, shape, size, tiers, encoding, leases, pins, tags").add_argument("key")
    cmd("rm", "delete an entry (readers holding leases keep it until they release)").add_argument("key")
    pin = cmd("pin", "keep an entry in a tier until unpinned")
    pin.add_argument("key")
    pin.add_argument("--tier", default="ram", help="tier to pin in [default: ram]")
    cmd("unpin", "drop the pins on an entry").add_argument("key")
    cmd("evict", "push an entry down to the disk tier now (it stays readable)").add_argument("key")
    ver = cmd("verify", "read every entry's disk copy and check its checksums (durable ones first)")
    ver.add_argument("--prefix", default="", help="only keys starting with this")
    return p


def run(args: argparse.Namespace) -> int:
    from tierd_client import Client

    with Client(args.socket) as c:
        out: Any
        if args.cmd == "status":
            out = c.stats()
            if not args.json:
                print_status(out)
        elif args.cmd == "ls":
            out = c.ls(args.prefix_pos if args.prefix_pos is not None else args.prefix)
            if not args.json:
                print_entries(out)
        elif args.cmd == "show":
            out = c.stat(args.key)
            if not args.json:
                print_entry(out)
        elif args.cmd == "rm":
            c.delete(args.key)
            out = {"deleted": args.key}
            if not args.json:
                print(f"deleted {args.key}")
        elif args.cmd == "pin":
            c.pin(args.key, args.tier)
            out = {"pinned": args.key, "tier": args.tier}
            if not args.json:
                print(f"pinned {args.key} in {args.tier}")
        elif args.cmd == "unpin":
            was = c.unpin(args.key)
            out = {"unpinned": args.key, "was_pinned": was}
            if not args.json:
                print(f"unpinned {args.key}" if was else f"{args.key} was not pinned")
        elif args.cmd == "evict":
            out = c.evict(args.key)
            if not args.json:
                where = ", ".join(out["tiers"])
                print(
                    f"evicted {args.key}: now in {where}"
                    if out["moved"]
                    else f"{args.key} already in {where}"
                )
        elif args.cmd == "verify":
            out = c.verify(args.prefix)
            bad = [r for r in out if not r["ok"]]
            if not args.json:
                for r in bad:
                    print(f"CORRUPT {r['key']} v{r['version']}: {r['error']}")
                print(
                    f"verified {len(out)} entries on disk "
                    f"({sum(r['durable'] for r in out)} durable): {len(bad)} corrupt"
                )
            if bad:
                if args.json:
                    json.dump(out, sys.stdout, indent=2, sort_keys=True)
                    sys.stdout.write("\n")
                return 1
        else:  # pragma: no cover - argparse refuses unknown commands
            raise AssertionError(args.cmd)
        if args.json:
            json.dump(out, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DaemonUnavailable as e:
        print(f"tierctl: {e}", file=sys.stderr)
        return 2
    except TierdError as e:
        print(f"tierctl: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `tierctl ls | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
