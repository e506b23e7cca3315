"""Disk tier: demotion and cold promotion against dd on the same filesystem, in one run.

    python bench/bench_disk.py [--size-mib 1024] [--json OUT]

1. dd baseline, write: ``dd if=/dev/zero of=STATE/dd.bin bs=8M count=N oflag=direct conv=fsync``.
2. tierd demote: put an entry of the same size (float32 gaussian, the default codec policy picks
   raw for it), then ``evict`` it: encode + write + fsync of every chunk, timed by the client.
3. dd baseline, cold read: ``sync; echo 3 > /proc/sys/vm/drop_caches``, then ``dd if=STATE/dd.bin
   of=/dev/null bs=8M``, and ``bs=64M iflag=direct``: the faster of the two is the baseline.
4. tierd cold promote: drop caches the same way, then ``get`` the evicted entry: read + checksum +
   copy into the RAM tier, timed by the client; the bytes are compared with the source.
5. The same for a bfloat16 entry and for an explicit zstd entry, for the codec's cost.

``--read-paths``: only the read path's choice, on a 1 GiB file of random bytes read in 16 MiB
pieces after dropping the page cache each time: pread in order into the destination (what the disk
tier did for raw entries), the file's mapping faulted in by 1, 2 and 4 threads, O_DIRECT reads into
a bounce buffer then copied, and O_DIRECT reads straight into the destination (what the disk tier
does for a raw chunk whose place it knows); ``--reps`` rounds, GB/s and CPU seconds each.

Ratios are dd time / tierd time (1.0 = as fast as dd). Dropping the page cache needs root; without it
the reads are warm and the output says so. Each measurement runs ``--reps`` times; medians are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tierd import launch
from tierd_client import Client


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def dd(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "status=none"], check=True)
    return time.perf_counter() - t0


def lmdb_ceiling(path: Path, size: int) -> float:
    """Seconds LMDB itself takes to commit ``size`` bytes the way the disk tier does: the ceiling."""
    import lmdb
    import numpy as np

    data = memoryview(np.random.default_rng(0).bytes(size))
    env = lmdb.open(str(path), map_size=2 * size + (64 << 20), subdir=False, sync=True, metasync=False)
    chunk = 16 << 20
    t0 = time.perf_counter()
    for i in range(size // chunk):
        with env.begin(write=True) as txn:
            txn.put(i.to_bytes(4, "big"), data[i * chunk : (i + 1) * chunk])
    elapsed = time.perf_counter() - t0
    env.close()
    path.unlink()
    Path(str(path) + "-lock").unlink(missing_ok=True)
    return elapsed


def read_paths(base: Path, size: int, reps: int) -> dict[str, list[float]]:
    """GB/s of each way to read ``size`` bytes of a cold file into memory (see the docstring)."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    piece = 16 << 20
    size -= size % piece
    f = base / "paths.bin"
    with open(f, "wb") as out:
        for _ in range(size // piece):
            out.write(os.urandom(piece))
        os.fsync(out.fileno())
    arena = mmap.mmap(-1, size)  # page-aligned, like the RAM tier's arena
    dst = np.frombuffer(arena, np.uint8)
    dst[:] = 1  # faulted in once: the destination is warm, like the RAM tier

    def by_pread(_threads: int) -> None:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            for off in range(0, size, piece):
                os.preadv(fd, [memoryview(dst)[off : off + piece]], off)
                os.posix_fadvise(fd, off, piece, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def by_mapping(threads: int) -> None:
        fd = os.open(f, os.O_RDONLY)
        m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        src = [np.frombuffer(m, np.uint8)]

        def one(off: int) -> None:
            np.copyto(dst[off : off + piece], src[0][off : off + piece])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, piece)))
        src.clear()  # the array goes, so the mapping can close
        m.close()
        os.close(fd)

    def by_direct(threads: int) -> None:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)

        def one(off: int) -> None:
            bounce = mmap.mmap(-1, piece)  # page-aligned, as O_DIRECT needs
            os.preadv(fd, [bounce], off)
            np.copyto(dst[off : off + piece], np.frombuffer(bounce, np.uint8))
            bounce.close()

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, piece)))
        os.close(fd)

    def by_direct_into(threads: int) -> None:
        fd = os.open(f, os.O_RDONLY | os.O_DIRECT)

        def one(off: int) -> None:
            os.preadv(fd, [memoryview(arena)[off : off + piece]], off)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, piece)))
        os.close(fd)

    ways = [("pread in order", by_pread, 1)] + [
        (f"mapping, {n} threads", by_mapping, n) for n in (1, 2, 4)
    ] + [(f"O_DIRECT, {n} threads", by_direct, n) for n in (1, 2)] + [
        (f"O_DIRECT into dst, {n}", by_direct_into, n) for n in (1, 2)
    ]  # fmt: skip
    out: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in ways}
    for _ in range(reps):
        for name, fn, n in ways:
            drop_caches()
            t0, c0 = time.perf_counter(), time.process_time()
            fn(n)
            out[name].append(size / (time.perf_counter() - t0) / 1e9)
            cpu[name].append(time.process_time() - c0)
    f.unlink()
    for name, v in out.items():
        print(f"{name:22s} " + " ".join(f"{x:.2f}" for x in v) + " GB/s; CPU "
              + " ".join(f"{x:.2f}" for x in cpu[name]) + " s", flush=True)  # fmt: skip
    out.update({f"{name} cpu_s": v for name, v in cpu.items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024, help="bytes per measurement [1024]")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per measurement [3]")
    ap.add_argument(
        "--dir", default=None, help="where the state dir goes (default: a temp dir under /var/tmp)"
    )
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--read-paths", action="store_true", help="only compare the read paths (see above)")
    args = ap.parse_args()
    size = args.size_mib << 20
    base = Path(tempfile.mkdtemp(prefix="tierd-bench-disk-", dir=args.dir or "/var/tmp"))
    if args.read_paths:
        try:
            res = read_paths(base, size, args.reps)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    sock = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp")) / "s.sock"
    results: dict[str, object] = {"size_bytes": size, "cpus": os.cpu_count()}
    print(f"disk tier bench: {args.size_mib} MiB per measurement, state in {base}", flush=True)
    disk_mib = 4 * args.size_mib + 512
    d = launch.start(sock, "--state-dir", str(base / "state"), "--disk-bytes", f"{disk_mib}MiB",
                     ram_bytes=f"{args.size_mib + 256}MiB", log_path=base / "tierd.log")  # fmt: skip
    try:
        ddfile = base / "dd.bin"
        count = size // (8 << 20)
        rows = []
        with Client(sock) as c:
            c.stats()
            cold = drop_caches()
            results["cold"] = cold
            cases = [
                ("float32 raw", torch.float32, "raw"),
                ("float32 (auto)", torch.float32, None),
                ("bfloat16 raw", torch.bfloat16, "raw"),
                ("bfloat16 zstd", torch.bfloat16, "zstd"),
            ]
            dd_w, dd_r = [], []
            for _ in range(args.reps):
                dd_w.append(dd(["if=/dev/zero", f"of={ddfile}", "bs=8M", f"count={count}", "oflag=direct",
                                "conv=fsync"]))  # fmt: skip
                drop_caches()
                buffered = dd([f"if={ddfile}", "of=/dev/null", "bs=8M"])
                drop_caches()
                direct = dd([f"if={ddfile}", "of=/dev/null", "bs=64M", "iflag=direct"])
                dd_r.append(min(buffered, direct))  # the faster of the two is the baseline
            ddfile.unlink()
            ceiling = statistics.median(lmdb_ceiling(base / "ceiling.lmdb", size) for _ in range(args.reps))
            w, r = statistics.median(dd_w), statistics.median(dd_r)
            results["lmdb_put_s"] = ceiling
            print(f"LMDB alone (16 MiB values, one fsync'd commit each, as tierd writes): "
                  f"{size / ceiling / 1e9:.2f} GB/s = {w / ceiling:.2f}x dd", flush=True)  # fmt: skip
            results["dd"] = {
                "write_s": w,
                "read_s": r,
                "write_gbps": size / w / 1e9,
                "read_gbps": size / r / 1e9,
            }
            print(f"dd: write (direct, fsync) {size / w / 1e9:.2f} GB/s, {'cold' if cold else 'WARM'} read "
                  f"{size / r / 1e9:.2f} GB/s", flush=True)  # fmt: skip
            for name, dtype, codec in cases:
                g = torch.Generator().manual_seed(0)
                x = (torch.randn(size // 4, generator=g) * 0.02).to(dtype)
                x = (
                    x[: size // x.element_size()]
                    if dtype == torch.float32
                    else torch.cat([x, x])[: size // 2]
                )
                dem, pro = [], []
                for rep in range(args.reps):
                    key = f"bench/{name.replace(' ', '_')}/{rep}"
                    c.put(key, x, codec=codec)
                    t0 = time.perf_counter()
                    c.evict(key)
                    dem.append(time.perf_counter() - t0)
                    drop_caches()
                    t0 = time.perf_counter()
                    t = c.get(key)
                    pro.append(time.perf_counter() - t0)
                    assert torch.equal(t, x), "promoted bytes differ"
                    info = c.stat(key)
                    c.release(t)
                    c.delete(key)
                dm, pm = statistics.median(dem), statistics.median(pro)
                row = {
                    "case": name, "encoding": info["encoding"], "ratio": x.nbytes / info["stored_bytes"],
                    "demote_s": dm, "promote_s": pm, "demote_gbps": x.nbytes / dm / 1e9,
                    "promote_gbps": x.nbytes / pm / 1e9, "demote_vs_dd": w / dm, "promote_vs_dd": r / pm,
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name:16s} {info['encoding']:5s} stored {row['ratio']:.2f}x  "
                    f"demote {row['demote_gbps']:.2f} GB/s ({row['demote_vs_dd']:.2f}x dd)  "
                    f"promote {row['promote_gbps']:.2f} GB/s ({row['promote_vs_dd']:.2f}x dd)",
                    flush=True,
                )
            results["cases"] = rows
            cal = c.stats()["placement"]["calibration"]
            results["calibration"] = cal
    finally:
        d.stop()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(sock.parent, ignore_errors=True)
    if not results.get("cold"):
        print("note: not root, so the page cache was not dropped: reads above are warm", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
