"""Remote tier (Redis Cluster): a remote read against raw GETs of the same bytes and against the
disk tier's cold read; a model from the remote tier against ingesting its checkpoint. One run.

    python bench/bench_remote.py [--size-mib 256] [--reps 3] [--model 2b-proportions] [--json OUT]

Starts a 3-node Redis Cluster on loopback (tests/redis_cluster.py: needs redis-server, which
scripts/setup.sh installs), daemon A (--remote) and daemon B (--remote, an empty state dir), and
daemon D (a disk tier, no remote). Then, per repetition, interleaved:

1. raw GETs (the limit): the entry's 16 MiB chunks fetched with the same client the remote tier uses
   (redis-py RedisCluster with hiredis, the same timeouts), by the same number of threads
   (``tierd.share.NET_THREADS``), bytes left in redis-py's reply objects. The same bytes, nothing
   decoded, checked or copied: what the network path and the client can do. And the same as the
   remote tier reads them: GETRANGEs of 512 KiB pipelined per chunk, nothing checked or copied.
2. remote read: daemon B gets the key (not in B: it reads the record, makes room, reads the chunks
   in parallel, checks xxh3 per chunk, copies into the RAM tier, leases), timed by the client;
   then B deletes its local copy so the next repetition reads the remote tier again.
3. disk cold read: daemon D's entry of the same size, evicted to its disk tier, page cache dropped
   (root), then got: the local tier a remote read competes with.

Then the model: daemon A ingests a random Qwen3-VL checkpoint (``--model``) with share=True and
waits until every share is written (timed: the write to the remote tier included), then daemon B
(no checkpoint files used) builds it with from_pretrained(None, namespace=...) (timed), and the two
models' logits on one input are compared (identical expected). Each repetition ingests under a new
namespace, so B starts from nothing each time. Ratios: raw GET time / remote time (1.0 = as fast
as the client's raw GETs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redis_cluster import LocalCluster  # noqa: E402 - the repository root first
from tierd import launch  # noqa: E402
from tierd_client import Client  # noqa: E402

GB = 1e9
#: 10 GbE: 1.25 GB/s on the wire; ~1.18 GB/s of TCP payload (1500-byte frames: 1448 of 1538 bytes)
TEN_GBE_PAYLOAD = 10e9 / 8 * 1448 / 1538


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def until(what: str, ok: Callable[[], bool], timeout: float = 600.0) -> None:
    deadline, delay = time.monotonic() + timeout, 0.005
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(delay)
        delay = min(0.1, delay * 2)


def counter(c: Client, name: str) -> int:
    return int(c.stats()["counters"][name])


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="bytes of the entry read [256]")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, interleaved [3]")
    ap.add_argument("--model", default="2b-proportions", help="random checkpoint size [2b-proportions]")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args()
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    from tierd.share import NET_THREADS
    from tierd_integration import from_pretrained, ingest, make_random_checkpoint, sample_inputs

    size = args.size_mib << 20
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    with tempfile.TemporaryDirectory(prefix="tierd-bench-remote-", dir="/var/tmp") as tmpdir:
        tmp = Path(tmpdir)
        cluster = LocalCluster(tmp / "redis")
        daemons: list[launch.Daemon] = []

        def start(name: str, *flags: str, disk: str = "0") -> launch.Daemon:
            d = tmp / name
            d.mkdir(exist_ok=True)
            daemon = launch.start(
                d / "s", "--state-dir", str(d / "state"), "--disk-bytes", disk, *flags,
                ram_bytes=f"{2 * args.size_mib + 256}MiB", log_path=d / "tierd.log",
            )  # fmt: skip
            daemons.append(daemon)
            return daemon

        remote = ("--remote", cluster.url, "--remote-prefix", "bench")
        try:
            a, b = start("a", *remote), start("b", *remote)
            disk = start("d", disk=f"{2 * args.size_mib + 64}MiB")
            t = torch.randn(size // 4, generator=torch.Generator().manual_seed(0))
            with Client(a.socket) as ca, Client(disk.socket) as cd:
                ca.put("bench/big", t, share=True)
                cd.put("bench/big", t)
                until("the share", lambda: counter(ca, "shares_written") >= 1)
            rc = RedisCluster(
                startup_nodes=[ClusterNode("127.0.0.1", p) for p in cluster.ports],
                socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0),
            )  # fmt: skip
            import msgspec

            from tierd.tiers.remote import RemoteRecord

            rec = msgspec.msgpack.decode(rc.get("bench:r:bench/big"), type=RemoteRecord)
            chunk_keys = [f"bench:c:{cid}" for cid in rec.ids]
            pool = ThreadPoolExecutor(NET_THREADS)
            piece = 512 << 10

            def pieces(key: str) -> int:
                pipe = rc.pipeline(transaction=False)
                for a in range(0, 16 << 20, piece):
                    pipe.getrange(key, a, a + piece - 1)
                return sum(len(p) for p in pipe.execute())

            raw_s, pieces_s, remote_s, disk_s, checks = [], [], [], [], []
            cold = True
            for rep in range(args.reps):
                t0 = time.perf_counter()
                got = list(pool.map(rc.get, chunk_keys))
                raw_s.append(time.perf_counter() - t0)
                assert sum(len(g) for g in got) == size
                del got
                t0 = time.perf_counter()
                assert sum(pool.map(pieces, chunk_keys)) == size
                pieces_s.append(time.perf_counter() - t0)
                with Client(b.socket) as cb:
                    t0 = time.perf_counter()
                    v = cb.get("bench/big")
                    remote_s.append(time.perf_counter() - t0)
                    checks.append(torch.equal(v, t))
                    cb.release(v)
                    del v
                    cb.delete("bench/big")
                with Client(disk.socket) as cd:
                    cd.evict("bench/big")
                    cold &= drop_caches()
                    t0 = time.perf_counter()
                    v = cd.get("bench/big")
                    disk_s.append(time.perf_counter() - t0)
                    checks.append(torch.equal(v, t))
                    cd.release(v)
                    del v
                print(f"rep {rep}: raw GETs {raw_s[-1]:.3f} s, in pieces {pieces_s[-1]:.3f} s, remote read "
                      f"{remote_s[-1]:.3f} s, disk cold read {disk_s[-1]:.3f} s", flush=True)  # fmt: skip
            pool.shutdown()
            rc.close()
            # what a remote read does beyond the raw GETs, per byte: check each chunk's xxh3, copy
            # it into the RAM tier (one thread here; the daemon spreads it over its GET threads)
            import numpy as np
            import xxhash

            src = np.random.default_rng(0).bytes(16 << 20)
            dst = np.empty(16 << 20, dtype=np.uint8)
            extra_s = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                for _ in range(size // len(src)):
                    xxhash.xxh3_64_intdigest(src)
                    np.copyto(dst, np.frombuffer(src, dtype=np.uint8))
                extra_s.append(time.perf_counter() - t0)

            # the model: A ingests with share=True, B builds it from the remote tier
            ckpt = make_random_checkpoint(tmp / "ckpt" / "model", size=args.model, seed=0)
            ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
            ingest_s, shared_s, pretrained_s, local_s, same = [], [], [], [], []
            for rep in range(args.reps):
                ns = f"m{rep}"
                with Client(a.socket) as ca:
                    before = counter(ca, "shares_written")
                    drop_caches()
                    t0 = time.perf_counter()
                    got = ingest(ca, ckpt, ns, share=True, progress=False)
                    ingest_s.append(time.perf_counter() - t0)
                    n = got["put"] + len(ca.ls(f"{ns}/.checkpoint/"))
                    until(
                        "the shares",
                        lambda ca=ca, n=n, before=before: counter(ca, "shares_written") >= before + n,
                    )
                    shared_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    model_a = from_pretrained(ckpt, ca, namespace=ns)  # nothing left to ingest
                    local_s.append(time.perf_counter() - t0)
                    inputs = sample_inputs(model_a, seed=1)
                    with torch.no_grad():
                        logits_a = model_a(**inputs).logits
                    from tierd_integration import detach

                    detach(model_a)
                with Client(b.socket) as cb:
                    t0 = time.perf_counter()
                    model_b = from_pretrained(None, cb, namespace=ns)
                    pretrained_s.append(time.perf_counter() - t0)
                    with torch.no_grad():
                        same.append(torch.equal(model_b(**inputs).logits, logits_a))
                    detach(model_b)
                print(f"model rep {rep}: A ingest {ingest_s[-1]:.3f} s (shared by {shared_s[-1]:.3f} s), "
                      f"B from_pretrained(None) {pretrained_s[-1]:.3f} s", flush=True)  # fmt: skip
        finally:
            for daemon in daemons:
                daemon.stop()
            cluster.close()

    raw, rem, dsk = med(raw_s), med(remote_s), med(disk_s)
    out = {
        "size_bytes": size,
        "reps": args.reps,
        "raw_get_s": raw_s, "raw_getrange_pieces_s": pieces_s, "remote_read_s": remote_s,
        "disk_cold_read_s": disk_s, "remote_vs_pieces": med(pieces_s) / rem,
        "raw_get_gbps": size / raw / GB, "remote_read_gbps": size / rem / GB,
        "disk_cold_read_gbps": size / dsk / GB,
        "remote_vs_raw": raw / rem, "remote_vs_disk": dsk / rem,
        "remote_vs_raw_each": [r / x for r, x in zip(raw_s, remote_s, strict=True)],
        "checksum_and_copy_s": extra_s,
        "page_cache_dropped": cold,
        "bytes_checked_equal": all(checks),
        "model": args.model, "checkpoint_bytes": ckpt_bytes,
        "ingest_s": ingest_s, "ingest_and_shared_s": shared_s, "from_pretrained_remote_s": pretrained_s,
        "from_pretrained_local_after_ingest_s": local_s,
        "logits_identical": all(same),
        "ten_gbe_payload_gbps": TEN_GBE_PAYLOAD / GB,
        "ten_gbe_entry_s": size / TEN_GBE_PAYLOAD,
        "load_average_end": os.getloadavg(),
    }  # fmt: skip
    warm = "" if cold else " (warm: not root)"
    ing, shr, pre = med(ingest_s), med(shared_s), med(pretrained_s)
    print()
    print(f"{args.size_mib} MiB entry, median of {args.reps} (min-max):")
    print(f"  raw GETs, same client, {NET_THREADS} threads  {raw:.3f} s ({spread(raw_s)})  "
          f"{out['raw_get_gbps']:.2f} GB/s")  # fmt: skip
    print(f"  raw GETRANGEs of 512 KiB, pipelined per chunk, same threads  {med(pieces_s):.3f} s "
          f"({spread(pieces_s)})  {size / med(pieces_s) / GB:.2f} GB/s")  # fmt: skip
    print(f"  remote read (daemon B get)         {rem:.3f} s ({spread(remote_s)})  "
          f"{out['remote_read_gbps']:.2f} GB/s = {out['remote_vs_raw']:.2f}x raw GETs, "
          f"{out['remote_vs_pieces']:.2f}x raw GETRANGEs")  # fmt: skip
    print(f"  of which CPU work beyond the GETs: xxh3 + copy into the arena, one thread: "
          f"{med(extra_s):.3f} s ({spread(extra_s)})")  # fmt: skip
    print(f"  disk cold read (daemon D get){warm}  {dsk:.3f} s ({spread(disk_s)})  "
          f"{out['disk_cold_read_gbps']:.2f} GB/s; remote = {out['remote_vs_disk']:.2f}x disk")  # fmt: skip
    print(f"  at 10 GbE ({out['ten_gbe_payload_gbps']:.2f} GB/s of payload) the wire alone takes "
          f"{out['ten_gbe_entry_s']:.3f} s for it")  # fmt: skip
    print(f"model {args.model} ({ckpt_bytes / 1e6:.1f} MB of safetensors), median of {args.reps}:")
    print(f"  A ingest {ing:.3f} s (shares written by {shr:.3f} s); B from_pretrained from the remote "
          f"tier {pre:.3f} s = {ing / pre:.2f}x A's ingest speed; logits identical: {all(same)}")  # fmt: skip
    print(f"  (A's from_pretrained(ckpt) with nothing left to ingest, building and binding only: "
          f"{med(local_s):.3f} s)")  # fmt: skip
    print(f"load average at end: {out['load_average_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if all(checks) and all(same) else 1


if __name__ == "__main__":
    sys.exit(main())
