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
        hole = human_bytes(t["largest_free_bytes"]) if "largest_free_bytes" in t else "-"
        rows.append(
            [t["name"], human_bytes(t["used_bytes"]), human_bytes(cap),
             f"{100 * t['used_bytes'] / cap:.1f}%" if cap else "-", str(t["entries"]), ratio, frag, hole]
        )  # fmt: skip
    head = ["TIER", "USED", "CAPACITY", "USE%", "ENTRIES", "RATIO", "FRAGMENTED", "LARGEST HOLE"]
    print(_table(rows, head))
    for t in s["tiers"]:
        if t["name"] == "disk":
            codecs = ", ".join(f"{k} {v}" for k, v in sorted(t.get("by_codec", {}).items())) or "none"
            print(
                f"disk: {t['path']}: {human_bytes(t['raw_bytes'])} of tensors stored in "
                f"{human_bytes(t['stored_bytes'])} (entries by codec: {codecs})"
            )
        if t["name"] == "gpu":
            dev, speeds = t["device"], t.get("copy_gbps") or {}
            link = f", PCIe gen {dev['pcie_gen']} x{dev['pcie_width']}" if "pcie_gen" in dev else ""
            copies = f"; copies H2D {speeds['h2d']} GB/s, D2H {speeds['d2h']} GB/s" if speeds else ""
            print(
                f"gpu: {dev['name']} (device {dev['index']}, backend {dev['backend']}{link}): "
                f"{human_bytes(dev['free_bytes'])} free of {human_bytes(dev['total_bytes'])}; "
                f"{t['slabs']} slabs, {human_bytes(t['slab_bytes'])}{copies}"
            )
    print(f"clients {s['clients']}  leases {s['leases']}")
    c = s["counters"]
    print("counters " + "  ".join(f"{k} {v}" for k, v in c.items() if v or k in ("gets", "puts")))
    pf = s.get("prefetch")
    if pf:
        rate = pf["recent_hit_rate"]
        using = pf["predictor_stats"].get("using")
        parts = [
            f"predictor {pf['predictor']}" + (f" (using {using})" if using else ""),
            f"recent RAM hit rate {'-' if rate is None else f'{rate:.0%}'}",
            f"{c.get('prefetch_used', 0)} of {c.get('prefetch_issued', 0)} prefetches used",
            f"budget {human_bytes(pf['speculative_bytes'])} / {human_bytes(pf['budget_bytes'])}",
        ]
        if pf["predictor_errors"]:
            parts.append(f"predictor errors {pf['predictor_errors']} (last: {pf['last_error']})")
        print("prefetch: " + ", ".join(parts))
        _print_auto(pf)
    pl = s.get("placement")
    if pl:
        print(
            f"placement: {pl['policy']} eviction, demote above {pl['ram_high_watermark']:.0%} of RAM "
            f"down to {pl['ram_low_watermark']:.0%}; tag codecs {pl['tag_codecs'] or 'none'}"
        )
        ram_cap = next((t["capacity_bytes"] for t in s.get("tiers", []) if t["name"] == "ram"), None)
        ceiling = pl.get("ram_ceiling_bytes")
        if ceiling is not None and ram_cap and ceiling < ram_cap:
            print(f"memory pressure: RAM tier held at {ceiling / 2**20:.0f} of {ram_cap / 2**20:.0f} MiB")
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
    print_eviction(s.get("eviction"), s.get("eviction_training"))
    print_hardware(s.get("hardware") or {})


def _print_auto(pf: dict[str, Any]) -> None:
    """The predictor block: which candidate ``auto`` follows and why (each one's recent score:
    read bytes saved net of waste and CPU, the share saved, precision, wasted bytes, CPU per access),
    and the predictor thread's cost."""
    ps = pf["predictor_stats"]
    work = pf.get("work_us_mean")
    cost = ""
    if work is not None:
        cost = f"; predictor thread {work} us/access (max of last 1000: {pf['work_us_max_recent']})"
    if "scores" not in ps or "using" not in ps:
        if cost:
            print("predictor:" + cost[1:])
        return
    print(f"predictor: auto follows {ps['using']} ({ps['switches']} switches, {ps['gets']} gets scored, "
          f"{ps['shadowed_share']:.0%} of accesses shadowed){cost}")  # fmt: skip
    for name, sc in ps["scores"].items():
        prec = "-" if sc["precision"] is None else f"{sc['precision']:.0%}"
        mark = "*" if name == ps["using"] else " "
        print(f"  {mark} {name:<10} score {sc['score']:+.3f}  saved {sc['hit_rate']:.1%} of read bytes  "
              f"precision {prec}  wasted {human_bytes(sc['wasted_bytes'])}  "
              f"{sc['us_per_access']} us/access")  # fmt: skip


def print_eviction(ev: dict[str, Any] | None, training: dict[str, Any] | None) -> None:
    """The eviction line of ``status``: the policy, which one ``auto`` follows and why (each
    candidate's byte miss ratio in its shadow cache over the recent gets), the model's trainings."""
    if not ev:
        return
    line = f"eviction: {ev['name']}"
    if ev.get("using"):
        ratios = {n: sc["byte_miss_ratio"] for n, sc in ev["scores"].items()}
        scores = ", ".join(f"{n} {'-' if r is None else f'{r:.1%}'}" for n, r in ratios.items())
        gets = max((sc["gets"] for sc in ev["scores"].values()), default=0)
        n = ev["switches"]
        line += (f" following {ev['using']} ({n} switch{'' if n == 1 else 'es'}); byte miss ratio in shadow "
                 f"caches over the last {gets} gets: {scores}")  # fmt: skip
        line += _eviction_why(ev)
    learned = ev if ev["name"] == "learned" else (ev.get("candidates") or {}).get("learned")
    if learned:
        line += f"; learned model trained {learned['trained']}x"
        if training and training.get("fits"):
            line += f" (last fit {training['last_fit_s']:.1f}s)"
    print(line)


def _eviction_why(ev: dict[str, Any]) -> str:
    """auto's switching test as it stands: each other candidate's t (paired lead over runs of gets)
    against the threshold, and what the last switch was made on."""
    rule, evidence = ev.get("rule"), ev.get("evidence") or {}
    if not rule:
        return ""
    parts = []
    for name, e in evidence.items():
        t = "-" if e.get("t") is None else f"{e['t']:.1f}"
        parts.append(f"{name} t {t} ({e['batches']} runs)")
    out = (f"; a switch needs t >= {rule['t_min']} over >= {rule['min_batches']} runs of {rule['batch']} "
           f"gets and a saving over {rule['horizon']} gets above its cost: "
           f"{', '.join(parts) or 'not tested yet'}")  # fmt: skip
    last = ev.get("last_switch")
    if last:
        out += (f"; last switch {last['from']} -> {last['to']} at get {last['at_get']}: t {last['t']:.1f}, "
                f"saving {human_bytes(last['gain_bytes'])} > cost "
                f"{human_bytes(last['switch_bytes'])}")  # fmt: skip
    return out


def print_hardware(hw: dict[str, Any]) -> None:
    """The machine lines of ``status`` (tierd.hardware's report)."""
    if not hw:
        print("machine: not read yet")
        return
    phys = hw.get("cpu_physical_cores")
    print(
        f"machine: {hw.get('cpu_model') or 'unknown CPU'}, {hw.get('cpu_cores')} cores"
        + (f" ({phys} physical)" if phys and phys != hw.get("cpu_cores") else "")
        + f", {human_bytes(hw.get('ram_bytes') or 0)} RAM"
    )
    dev = hw.get("state_device") or {}
    if dev.get("device"):
        kind = "NVMe" if dev.get("nvme") else "not NVMe"
        kind += {True: ", rotational", False: ", non-rotational", None: ""}[dev.get("rotational")]
        where = (
            f"{dev['device']}{' ' + dev['model'] if dev.get('model') else ''} ({kind}, {dev.get('fstype')})"
        )
    else:
        where = f"no block device ({dev.get('fstype') or 'unknown file system'})"
    print(f"state dir: {dev.get('path', '?')} on {where}")
    gpus = hw.get("gpus") or []
    if gpus:
        for g in gpus:
            print(f"gpu {g['index']}: {g['name']}, {human_bytes(g['memory_bytes'])}, driver {g['driver']}")
    else:
        print(f"gpus: {hw.get('gpu_note', 'none')}")


def print_clients(clients: list[dict[str, Any]], me: int = 0) -> None:
    rows = [
        [str(k["id"]) + (" (this tierctl)" if k["id"] == me else ""), k["name"] or "-", str(k["pid"]),
         str(k["uid"]), _ago(k["since"]), str(k["leases"]), human_bytes(k["leased_bytes"]),
         human_bytes(k["put_bytes"]), f"{k['open_puts']} / {human_bytes(k['open_put_bytes'])}",
         str(k["requests"])]
        for k in clients
    ]  # fmt: skip
    head = ["ID", "NAME", "PID", "UID", "SINCE", "LEASES", "LEASED", "PUT", "OPEN PUTS", "REQUESTS"]
    print(_table(rows, head))


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


def print_remote_entries(entries: list[dict[str, Any]]) -> None:
    if not entries:
        print("(no entries in the remote tier)")
        return
    rows = [
        [e["key"], e["dtype"], "x".join(map(str, e["shape"])) or "()", human_bytes(e["nbytes"]),
         human_bytes(e["stored_bytes"]), "yes" if e["here"] else "no", ",".join(e["tags"]) or "-"]
        for e in entries
    ]  # fmt: skip
    print(_table(rows, ["KEY", "DTYPE", "SHAPE", "SIZE", "STORED", "HERE", "TAGS"]))
    print(f"{len(entries)} entries in the remote tier, {human_bytes(sum(e['nbytes'] for e in entries))}")


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


def print_why(w: dict[str, Any]) -> None:
    """``tierctl why``: where an entry is and why, as sentences."""
    shape = "x".join(map(str, w["shape"])) or "()"
    print(f"{w['key']} v{w['version']}: {w['dtype']} {shape}, {human_bytes(w['nbytes'])}"
          f"{', tags ' + ','.join(w['tags']) if w['tags'] else ''}"
          f"{', durable' if w['durable'] else ''}, scope {w['scope']}"
          f"{', ttl ' + str(w['ttl']) + 's' if w['ttl'] else ''}")  # fmt: skip
    places = []
    for loc in w["where"]:
        rec = loc.get("record")
        if rec is None:
            places.append(f"{loc['tier']} (offset {loc['offset']})")
        else:
            places.append(f"{loc['tier']} ({rec['codec']}, {human_bytes(rec['stored_bytes'])} in "
                          f"{rec['chunks']} chunks)")  # fmt: skip
    print("where:      " + ", ".join(places))
    print(f"last read:  {_ago(w['last_access'])} (idle {w['idle_seconds']:.0f}s)")
    held = [f"{k['leases']} by client {k['client']} ({k.get('name') or '-'}, pid {k.get('pid', '?')}, "
            f"uid {k.get('uid', '?')})" for k in w["leases"]]  # fmt: skip
    print("leases:     " + ("; ".join(held) if held else "none"))
    print("pinned:     " + (", ".join(w["pinned"]) if w["pinned"] else "no"))
    for v in w["older_versions"]:
        print(f"older:      v{v['version']} still held ({v['leases']} leases) in {', '.join(v['tiers'])}")
    if w["moving"]:
        print("moving:     a move between tiers is in flight")
    for ev in w["eviction"]:
        rank = f"{ev['rank']} of {ev['of']}" if ev["rank"] else "not ranked"
        kept = ev["kept_because"]
        state = f"kept: {kept}" if kept is not None else "may be demoted"
        if ev["next_victim"]:
            state = "next to be demoted"
        print(f"eviction:   {ev['tier']} {ev['policy']} rank {rank} (1 = coldest); {state}; tier at "
              f"{human_bytes(ev['used_bytes'])}, demotes above {human_bytes(ev['high_watermark_bytes'])} "
              f"down to {human_bytes(ev['low_watermark_bytes'])}")  # fmt: skip
    if not w["eviction"]:
        print("eviction:   in no memory tier (a get promotes it)")
    p = w["prediction"]
    parts = [f"predictor {p['predictor']}"]
    q = p["queued"]
    if q:
        parts.append(f"queued for a prefetch at position {q['position']} "
                     f"({'hinted' if q['hinted'] else 'predicted'} for client {q['client']}"
                     f"{', stale' if q['stale'] else ''})")  # fmt: skip
    if p["prefetched_unread"]:
        parts.append("prefetched and not read yet")
    last = p["last_prediction"]
    if last:
        parts.append(f"last predicted {last['seconds_ago']:.1f}s ago after {last['after']} "
                     f"(confidence {last['confidence']:.2f}, client {last['client']})")  # fmt: skip
    elif not q and not p["prefetched_unread"]:
        parts.append("not expected soon")
    print("prediction: " + "; ".join(parts))
    c = w["codec"]
    if c["stored"]:
        extra = f", {c['ratio']:.2f}x" if c.get("ratio") else ""
        lossy = f", lossy (max relative error {c['error_bound']:g})" if c.get("error_bound") else ""
        print(f"codec:      {c['codec']}{extra}{lossy}: {c['reason']}")
    else:
        print(f"codec:      {c['codec'] or '(not chosen yet)'}: {c['reason']}")


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

    cmd("status", "tiers (used, capacity, fragmentation, largest hole), clients, leases and counters")
    cmd("clients", "connected clients: name, pid, uid, since, leases and bytes leased, bytes put, requests")
    ls = cmd("ls", "list entries")
    ls.add_argument("--prefix", default="", help="only keys starting with this (e.g. a namespace 'qwen/')")
    ls.add_argument("prefix_pos", nargs="?", default=None, metavar="PREFIX", help="same as --prefix")
    ls.add_argument(
        "--remote", action="store_true",
        help="list what the remote tier (Redis Cluster, shared by several machines) holds, not this daemon",
    )  # fmt: skip
    cmd("show", "one entry: dtype, shape, size, tiers, encoding, leases, pins, tags").add_argument("key")
    cmd(
        "why",
        "where an entry is and why: tiers, leases by client, pins, last read, eviction rank, "
        "prediction, codec and the policy's reason",
    ).add_argument("key")
    cmd("rm", "delete an entry (readers holding leases keep it until they release)").add_argument("key")
    pin = cmd("pin", "keep an entry in a tier until unpinned")
    pin.add_argument("key")
    pin.add_argument("--tier", default="ram", help="tier to pin in [default: ram]")
    cmd("unpin", "drop the pins on an entry").add_argument("key")
    cmd("evict", "push an entry down to the disk tier now (it stays readable)").add_argument("key")
    tr = sub.add_parser(
        "trace",
        help="record the daemon's access log to a file, or replay one offline",
        description="Record reads as a trace file, or replay a trace against a predictor offline (no daemon "
        "needed) to see what prefetching would do on your workload.",
    )
    trs = tr.add_subparsers(dest="trace_cmd", required=True, metavar="record|replay")
    rec = trs.add_parser("record", help="append the daemon's accesses to FILE for N seconds")
    rec.add_argument("file")
    rec.add_argument("--seconds", type=float, default=60.0, help="how long to record [60]")
    rep_ = trs.add_parser("replay", help="replay FILE offline: hit rate, wasted prefetch bytes, stall time")
    rep_.add_argument("file")
    rep_.add_argument("--predictor", default="all", help="none, sequence, learned, auto, or all [all]")
    rep_.add_argument(
        "--ram-bytes", default=None, help="RAM tier to simulate [2/3 of the trace's working set]"
    )
    rep_.add_argument("--budget", default=None, help="speculative prefetch budget [10%% of the RAM tier]")
    rep_.add_argument("--depth", type=int, default=2, help="keys prefetched after each read [2]")
    rep_.add_argument("--disk-gbps", type=float, default=1.5, help="disk read speed to simulate [1.5]")
    rep_.add_argument("--json", action="store_true", help="print JSON instead of a table")
    imp = sub.add_parser(
        "import",
        help="ingest a model checkpoint (safetensors) as durable weight entries",
        description="Read a checkpoint folder's safetensors tensor by tensor and store each as a durable "
        "entry NAMESPACE/<parameter name> tagged 'weight'; entries already there with the same bytes are "
        "skipped.",
    )
    imp.add_argument("checkpoint", help="folder with config.json and *.safetensors")
    imp.add_argument("--namespace", default=None, help="key prefix [the folder's name]")
    imp.add_argument("--codec", default=None, help="disk codec for the weights (raw, zstd, int8, bf16, fp16)")
    imp.add_argument("--json", action="store_true", help="print the counts as JSON")
    ver = cmd("verify", "read every entry's disk copy and check its checksums (durable ones first)")
    ver.add_argument("--prefix", default="", help="only keys starting with this")
    add_watch_commands(sub)
    return p


def add_watch_commands(sub: Any) -> None:
    """``metrics`` and ``top``: watching the daemon (run by :func:`run_watch`)."""
    sub.add_parser(
        "metrics",
        help="print the daemon's metrics in the Prometheus text format",
        description="Print the daemon's metrics in the Prometheus text format (0.0.4): the same text as "
        "tierd's --metrics-listen endpoint and --metrics-textfile, rendered from one status snapshot. "
        "For scripts, or for node_exporter's textfile collector: tierctl metrics > DIR/tierd.prom.tmp "
        "&& mv DIR/tierd.prom.tmp DIR/tierd.prom",
    )
    top = sub.add_parser(
        "top",
        help="live view: tiers, hit rates, promotion/demotion bandwidth, busiest clients, hottest entries",
        description="A live view of the daemon, refreshed every second (q quits): tiers as bars (used, "
        "ceiling, capacity), gets per second and RAM hit rate, promotion and demotion bandwidth, disk "
        "reads and writes, the busiest clients and the hottest entries of the last 30 seconds.",
    )
    top.add_argument("--once", action="store_true", help="print one frame (rates over 0.5 s) and exit")


def run_watch(args: argparse.Namespace) -> int:
    from tierd_client import Client

    with Client(args.socket) as c:
        if args.cmd == "metrics":
            from tierd.exposition import render

            sys.stdout.write(render(c.stats()).decode())
            return 0
        from tierd_client.top import run_top

        return run_top(c, once=args.once)


def import_checkpoint(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tierd_client import Client

    try:
        from tierd_integration import ingest
    except ImportError as e:  # the model extra is not installed: say which one to install
        print(f"tierctl import: {e}", file=sys.stderr)
        return 2
    folder = Path(args.checkpoint)
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        print(f"tierctl: {folder} is not a checkpoint folder (no *.safetensors in it)", file=sys.stderr)
        return 2
    namespace = args.namespace or folder.resolve().name
    with Client(args.socket) as c:
        counts = ingest(c, folder, namespace, codec=args.codec, progress=not args.json)
    if args.json:
        json.dump(counts, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    return 0


def trace_record(args: argparse.Namespace) -> int:
    from tierd.predict.log import from_row, write_trace
    from tierd_client import Client

    with Client(args.socket) as c:
        since = c.trace(limit=0)["now"]  # only what happens from now on
        end = time.monotonic() + args.seconds
        total = 0
        write_trace(args.file, [], append=False)
        while True:
            got = c.trace(since)
            rows = got["accesses"]
            if rows:
                accesses = [from_row(r) for r in rows]
                write_trace(args.file, accesses, append=True)
                since = accesses[-1].t
                total += len(accesses)
            left = end - time.monotonic()
            print(
                f"\rrecorded {total} accesses, {max(0, left):.0f}s left ", end="", file=sys.stderr, flush=True
            )
            if left <= 0:
                break
            time.sleep(min(0.5, left))
    print(f"\nwrote {total} accesses to {args.file}", file=sys.stderr)
    return 0


def trace_replay(args: argparse.Namespace) -> int:
    from tierd.config import ConfigError, parse_size
    from tierd.predict import PREDICTOR_NAMES
    from tierd.predict.log import read_trace
    from tierd.predict.simulate import format_result, replay

    trace = read_trace(args.file)
    if not trace:
        print(f"tierctl: {args.file} holds no accesses", file=sys.stderr)
        return 1
    sizes: dict[str, int] = {}
    for a in trace:
        sizes[a.key] = a.nbytes
    working = sum(sizes.values())
    try:
        ram = parse_size(args.ram_bytes) if args.ram_bytes else max(1, working * 2 // 3)
        budget = parse_size(args.budget, ram) if args.budget else ram // 10
    except ConfigError as e:
        print(f"tierctl: {e}", file=sys.stderr)
        return 2
    names = [n for n in PREDICTOR_NAMES] if args.predictor == "all" else [args.predictor]
    if any(n not in PREDICTOR_NAMES for n in names):
        print(f"tierctl: unknown predictor {args.predictor!r} (known: {', '.join(PREDICTOR_NAMES)}, all)",
              file=sys.stderr)  # fmt: skip
        return 2
    results = {}
    for name in names:
        r = replay(trace, name, ram_bytes=ram, prefetch_budget_bytes=budget, depth=args.depth,
                   disk_gbps=args.disk_gbps)  # fmt: skip
        results[name] = r.to_dict()
        if not args.json:
            print(f"== {name} ==")
            print(format_result(r))
    if args.json:
        json.dump({"trace": args.file, "accesses": len(trace), "ram_bytes": ram, "budget_bytes": budget,
                   "results": results}, sys.stdout, indent=2)  # fmt: skip
        sys.stdout.write("\n")
    else:
        print(
            f"({len(trace)} accesses to {len(sizes)} keys, {human_bytes(working)} working set, "
            f"simulated RAM {human_bytes(ram)}, prefetch budget {human_bytes(budget)})"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    from tierd_client import Client

    if args.cmd == "trace":
        return trace_record(args) if args.trace_cmd == "record" else trace_replay(args)
    if args.cmd == "import":
        return import_checkpoint(args)
    if args.cmd in ("metrics", "top"):
        return run_watch(args)

    with Client(args.socket) as c:
        out: Any
        if args.cmd == "status":
            out = c.stats()
            if not args.json:
                print_status(out)
        elif args.cmd == "clients":
            out = c.stats()["client_list"]
            if not args.json:
                print_clients(out, me=c.client_id)
        elif args.cmd == "ls":
            prefix = args.prefix_pos if args.prefix_pos is not None else args.prefix
            out = c.ls(prefix, remote=args.remote)
            if not args.json:
                print_remote_entries(out) if args.remote else print_entries(out)
        elif args.cmd == "show":
            out = c.stat(args.key)
            if not args.json:
                print_entry(out)
        elif args.cmd == "why":
            out = c.why(args.key)
            if not args.json:
                print_why(out)
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
