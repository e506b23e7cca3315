"""The tierd daemon: one asyncio loop serving the Unix socket.

Life in four steps, as ``Server.serve`` runs them:

1. startup   - check the config, build the RAM arena (pre-faulted), bind the socket (0600, or 0660
               for a configured group), then sd_notify READY.
2. main_loop - serve connections; sweep expired entries; ping the systemd watchdog.
3. (signal)  - SIGTERM or SIGINT asks for a graceful stop; a second one exits at once. SIGHUP
               reloads the settings that can change live (:mod:`tierd.reload`).
4. shutdown  - sd_notify STOPPING, stop accepting, let replies drain for ``graceful_timeout``,
               close every connection (their leases end), remove the socket, free the arena.

Each connection is a :class:`~tierd.connection.Connection` (an asyncio Protocol): it cuts frames out
of the byte stream and calls the use case of each request on the one :class:`~tierd.service.Service`;
see :mod:`tierd.connection` and :mod:`tierd.service`. The main loop's memory-pressure poll is
:mod:`tierd.pressure`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import resource
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from tierd import __version__, hardware, logs, protocol
from tierd.config import Config, ConfigError, load
from tierd.connection import FD_SPARE, Connection, PartialFrames
from tierd.errors import StorageError
from tierd.exporter import MetricsHttp, bind_listen, textfile_loop
from tierd.exposition import daemon_registry
from tierd.loops import loop_factory
from tierd.manager import Manager
from tierd.metrics import Metrics
from tierd.monitor import Monitor
from tierd.notify import Notifier
from tierd.pages import limit_heap_retention
from tierd.placement import Placement
from tierd.policy.trainer import Trainer
from tierd.prefetch import Prefetcher
from tierd.pressure import Relief
from tierd.reload import Reloader
from tierd.service import Service
from tierd.share import Sharing, open_store
from tierd.tiers import registry
from tierd.tiers.gpu import GpuTier
from tierd.tiers.memory import MemoryTier
from tierd.tiers.ram import ArenaError, RamTier

log = logging.getLogger("tierd")
_GIB = float(1 << 30)


class Server:
    def __init__(self, config: Config, *, loop_name: str = "asyncio", argv: list[str] | None = None) -> None:
        self.loop_name = loop_name
        self.notifier = Notifier()
        #: SIGHUP reads the settings again with the flags the daemon started with
        self.reloader = Reloader(config, sys.argv[1:] if argv is None else argv, self.notifier)
        self.connections: set[Connection] = set()
        self.max_connections = config.max_connections
        #: the soft RLIMIT_NOFILE once raised (connections are refused before they exhaust it)
        self.fd_limit = 0
        self.fd_refusals = 0
        self.partial_frames = PartialFrames(config.max_partial_frame_bytes_value())
        self.tasks: set[asyncio.Task[Any]] = set()
        #: the daemon's counters (status reads them; a metrics exporter will too)
        self.metrics = Metrics()
        self.manager: Manager  # built in startup
        self.ram: RamTier
        self.placement: Placement
        self.prefetcher: Prefetcher
        self.eviction_trainer: Trainer
        self.service: Service
        self.sharing: Sharing | None = None
        self.relief: Relief
        self.socket_path = config.socket_path()
        self._gid = config.socket_gid()
        self._stop = asyncio.Event()
        self.monitor = Monitor()
        self._signals = 0
        self._server: asyncio.AbstractServer | None = None
        self._started = time.monotonic()
        #: the HTTP metrics endpoint (metrics_listen), when configured
        self.metrics_http: MetricsHttp | None = None

    @property
    def config(self) -> Config:
        """The settings in use (a reload changes the live ones)."""
        return self.reloader.config

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        ram_bytes = cfg.ram_tier_bytes()
        remote = await self._open_remote()
        # Bind first: a second daemon on the same socket is refused before it allocates an arena.
        # Clients that connect meanwhile wait in the listen backlog until the loop serves them.
        sock = self._bind()
        metrics_sock = self._bind_metrics(sock)
        self.fd_limit = _raise_fd_limit(cfg.max_connections)
        limit_heap_retention()  # codec and protocol buffers go back to the kernel when freed
        t0 = time.perf_counter()
        try:  # the device first: a GPU that cannot be had is refused before the arena is pre-faulted
            gpu = registry.gpu_tier(cfg) if "gpu" in cfg.tier_list().split(",") else None
        except BaseException:
            sock.close()
            self.socket_path.unlink(missing_ok=True)
            raise
        log.info("building the tiers (%s): %.2f GiB RAM memfd arena, pre-faulting...", cfg.tier_list(),
                 ram_bytes / _GIB)  # fmt: skip
        try:
            tiers = registry.build(cfg, gpu)
        except BaseException:
            sock.close()
            self.socket_path.unlink(missing_ok=True)
            if metrics_sock is not None:
                metrics_sock.close()
            if remote is not None:
                remote.close()
            raise
        log.info("tiers ready in %.2fs: %s", time.perf_counter() - t0, ", ".join(t.name for t in tiers))
        at = next(i for i, t in enumerate(tiers) if t.name == "ram")
        ram = tiers[at]
        assert isinstance(ram, RamTier)  # registry.build: ram is first, or second after gpu
        self.ram = ram
        upper = tuple(t for t in tiers[:at] if isinstance(t, MemoryTier))
        self.manager = Manager(
            ram, *tiers[at + 1 :], upper=upper, metrics=self.metrics, eviction=cfg.eviction
        )
        gpu_tier = self.manager.memory.get("gpu")
        if isinstance(gpu_tier, GpuTier):  # CUDA: the daemon uid's arena is pinned for fast copies
            took = gpu_tier.register_host(ram.mmap)
            name = gpu_tier.device.describe()["name"]
            log.info("GPU tier on %s: host memory registered in %.2fs", name, took)
        self.manager.max_open_puts = cfg.max_open_puts
        self.manager.max_open_put_bytes = cfg.max_open_put_bytes_value()
        self.placement = Placement(self.manager, high=cfg.ram_high_watermark, low=cfg.ram_low_watermark,
                                   tag_codecs=cfg.tag_codec_map())  # fmt: skip
        self.relief = Relief(self.placement, ram, self.monitor)
        budget = cfg.prefetch_budget_bytes()
        self.prefetcher = Prefetcher(self.placement, predictor=cfg.predictor, budget_bytes=budget,
                                     depth=cfg.prefetch_depth)  # fmt: skip
        self.sharing = None
        if remote is not None:
            self.sharing = Sharing(self.manager, self.placement, remote, cfg.remote_tag_set())
        self.service = Service(self.manager, self.placement, self.prefetcher, describe=self._describe,
                               sharing=self.sharing)  # fmt: skip
        store = self.manager.durable_store
        if store is not None:
            n = self.placement.restore()
            log.info("%s tier: %s, %d durable entries restored", store.name, store.stats().get("path", ""), n)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._reload_hooks()
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        self._background(self.placement.balancer())
        self._background(self.prefetcher.run())
        self.eviction_trainer = Trainer(lambda: self.manager.policies)
        self._background(self.eviction_trainer.run())
        self._background(self._calibrate())
        self._background(self._read_hardware())
        await self._start_metrics(metrics_sock)
        if isinstance(gpu_tier, GpuTier):
            self._background(self._measure_gpu(gpu_tier))
        status = f"serving {ram.capacity_bytes / _GIB:.2f} GiB RAM tier on {self.socket_path}"
        self.notifier.ready(status)
        log.info("tierd %s ready (%s loop): %s", __version__, self.loop_name, status)

    async def _open_remote(self) -> Any:
        """Connect to the remote tier's cluster (when ``remote`` is set) before anything else is
        built: one that cannot be reached is a ConfigError (exit 2) naming it."""
        settings = self.config.remote_settings()
        if settings is None:
            return None
        try:
            store = await asyncio.get_running_loop().run_in_executor(None, open_store, settings)
        except StorageError as e:
            src = self.config.sources.get("remote", "default")
            raise ConfigError(
                f"remote ({src}): cannot use the Redis Cluster at {settings.where}: {e}"
            ) from None
        log.info("remote tier: %s, prefix %r, shares tags %s", settings.where, settings.prefix,
                 sorted(self.config.remote_tag_set()) or "none (put share=True)")  # fmt: skip
        return store

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed: %r", task.exception())

    async def _calibrate(self) -> None:
        """Measure memcpy, disk and codec speeds once (in a thread): the codec policy's inputs."""
        if not self.placement.stores:
            return
        from tierd.calibrate import calibrate

        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        # modest samples: the calibration's own memory (~70 MiB for a moment) must not be what
        # pushes a small machine or a tight cgroup over the edge at start
        calib = await loop.run_in_executor(
            self.placement.io,
            functools.partial(
                calibrate, self.config.state_path(), memcpy_bytes=32 << 20, zstd_bytes=16 << 20
            ),
        )
        self.placement.calibration = calib
        log.info("calibration in %.1fs: %s", time.perf_counter() - t0, calib.to_dict())

    async def _read_hardware(self) -> None:
        """The machine report (tierd.hardware), read once in a thread: NVML starts slowly. A
        report that cannot be read (out of file descriptors at start, say) is tried again later,
        every 1, 2, 4 ... 60 s; the status lacks it meanwhile."""
        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            try:
                report = await loop.run_in_executor(None, hardware.report, self.config.state_path())
                break
            except OSError as e:
                log.warning("machine report not read (%s): trying again in %.0fs", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
        self.service.hardware = report
        dev = report["state_device"]
        log.info("machine: %s, %d cores, %.1f GiB RAM; state dir on %s (%s); GPUs: %s", report["cpu_model"],
                 report["cpu_cores"], report["ram_bytes"] / _GIB, dev["device"] or dev["fstype"],
                 "NVMe" if dev["nvme"] else "rotational" if dev["rotational"] else "not NVMe",
                 report["gpu_note"])  # fmt: skip

    # -- metrics ---------------------------------------------------------------------------------
    def _bind_metrics(self, sock: socket.socket) -> socket.socket | None:
        """The metrics_listen TCP socket, bound before anything is built (a taken port: exit 2)."""
        if not self.config.metrics_listen:
            return None
        try:
            return bind_listen(self.config.metrics_listen)
        except OSError as e:
            sock.close()
            self.socket_path.unlink(missing_ok=True)
            raise ConfigError(
                f"metrics_listen: cannot listen on {self.config.metrics_listen} ({e.strerror})"
            ) from None

    async def _start_metrics(self, metrics_sock: socket.socket | None) -> None:
        registry = daemon_registry(self.service.status)  # this daemon's own registry

        def render() -> bytes:
            return generate_latest(registry)

        self.metrics_text = render
        if metrics_sock is not None:
            self.metrics_http = MetricsHttp(metrics_sock, render)
            await self.metrics_http.start()
            log.info("metrics on http://%s/metrics", self.metrics_http.address)
        if self.config.metrics_textfile:
            path = Path(self.config.metrics_textfile).expanduser()
            self._background(textfile_loop(path, render, self.config.metrics_interval))
            log.info("metrics textfile %s, rewritten every %.1f s", path, self.config.metrics_interval)

    async def _measure_gpu(self, tier: GpuTier) -> None:
        """Time the GPU tier's copy path once (a thread), for status."""
        speeds = await asyncio.get_running_loop().run_in_executor(self.placement.io, tier.measure_copies)
        log.info("GPU tier copies: %s GB/s", speeds)

    async def main_loop(self) -> None:
        tick = 1.0
        wd = self.notifier.watchdog_interval
        if wd:
            tick = min(tick, wd)
            self.notifier.watchdog()
        last_status = 0.0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), tick)
            expired = self.manager.expire()
            if expired:
                log.debug("expired %d entries", len(expired))
            await self.relief.poll()
            if wd:
                self.notifier.watchdog()
            now = time.monotonic()
            if self.notifier.enabled and now - last_status >= 10:
                last_status = now
                self.notifier.status(self._status_line())

    async def shutdown(self) -> None:
        self.notifier.stopping()
        log.info("stopping: %d connections", len(self.connections))
        if self._server is not None:
            self._server.close()
        if self.metrics_http is not None:
            await self.metrics_http.close()
        deadline = time.monotonic() + self.config.graceful_timeout
        while time.monotonic() < deadline and any(
            c.transport is not None and c.transport.get_write_buffer_size() for c in self.connections
        ):
            await asyncio.sleep(0.01)
        for c in list(self.connections):
            c.close()
        await asyncio.sleep(0)  # let connection_lost run
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.prefetcher.close()
        self.eviction_trainer.close()
        self.manager.close()
        if self.sharing is not None:
            await self.sharing.close()  # shares in flight finish first: they read home copies
        await self.placement.close()
        for tier in self.manager.tiers.values():
            tier.close()
        with contextlib.suppress(FileNotFoundError):
            if self._server is not None:
                os.unlink(self.socket_path)
        self.notifier.close()
        log.info("tierd stopped")

    def _reload_hooks(self) -> None:
        """The settings a reload (SIGHUP) changes live; every other one needs a restart."""
        hook = self.reloader.hook
        pl, pf, m = self.placement, self.prefetcher, self.manager

        def watermarks(c: Config) -> None:
            pl.set_watermarks(c.ram_high_watermark, c.ram_low_watermark)

        def read_when_needed(c: Config) -> None:  # the server reads self.config at the time
            pass

        hook("ram_high_watermark", watermarks)
        hook("ram_low_watermark", watermarks)
        hook("tag_codecs", lambda c: setattr(pl, "tag_codecs", c.tag_codec_map()))
        hook("predictor", lambda c: pf.set_predictor(c.predictor))
        hook("prefetch_budget", lambda c: setattr(pf, "budget", c.prefetch_budget_bytes()))
        hook("prefetch_depth", lambda c: setattr(pf, "depth", c.prefetch_depth))
        hook("eviction", lambda c: m.set_eviction(c.eviction))
        hook("log_level", lambda c: logs.set_level(c.log_level))
        hook("graceful_timeout", read_when_needed)
        hook("max_connections", lambda c: setattr(self, "max_connections", c.max_connections))
        hook("max_open_puts", lambda c: setattr(m, "max_open_puts", c.max_open_puts))
        hook("max_open_put_bytes", lambda c: setattr(m, "max_open_put_bytes", c.max_open_put_bytes_value()))
        hook("ram_quota", lambda c: m.ram.set_quota(c.ram_quota_bytes()))
        frames = self.partial_frames
        hook("max_partial_frame_bytes", lambda c: setattr(frames, "cap", c.max_partial_frame_bytes_value()))
        hook("metrics_listen", lambda c: self._background(self._relisten(c.metrics_listen)))

    async def _relisten(self, spec: str) -> None:
        """A reload changed metrics_listen: the old endpoint closes, the new one opens (a taken port
        is logged and leaves no endpoint; the daemon goes on)."""
        if self.metrics_http is not None:
            await self.metrics_http.close()
            self.metrics_http = None
        if not spec:
            log.info("metrics endpoint closed")
            return
        try:
            sock = bind_listen(spec)
        except (OSError, ValueError) as e:
            log.error("metrics_listen: cannot listen on %s (%s); no metrics endpoint until fixed", spec, e)
            return
        self.metrics_http = MetricsHttp(sock, self.metrics_text)
        await self.metrics_http.start()
        log.info("metrics on http://%s/metrics", self.metrics_http.address)

    def _on_hup(self) -> None:
        task = self.reloader.request()
        if task is not None:  # kept (and cancelled at shutdown) with the other background tasks
            self.tasks.add(task)
            task.add_done_callback(self._background_done)

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s: shutting down (send it again to exit at once)", signal.Signals(sig).name)
        self._stop.set()

    # -- socket ----------------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        path = self.socket_path
        parent = path.parent
        if not parent.exists():
            parent.mkdir(mode=0o700, parents=True)
        # Whoever can write the socket's directory can swap the socket for their own, and clients
        # would send their tensors there: the directory must be ours (root's too: a root daemon does
        # not take over a directory another user made first) and writable by no one else, unless it
        # is sticky (/tmp: others may add files but not remove or rename ours).
        pst = parent.lstat()
        if not stat.S_ISDIR(pst.st_mode):
            raise ConfigError(f"socket directory {parent} is not a directory (a symlink?): refusing it")
        if pst.st_uid != os.getuid():
            raise ConfigError(
                f"socket directory {parent} belongs to uid {pst.st_uid}, not to this daemon's uid "
                f"{os.getuid()}: someone else could swap the socket; remove it or choose --socket"
            )
        if pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            raise ConfigError(
                f"socket directory {parent} is writable by others (mode {stat.S_IMODE(pst.st_mode):o}): "
                "someone else could swap the socket; chmod go-w it or choose --socket"
            )
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ConfigError(f"{path} exists and is not a socket: remove it or choose --socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                log.info("removing stale socket %s", path)
                path.unlink()
            else:
                raise ConfigError(f"another tierd is already serving {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177 if self._gid is None else 0o117)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self._gid is not None:
            try:
                if path.stat().st_gid != self._gid:
                    os.chown(path, -1, self._gid)
            except OSError as e:  # not a member of the group (or chown filtered): a config error
                sock.close()
                path.unlink()
                raise ConfigError(
                    f"socket_group: cannot give {path} to group {self.config.socket_group!r} "
                    f"({e.strerror}); tierd's user must be a member of it"
                ) from None
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(256)
        sock.setblocking(False)
        return sock

    def peer_allowed(self, uid: int, gid: int) -> bool:
        if uid in (os.getuid(), 0):
            return True
        # with a socket group, the file mode (0660) already decided who could connect
        return self._gid is not None

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.service.status()

    def _describe(self) -> dict[str, Any]:
        """The daemon's own part of status (the service adds it to the tiers' and counters')."""
        p = self.relief.last
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "protocol": protocol.PROTOCOL_VERSION,
                "loop": self.loop_name,
                "socket": str(self.socket_path),
                "uptime_s": round(time.monotonic() - self._started, 3),
                "metrics_listen": self.metrics_http.address if self.metrics_http is not None else None,
                "metrics_textfile": self.config.metrics_textfile or None,
            },
            "pressure": p.as_dict() if p is not None else None,
            "reload": {"live": self.reloader.live, "last": self.reloader.last},
            "eviction_training": self.eviction_trainer.stats(),
        }

    def _status_line(self) -> str:
        ram = self.manager.ram
        return (
            f"{len(self.manager.clients)} clients, {len(self.manager.entries)} entries, "
            f"RAM {ram.used_bytes / _GIB:.2f}/{ram.capacity_bytes / _GIB:.2f} GiB"
        )


def _raise_fd_limit(connections: int) -> int:
    """Every connection holds a file descriptor: take the hard limit (systemd's default soft limit is
    1024), and say so when even that leaves too few for ``max_connections``; returns the soft limit
    (0 when unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return 0
    if soft < connections + 64:
        log.warning("only %d file descriptors (LimitNOFILE): fewer than max_connections (%d) need; "
                    "connections that would leave fewer than %d free are refused", soft, connections,
                    FD_SPARE)  # fmt: skip
    return int(soft)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install-unit"]:  # the one subcommand: everything else is the daemon's flags
        from tierd.install import main as install_unit

        return install_unit(args[1:])
    try:
        config = load(argv)
        config.validate()
    except ConfigError as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 2
    logs.setup(config.log_level)
    name, factory = loop_factory()
    server = Server(config, loop_name=name, argv=argv)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve())
    except (ConfigError, ArenaError) as e:
        print(f"tierd: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
