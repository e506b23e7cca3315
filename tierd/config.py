"""The daemon's one configuration object and where its values come from.

Precedence: command-line flags > ``TIERD_*`` environment variables > TOML file > defaults.
Every field has a default that works with no file at all. The file is ``--config FILE`` or
``$TIERD_CONFIG``; its keys are the field names (``ram_bytes = "2GiB"``), dashes allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import math
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from tierd.paths import default_socket_path, default_state_dir

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


class ConfigError(ValueError):
    """A setting has a value tierd cannot use. The message names the setting and its source."""


def parse_size(spec: str | int, whole: int | None = None) -> int:
    """Bytes in ``spec``: ``512MiB``, ``2GiB``, ``1.5G``, ``4096``, or ``25%`` of ``whole``.

    >>> parse_size("512MiB"), parse_size("2GiB"), parse_size("25%", 1000)
    (536870912, 2147483648, 250)
    """
    if isinstance(spec, bool):
        raise ConfigError(f"not a size: {spec!r}")
    if isinstance(spec, int):
        if spec < 0:
            raise ConfigError(f"a size cannot be negative: {spec}")
        return spec
    m = _SIZE_RE.match(str(spec))
    if not m:
        raise ConfigError(f"not a size: {spec!r} (use e.g. 512MiB, 2GiB, 25%)")
    num, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        if whole is None:
            raise ConfigError(f"{spec!r}: a percentage is not allowed here")
        if num > 100:
            raise ConfigError(f"{spec!r}: more than 100%")
        return int(whole * num / 100)
    if unit not in _UNITS:
        raise ConfigError(f"not a size: {spec!r} (unknown unit {m.group(2)!r}; use B, KiB, MiB, GiB, TiB, %)")
    return int(num * _UNITS[unit])


def total_ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


_TIER_ITEM = re.compile(r"^(?P<name>[a-z][a-z0-9_-]*)(?:=(?P<target>[\w.]+:\w+)@(?P<size>\S+))?$")
BUILTIN_TIERS = ("gpu", "ram", "disk")


@dataclass(frozen=True)
class TierSpec:
    """One item of the ``tiers`` setting (``tierd.tiers.registry`` builds the tiers from these)."""

    name: str
    target: str = ""  # MODULE:CLASS; empty for a built-in tier
    size: str = ""


def parse_tiers(spec: str) -> list[TierSpec]:
    """The items of a ``tiers`` value (see ``tierd.tiers.registry``); ConfigError when one is malformed
    or the rules are broken."""
    out: list[TierSpec] = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = _TIER_ITEM.match(item)
        if m is None or (m["target"] is None and m["name"] not in BUILTIN_TIERS):
            raise ConfigError(f"tiers: {item!r} is not gpu, ram, disk or NAME=MODULE:CLASS@SIZE")
        if m["target"] is not None and m["name"] in BUILTIN_TIERS:
            raise ConfigError(f"tiers: {m['name']!r} is a built-in tier; give yours another name")
        out.append(TierSpec(m["name"], m["target"] or "", m["size"] or ""))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"tiers: a name appears twice in {spec!r}")
    if "gpu" in names[1:]:
        raise ConfigError(f"tiers: {spec!r}: gpu must come first (it is the tier above ram)")
    home = names[1:] if names[:1] == ["gpu"] else names
    if not home or home[0] != "ram":
        raise ConfigError(
            f"tiers: {spec!r} must start with ram, or gpu then ram (puts are written to ram; gpu is "
            "the only tier above it)"
        )
    for t in out:
        if t.size:
            parse_size(t.size)
    return out


@dataclass(frozen=True)
class RemoteSettings:
    """How to reach the remote tier (from ``remote`` and the ``remote_*`` settings)."""

    nodes: tuple[tuple[str, int], ...]
    prefix: str = "tierd"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    timeout: float = 2.0

    @property
    def where(self) -> str:
        """The cluster as users name it (no password)."""
        return ("rediss" if self.tls else "redis") + "://" + ",".join(f"{h}:{p}" for h, p in self.nodes)


def parse_remote_url(url: str) -> tuple[tuple[tuple[str, int], ...], bool, str | None, str | None]:
    """``redis://[USER:PASSWORD@]HOST:PORT[,HOST:PORT...]`` (``rediss://`` for TLS) -> (nodes, tls,
    user, password); ValueError saying why when it is not one."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss"):
        raise ValueError(f"{url!r} is not redis://HOST:PORT[,HOST:PORT...] (or rediss:// for TLS)")
    auth, at, hosts = rest.rpartition("@")
    user = password = None
    if at:
        u, colon, p = auth.partition(":")
        user, password = (unquote(u) or None), (unquote(p) if colon else None)
    nodes = []
    for item in hosts.rstrip("/").split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: {item!r} is not HOST:PORT")
        nodes.append((host, int(port)))
    return tuple(nodes), scheme == "rediss", user, password


@dataclass
class Config:
    """Everything the daemon can be told. Sizes stay strings here and resolve at start."""

    socket: str = ""
    """Unix socket; empty = $TIERD_SOCKET, else $XDG_RUNTIME_DIR/tierd/tierd.sock, else /tmp/tierd-$UID/."""
    socket_group: str = ""
    """If set, the socket is mode 0660 owned by this group and its members may connect; else 0600."""
    state_dir: str = ""
    """Directory for durable state; empty = $STATE_DIRECTORY, else ~/.local/state/tierd."""
    ram_bytes: str = "25%"
    """Size of the shared-memory RAM tier (pre-faulted at start): 512MiB, 2GiB, or a % of RAM."""
    ram_quota: str = "100%"
    """The most one uid's entries may hold in the RAM tier: a SIZE or a % of it (100% = no quota).
    Quotas that add up to at most 100% keep each user's entries from being pushed out by another's."""
    disk_bytes: str = "25%"
    """Size of the disk tier (an LMDB file in the state dir); 0 = none (durable=True is then refused)."""
    tiers: str = "ram,disk"
    """The tiers, fastest first: ram, disk, and NAME=MODULE:CLASS@SIZE for others (docs/tiers.md)."""
    ram_high_watermark: float = 0.90
    """Above this share of the RAM tier in use, cold entries are demoted to disk..."""
    ram_low_watermark: float = 0.75
    """...until use is back under this share."""
    tag_codecs: str = ""
    """Disk codec per tag, e.g. "weight=int8,kv=zstd" (int8, bf16, fp16 are lossy and opt-in)."""
    predictor: str = "auto"
    """Next-read predictor: auto (scores none, sequence, learned; follows none unless one pays), none,
    sequence or learned (docs/architecture.md)."""
    prefetch_budget: str = "10%"
    """RAM for prefetched entries not read yet: a SIZE or a % of the RAM tier."""
    prefetch_depth: int = 2
    """How many predicted next entries to prefetch after each read."""
    eviction: str = "auto"
    """What is demoted first: auto (shadow-scored; S3-FIFO until evidence), lru, s3fifo or learned (reuse
    predicted by a model)."""
    gpu_bytes: str = "0"
    """Size of the GPU tier (above RAM; SIZE or a % of the device's memory); 0 = none."""
    gpu_backend: str = "auto"
    """auto (CUDA; never the simulated device), cuda, or simulated (a test and demo tool: no GPU)."""
    gpu_device: int = 0
    """Which GPU the GPU tier uses (CUDA device index)."""
    gpu_sim_delay_ms: float = 20.0
    """Simulated device only: each copy completes at least this late (clients must wait on events)."""
    log_level: str = "info"
    """debug, info, warning or error."""
    graceful_timeout: float = 5.0
    """Seconds SIGTERM waits for requests in flight before closing connections."""
    max_connections: int = 1024
    """Connections served at once; one more is refused with a message (each holds a file descriptor)."""
    max_open_puts: int = 4096
    """Puts one client may have reserved and not sealed at once; one more gets TierFull."""
    max_open_put_bytes: str = "50%"
    """Bytes one client may have reserved and not sealed: a SIZE or a % of the RAM tier."""
    metrics_listen: str = ""
    """Serve Prometheus metrics over HTTP at this loopback HOST:PORT (127.0.0.1:9464); empty = off."""
    metrics_textfile: str = ""
    """Rewrite this file with the metrics every metrics_interval seconds (node_exporter); empty = off."""
    metrics_interval: float = 5.0
    """Seconds between two rewrites of metrics_textfile."""
    max_partial_frame_bytes: str = "256MiB"
    """Bytes of unfinished requests held for all connections at once (17MiB+); past it, one is refused."""
    remote: str = ""
    """Shared remote tier: Redis Cluster seed nodes redis://[USER:PASS@]HOST:PORT[,...]; rediss:// = TLS."""
    remote_prefix: str = "tierd"
    """Prefix of every key tierd writes to the remote tier: deployments with different prefixes never meet."""
    remote_password: str = ""
    """Password for the remote tier (AUTH); overrides one in the URL. Prefer $TIERD_REMOTE_PASSWORD."""
    remote_tls_ca: str = ""
    """CA certificate file that signs the cluster's certificates (rediss://); empty = the system's."""
    remote_timeout: float = 2.0
    """Seconds one call to the remote tier may take before it fails (a dead or paused node)."""
    remote_tags: str = ""
    """Entries with one of these tags (comma-separated: "weight,vision") are shared as by put(share=True)."""
    sources: dict[str, str] = field(default_factory=dict, repr=False)
    """Where each non-default value came from (for error messages); not a setting."""

    # -- resolution --------------------------------------------------------------------------
    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket else default_socket_path()

    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser() if self.state_dir else default_state_dir()

    def _size(self, name: str, whole: int | None) -> int:
        try:
            return parse_size(getattr(self, name), whole)
        except ConfigError as e:
            raise ConfigError(f"{name} ({self.sources.get(name, 'default')}): {e}") from None

    def ram_tier_bytes(self) -> int:
        return self._size("ram_bytes", total_ram_bytes())

    def ram_quota_bytes(self) -> int:
        return self._size("ram_quota", self.ram_tier_bytes())

    def disk_tier_bytes(self) -> int:
        state = self.state_path()
        probe = state if state.exists() else state.parent
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        st = os.statvfs(probe)
        return self._size("disk_bytes", st.f_blocks * st.f_frsize)

    def gpu_tier_bytes(self, device_total: int = 0) -> int:
        """The GPU tier's size; a percentage needs the device's total memory (0: not known yet,
        any non-zero percentage counts as 1 byte so that callers can tell "a GPU tier")."""
        if device_total == 0 and str(self.gpu_bytes).strip().endswith("%"):
            return 1 if self._size("gpu_bytes", 100) else 0
        return self._size("gpu_bytes", device_total)

    def tier_list(self) -> str:
        """``tiers`` with the GPU tier put first when gpu_bytes > 0 and ``tiers`` does not name it."""
        names = [x.strip() for x in self.tiers.split(",")]
        if self.gpu_tier_bytes() and "gpu" not in names:
            return "gpu," + self.tiers
        return self.tiers

    def prefetch_budget_bytes(self) -> int:
        return self._size("prefetch_budget", self.ram_tier_bytes())

    def max_open_put_bytes_value(self) -> int:
        return self._size("max_open_put_bytes", self.ram_tier_bytes())

    def max_partial_frame_bytes_value(self) -> int:
        from tierd.protocol import MAX_REQUEST_BYTES

        n = self._size("max_partial_frame_bytes", None)
        if n < MAX_REQUEST_BYTES + 5:
            raise ConfigError(
                f"max_partial_frame_bytes: {self.max_partial_frame_bytes} is less than one request frame "
                f"({MAX_REQUEST_BYTES >> 20}MiB): use 17MiB or more"
            )
        return n

    def tag_codec_map(self) -> dict[str, str]:
        """``tag_codecs`` parsed: {"weight": "int8", ...}; ConfigError on a bad item or codec name."""
        out: dict[str, str] = {}
        for item in filter(None, (x.strip() for x in self.tag_codecs.split(","))):
            tag, sep, codec = item.partition("=")
            if not sep or not tag.strip() or not codec.strip():
                raise ConfigError(f"tag_codecs: {item!r} is not TAG=CODEC")
            out[tag.strip()] = codec.strip()
        if out:
            from tierd.codecs import CODEC_NAMES

            bad = [c for c in out.values() if c not in CODEC_NAMES]
            if bad:
                raise ConfigError(f"tag_codecs: unknown codec {bad[0]!r} (known: {', '.join(CODEC_NAMES)})")
        return out

    def remote_tag_set(self) -> frozenset[str]:
        """``remote_tags`` parsed: the tags whose entries are shared."""
        return frozenset(t.strip() for t in self.remote_tags.split(",") if t.strip())

    def remote_settings(self) -> RemoteSettings | None:
        """How to reach the remote tier, or None without ``remote``; ConfigError on a bad value."""
        if not self.remote:
            return None
        src = self.sources.get("remote", "default")
        try:
            nodes, tls, user, password = parse_remote_url(self.remote)
        except ValueError as e:
            raise ConfigError(f"remote ({src}): {e}") from None
        if not self.remote_prefix or any(c.isspace() for c in self.remote_prefix):
            raise ConfigError(f"remote_prefix: {self.remote_prefix!r} must be non-empty, without spaces")
        if not (self.remote_timeout > 0 and math.isfinite(self.remote_timeout)):
            raise ConfigError(f"remote_timeout: {self.remote_timeout} is not a positive number of seconds")
        if self.remote_tls_ca and not tls:
            raise ConfigError("remote_tls_ca: set, but remote is not rediss:// (TLS)")
        if self.remote_tls_ca and not Path(self.remote_tls_ca).is_file():
            raise ConfigError(f"remote_tls_ca: {self.remote_tls_ca} is not a file")
        return RemoteSettings(
            nodes=nodes, prefix=self.remote_prefix, username=user,
            password=self.remote_password or password, tls=tls, tls_ca=self.remote_tls_ca or None,
            timeout=self.remote_timeout,
        )  # fmt: skip

    def socket_gid(self) -> int | None:
        if not self.socket_group:
            return None
        try:
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ConfigError(f"socket_group: no group named {self.socket_group!r}") from None

    def validate(self) -> None:
        """Raise ConfigError naming the first bad setting; resolves every size once."""
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level: {self.log_level!r} is not debug, info, warning or error")
        ram = self.ram_tier_bytes()
        if ram < (1 << 20):
            raise ConfigError(
                f"ram_bytes ({self.sources.get('ram_bytes', 'default')}): "
                f"{self.ram_bytes!r} is below the 1 MiB minimum"
            )
        disk = self.disk_tier_bytes()
        if 0 < disk < (16 << 20):
            raise ConfigError(
                f"disk_bytes ({self.sources.get('disk_bytes', 'default')}): "
                f"{self.disk_bytes!r} is below the 16 MiB minimum (0 turns the disk tier off)"
            )
        if not 0 < self.ram_low_watermark <= self.ram_high_watermark <= 1:
            raise ConfigError(
                "ram_low_watermark and ram_high_watermark: need 0 < low <= high <= 1, got "
                f"{self.ram_low_watermark} and {self.ram_high_watermark}"
            )
        self.tag_codec_map()
        parse_tiers(self.tiers)
        from tierd.predict import PREDICTOR_NAMES

        if self.predictor not in PREDICTOR_NAMES:
            raise ConfigError(f"predictor: {self.predictor!r} is not one of {', '.join(PREDICTOR_NAMES)}")
        from tierd.policy import NAMES as EVICTION_NAMES

        if self.eviction not in EVICTION_NAMES:
            raise ConfigError(f"eviction: {self.eviction!r} is not one of {', '.join(EVICTION_NAMES)}")
        if not 0 <= self.prefetch_depth <= 64:
            raise ConfigError(f"prefetch_depth: {self.prefetch_depth} is not between 0 and 64")
        self.prefetch_budget_bytes()
        gpu = self.gpu_tier_bytes()
        if "gpu" in [t.name for t in parse_tiers(self.tiers)] and not gpu:
            raise ConfigError("tiers: names gpu but gpu_bytes is 0 (set --gpu-bytes)")
        parse_tiers(self.tier_list())
        from tierd.gpu.device import BACKENDS

        if self.gpu_backend not in BACKENDS:
            raise ConfigError(f"gpu_backend: {self.gpu_backend!r} is not one of {', '.join(BACKENDS)}")
        if self.gpu_device < 0:
            raise ConfigError(f"gpu_device: {self.gpu_device} is not a device index (0, 1, ...)")
        if not 0 <= self.gpu_sim_delay_ms <= 10_000:
            raise ConfigError(f"gpu_sim_delay_ms: {self.gpu_sim_delay_ms} is not between 0 and 10000")
        if self.graceful_timeout < 0:
            raise ConfigError("graceful_timeout: must be >= 0")
        if self.max_connections < 1:
            raise ConfigError(f"max_connections: {self.max_connections} is not a positive number")
        if self.max_open_puts < 1:
            raise ConfigError(f"max_open_puts: {self.max_open_puts} is not a positive number")
        self.max_open_put_bytes_value()
        if self.ram_quota_bytes() < 1 << 20:
            raise ConfigError(
                f"ram_quota ({self.sources.get('ram_quota', 'default')}): {self.ram_quota!r} is below "
                "the 1 MiB minimum"
            )
        self.max_partial_frame_bytes_value()
        self.socket_gid()
        self.validate_metrics()
        self.remote_settings()

    def validate_metrics(self) -> None:
        """The metrics routes' settings (see tierd.exporter)."""
        if self.metrics_listen:
            from tierd.exporter import ListenError, parse_listen

            try:
                parse_listen(self.metrics_listen)
            except ListenError as e:
                where = self.sources.get("metrics_listen", "default")
                raise ConfigError(f"metrics_listen ({where}): {e}") from None
        if self.metrics_textfile:
            folder = Path(self.metrics_textfile).expanduser().parent
            if not folder.is_dir():
                raise ConfigError(f"metrics_textfile: its directory {folder} does not exist")
        if not 0.1 <= self.metrics_interval <= 3600:
            raise ConfigError(f"metrics_interval: {self.metrics_interval} is not between 0.1 and 3600 s")


SETTINGS = [f.name for f in fields(Config) if f.name != "sources"]


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = {f.name: f.type for f in fields(Config)}[name]
    if kind == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({source}): {value!r} is not a number") from None
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} ({source}): {value!r} is not a whole number") from None
    if name == "remote_tags" and isinstance(value, list) and all(isinstance(t, str) for t in value):
        return ",".join(value)  # remote_tags = ["weight", "vision"] in a TOML file
    if isinstance(value, (dict, list)):
        raise ConfigError(f"{name} ({source}): expected a single value, got {type(value).__name__}")
    return str(value)


def load_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    data = data.get("tierd", data)  # a [tierd] table or top-level keys
    out = {}
    for k, v in data.items():
        name = k.replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"config file {path}: unknown setting {k!r} (known: {', '.join(SETTINGS)})")
        out[name] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierd",
        description=(
            "tierd: serves tensors to model processes from GPU, RAM and NVMe tiers, by handle, through "
            "shared memory. Runs in the foreground; under systemd use systemd/tierd.service."
        ),
        epilog=(
            "Every setting can also come from a TIERD_<NAME> environment variable (TIERD_RAM_BYTES=2GiB) "
            "or a TOML file (--config or $TIERD_CONFIG). Precedence: flags > environment > file > defaults. "
            "SIZE is 512MiB, 2GiB, 1.5G or a percentage (25% of RAM for --ram-bytes, of the state "
            "directory's filesystem for --disk-bytes). SIGHUP reloads the settings that can change live. "
            "`tierd install-unit [--user|--system] [--print]` installs the systemd unit for this "
            "installation (see `tierd install-unit --help`)."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="TOML file with settings (default: $TIERD_CONFIG)")
    for f in fields(Config):
        if f.name == "sources":
            continue
        doc = _FIELD_DOCS.get(f.name, "")
        metavar = {
            "graceful_timeout": "SECONDS",
            "prefetch_budget": "SIZE",
            "prefetch_depth": "N",
            "max_connections": "N",
            "metrics_listen": "HOST:PORT",
            "metrics_textfile": "PATH",
            "metrics_interval": "SECONDS",
            "remote": "URL",
            "remote_timeout": "SECONDS",
            "remote_tls_ca": "FILE",
            "gpu_device": "N",
            "gpu_backend": "auto|cuda|simulated",
            "gpu_sim_delay_ms": "MS",
        }.get(
            f.name,
            "SIZE"
            if f.name.endswith("_bytes")
            else "F"
            if f.type == "float"
            else f.name.split("_")[-1].upper(),
        )
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            metavar=metavar,
            default=None,
            help=f"{doc} [default: {f.default!s}]".replace("%", "%%"),
        )
    p.add_argument("--version", action="version", version=f"tierd {_version()}")
    return p


def _version() -> str:
    from tierd import __version__

    return __version__


def _field_docs() -> dict[str, str]:
    """The one-line docstrings under each Config field, read from this module's source."""
    import inspect

    src = inspect.getsource(Config).splitlines()
    docs: dict[str, str] = {}
    for i, line in enumerate(src[:-1]):
        m = re.match(r"\s+(\w+): .* = ", line)
        nxt = src[i + 1].strip()
        if m and nxt.startswith('"""'):
            docs[m.group(1)] = nxt.strip('"')
    return docs


_FIELD_DOCS = _field_docs()


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Build the Config from flags, environment and file; raises ConfigError on a bad value."""
    environ = dict(os.environ) if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    cfg_file = args.config or environ.get("TIERD_CONFIG")
    if cfg_file:
        for k, v in load_file(Path(cfg_file)).items():
            values[k] = _coerce(k, v, f"file {cfg_file}")
            sources[k] = f"file {cfg_file}"
    for name in SETTINGS:
        env = f"TIERD_{name.upper()}"
        if env in environ and environ[env] != "":
            values[name] = _coerce(name, environ[env], f"${env}")
            sources[name] = f"${env}"
    for name in SETTINGS:
        v = getattr(args, name)
        if v is not None:
            flag = f"--{name.replace('_', '-')}"
            values[name] = _coerce(name, v, flag)
            sources[name] = flag
    cfg = dataclasses.replace(Config(), **values)
    cfg.sources = sources
    return cfg
