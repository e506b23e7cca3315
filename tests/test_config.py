"""Configuration: sizes, precedence (flags > TIERD_* > TOML file > defaults), and what a bad value does.

The last part runs the real ``python -m tierd`` (a bad value never reaches the point of serving,
so no daemon is needed) and, for values that are good, starts one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierd import config
from tierd.config import Config, ConfigError, load, parse_size

GiB = 1 << 30
MiB = 1 << 20


# -- parse_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("512MiB", 512 * MiB),
        ("2GiB", 2 * GiB),
        ("1.5G", 1_500_000_000),
        ("1.5GiB", 3 * GiB // 2),
        ("4096", 4096),
        (4096, 4096),
        ("0", 0),
        ("64KiB", 64 << 10),
        ("10k", 10_000),
        ("3MB", 3_000_000),
        ("1TiB", 1 << 40),
        ("  2 GiB ", 2 * GiB),
        ("2gib", 2 * GiB),
        ("100B", 100),
    ],
)
def test_parse_size(spec: str | int, expected: int) -> None:
    assert parse_size(spec) == expected


@pytest.mark.parametrize(
    ("spec", "whole", "expected"),
    [("25%", 1000, 250), ("100%", 8 * GiB, 8 * GiB), ("0%", 1000, 0), ("12.5%", 8000, 1000)],
)
def test_parse_size_percent(spec: str, whole: int, expected: int) -> None:
    assert parse_size(spec, whole) == expected


@pytest.mark.parametrize(
    ("spec", "whole", "words"),
    [
        ("lots", None, ["not a size", "'lots'"]),
        ("", None, ["not a size"]),
        ("12 parsecs", None, ["unknown unit", "'parsecs'"]),
        ("2XB", None, ["unknown unit"]),
        ("1.2.3G", None, ["not a size"]),
        ("-1GiB", None, ["'-1GiB'"]),
        (-5, None, ["negative", "-5"]),
        ("150%", 1000, ["more than 100%", "150%"]),
        ("25%", None, ["percentage is not allowed"]),
        (True, None, ["not a size"]),
    ],
)
def test_parse_size_rejects(spec: str | int, whole: int | None, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        parse_size(spec, whole)
    for word in words:
        assert word in str(err.value)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# -- precedence -----------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_with_nothing_given() -> None:
    cfg = load([], {})
    assert cfg.ram_bytes == "25%"
    assert cfg.disk_bytes == "25%"
    assert cfg.gpu_bytes == "0"
    assert cfg.log_level == "info"
    assert cfg.graceful_timeout == 5.0
    assert cfg.sources == {}
    cfg.validate()
    assert 0 < cfg.ram_tier_bytes() <= config.total_ram_bytes() // 4


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    f = write(
        tmp_path / "t.toml", 'ram_bytes = "1GiB"\ndisk_bytes = "0"\nlog_level = "warning"\nstate_dir = "/f"\n'
    )
    env = {"TIERD_CONFIG": str(f), "TIERD_RAM_BYTES": "2GiB", "TIERD_LOG_LEVEL": "error"}
    cfg = load(["--ram-bytes", "3GiB"], env)
    assert cfg.ram_bytes == "3GiB"  # flag beats env and file
    assert cfg.log_level == "error"  # env beats file
    assert cfg.state_dir == "/f"  # file beats default
    assert cfg.gpu_bytes == "0"  # default
    assert cfg.sources["ram_bytes"] == "--ram-bytes"
    assert cfg.sources["log_level"] == "$TIERD_LOG_LEVEL"
    assert cfg.sources["state_dir"] == f"file {f}"
    assert "gpu_bytes" not in cfg.sources
    assert cfg.ram_tier_bytes() == 3 * GiB

    assert load([], env).ram_bytes == "2GiB"  # env beats file
    assert load([], {"TIERD_CONFIG": str(f)}).ram_bytes == "1GiB"  # file beats default


def test_config_flag_beats_tierd_config(tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", 'log_level = "debug"\n')
    b = write(tmp_path / "b.toml", 'log_level = "warning"\n')
    assert load(["--config", str(b)], {"TIERD_CONFIG": str(a)}).log_level == "warning"
    assert load([], {"TIERD_CONFIG": str(a)}).log_level == "debug"


def test_empty_env_var_means_unset(tmp_path: Path) -> None:
    f = write(tmp_path / "t.toml", 'ram_bytes = "1GiB"\n')
    assert load(["--config", str(f)], {"TIERD_RAM_BYTES": ""}).ram_bytes == "1GiB"


def test_every_setting_from_each_source(tmp_path: Path) -> None:
    values = {
        "socket": "/x/t.sock",
        "socket_group": "grp",
        "state_dir": "/x/state",
        "ram_bytes": "64MiB",
        "disk_bytes": "0",
        "tiers": "ram,disk",
        "gpu_bytes": "0",
        "gpu_backend": "simulated",
        "gpu_device": "1",
        "gpu_sim_delay_ms": "5.5",
        "log_level": "debug",
        "graceful_timeout": "2.5",
        "ram_high_watermark": "0.8",
        "ram_low_watermark": "0.5",
        "tag_codecs": "weight=int8",
        "predictor": "sequence",
        "prefetch_budget": "5%",
        "prefetch_depth": "3",
        "eviction": "s3fifo",
        "max_connections": "100",
        "max_open_puts": "10",
        "max_open_put_bytes": "25%",
        "ram_quota": "50%",
        "metrics_listen": "127.0.0.1:9464",
        "metrics_textfile": "/x/tierd.prom",
        "metrics_interval": "2.5",
        "max_partial_frame_bytes": "64MiB",
        "remote": "redis://10.0.0.1:7000,10.0.0.2:7000",
        "remote_prefix": "prod",
        "remote_password": "pw",
        "remote_tls_ca": "/x/ca.pem",
        "remote_timeout": "0.5",
        "remote_tags": "weight,vision",
    }
    floats = (
        "graceful_timeout", "ram_high_watermark", "ram_low_watermark", "metrics_interval", "remote_timeout",
        "gpu_sim_delay_ms",
    )  # fmt: skip
    assert sorted(values) == sorted(config.SETTINGS)
    expect = {
        **values,
        **{k: float(values[k]) for k in floats},
        "gpu_device": 1,
        "prefetch_depth": 3,
        "max_connections": 100,
        "max_open_puts": 10,
    }

    argv = [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", v)]
    from_flags = load(argv, {})
    from_env = load([], {f"TIERD_{k.upper()}": v for k, v in values.items()})
    bare = (*floats, "prefetch_depth", "max_connections", "max_open_puts", "gpu_device")
    toml = "".join(f'{k} = "{v}"\n' if k not in bare else f"{k} = {v}\n" for k, v in values.items())
    from_file = load(["--config", str(write(tmp_path / "t.toml", toml))], {})
    for cfg in (from_flags, from_env, from_file):
        assert {k: getattr(cfg, k) for k in config.SETTINGS} == expect
        assert set(cfg.sources) == set(config.SETTINGS)


def test_max_partial_frame_bytes_must_hold_one_request_frame() -> None:
    assert load(["--max-partial-frame-bytes", "17MiB"], {}).max_partial_frame_bytes_value() == 17 * MiB
    with pytest.raises(ConfigError, match="less than one request frame"):
        load(["--max-partial-frame-bytes", "16MiB"], {}).validate()


def test_remote_settings(tmp_path: Path) -> None:
    f = write(
        tmp_path / "t.toml",
        'remote = "rediss://u:p%40w@h1:7000,[::1]:7001"\nremote_tags = ["weight", "vision"]\n',
    )
    cfg = load(["--config", str(f)], {})
    assert cfg.remote_tag_set() == {"weight", "vision"}
    rs = cfg.remote_settings()
    assert rs is not None
    assert (rs.nodes, rs.tls, rs.username, rs.password) == ((("h1", 7000), ("::1", 7001)), True, "u", "p@w")
    assert rs.where == "rediss://h1:7000,::1:7001"  # no password in what is shown
    assert (
        load([], {"TIERD_REMOTE": "redis://h:1", "TIERD_REMOTE_PASSWORD": "env"}).remote_settings().password
        == "env"
    )
    assert load([], {}).remote_settings() is None and load([], {}).remote_tag_set() == frozenset()


def test_file_table_form_and_dashes(tmp_path: Path) -> None:
    f = write(
        tmp_path / "t.toml", '[tierd]\nram-bytes = "96MiB"\nlog-level = "warning"\ngraceful-timeout = 1\n'
    )
    cfg = load(["--config", str(f)], {})
    assert (cfg.ram_bytes, cfg.log_level, cfg.graceful_timeout) == ("96MiB", "warning", 1.0)
    assert cfg.ram_tier_bytes() == 96 * MiB


def test_file_numbers_become_sizes(tmp_path: Path) -> None:
    f = write(tmp_path / "t.toml", "ram_bytes = 67108864\n")
    assert load(["--config", str(f)], {}).ram_tier_bytes() == 64 * MiB


def test_file_unknown_key_is_named(tmp_path: Path) -> None:
    f = write(tmp_path / "t.toml", 'ram_bytes = "1GiB"\nram_byte = "2GiB"\n')
    with pytest.raises(ConfigError) as err:
        load(["--config", str(f)], {})
    msg = str(err.value)
    assert "'ram_byte'" in msg and str(f) in msg
    assert "ram_bytes" in msg  # lists the known settings


def test_file_unknown_key_in_table_is_named(tmp_path: Path) -> None:
    f = write(tmp_path / "t.toml", '[tierd]\nram-bites = "1GiB"\n')
    with pytest.raises(ConfigError, match="'ram-bites'"):
        load(["--config", str(f)], {})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(["--config", str(tmp_path / "missing.toml")], {})
    bad = write(tmp_path / "bad.toml", "ram_bytes = \n")
    with pytest.raises(ConfigError, match=str(bad)):
        load(["--config", str(bad)], {})
    table = write(tmp_path / "table.toml", "ram_bytes = [1, 2]\n")
    with pytest.raises(ConfigError, match="ram_bytes"):
        load(["--config", str(table)], {})


def test_bad_values_name_setting_and_source(tmp_path: Path) -> None:
    f = write(tmp_path / "t.toml", 'ram_bytes = "heaps"\n')
    with pytest.raises(ConfigError) as err:
        load(["--config", str(f)], {}).validate()
    assert "ram_bytes" in str(err.value) and str(f) in str(err.value) and "heaps" in str(err.value)

    with pytest.raises(ConfigError, match=r"ram_bytes \(\$TIERD_RAM_BYTES\)"):
        load([], {"TIERD_RAM_BYTES": "heaps"}).validate()
    with pytest.raises(ConfigError, match=r"ram_bytes \(--ram-bytes\)"):
        load(["--ram-bytes", "200%"], {}).validate()
    with pytest.raises(ConfigError, match="graceful_timeout"):
        load([], {"TIERD_GRACEFUL_TIMEOUT": "soon"})
    with pytest.raises(ConfigError, match="graceful_timeout"):
        load(["--graceful-timeout", "-1"], {}).validate()
    with pytest.raises(ConfigError, match="log_level"):
        load(["--log-level", "loud"], {}).validate()
    with pytest.raises(ConfigError, match="below the 1 MiB minimum"):
        load(["--ram-bytes", "4KiB"], {}).validate()
    with pytest.raises(ConfigError, match="socket_group"):
        load(["--socket-group", "no-such-group-tierd"], {}).validate()


def test_socket_and_state_dir_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIERD_SOCKET", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'st'}:{tmp_path / 'other'}")
    cfg = Config()
    assert cfg.socket_path() == tmp_path / "run" / "tierd" / "tierd.sock"
    assert cfg.state_path() == tmp_path / "st"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert cfg.socket_path() == Path(f"/tmp/tierd-{os.getuid()}/tierd.sock")
    monkeypatch.setenv("TIERD_SOCKET", str(tmp_path / "env.sock"))
    assert cfg.socket_path() == tmp_path / "env.sock"
    assert Config(socket=str(tmp_path / "cfg.sock")).socket_path() == tmp_path / "cfg.sock"


# -- the real daemon ------------------------------------------------------------------------------


def run_tierd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("TIERD_", "NOTIFY_SOCKET", "WATCHDOG_"))
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tierd", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--ram-bytes", "lots"], ["ram_bytes", "--ram-bytes", "'lots'"]),
        (["--ram-bytes", "250%"], ["ram_bytes", "more than 100%"]),
        # auto looks for CUDA only (none here) and says how to run the simulated device instead
        (["--gpu-bytes", "1GiB"], ["gpu_backend=auto", "--gpu-backend simulated"]),
        (["--gpu-bytes", "10%"], ["gpu_backend=auto", "CUDA"]),
        (["--gpu-bytes", "lots"], ["gpu_bytes", "'lots'"]),
        (["--gpu-backend", "opencl", "--gpu-bytes", "64MiB"], ["gpu_backend", "'opencl'"]),
        # the simulated device has 4 GiB: asking for more is refused at start, naming both sizes
        (["--gpu-backend", "simulated", "--gpu-bytes", "8GiB"], ["gpu_bytes", "8.00 GiB", "4.00 GiB free"]),
        (["--tiers", "gpu,ram,disk"], ["tiers", "gpu_bytes is 0"]),
        (["--disk-bytes", "1MiB"], ["disk_bytes", "16 MiB minimum"]),
        (["--tag-codecs", "weight=int9"], ["tag_codecs", "int9"]),
        (["--ram-low-watermark", "0.95"], ["ram_low_watermark", "0.95"]),
        (["--predictor", "oracle"], ["predictor", "oracle"]),
        (["--eviction", "belady"], ["eviction", "belady"]),
        (["--prefetch-depth", "many"], ["prefetch_depth", "'many'"]),
        (["--disk-bytes", "much"], ["disk_bytes", "'much'"]),
        (["--log-level", "chatty"], ["log_level", "'chatty'"]),
        (["--graceful-timeout", "later"], ["graceful_timeout", "'later'"]),
        (["--socket-group", "no-such-group-tierd"], ["socket_group", "no-such-group-tierd"]),
        (["--metrics-listen", "0.0.0.0:9464"], ["metrics_listen", "--metrics-listen", "not a loopback"]),
        (["--metrics-listen", "9464"], ["metrics_listen", "HOST:PORT"]),
        (["--metrics-listen", "example.com:9464"], ["metrics_listen", "not an IP address"]),
        (["--metrics-textfile", "/no/such/dir/tierd.prom"], ["metrics_textfile", "/no/such/dir"]),
        (["--metrics-interval", "0"], ["metrics_interval", "0.1"]),
    ],
)
def test_daemon_bad_flag_exits_2_with_one_line(short_tmp: Path, flags: list[str], words: list[str]) -> None:
    sock = short_tmp / "tierd.sock"
    r = run_tierd("--socket", str(sock), "--state-dir", str(short_tmp / "state"), *flags)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("tierd: ")
    for word in words:
        assert word in lines[0]
    assert r.stdout == ""
    assert not sock.exists()


def test_daemon_bad_env_and_file_name_their_source(short_tmp: Path) -> None:
    r = run_tierd("--socket", str(short_tmp / "s"), env={"TIERD_RAM_BYTES": "lots"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "ram_bytes ($TIERD_RAM_BYTES)" in r.stderr

    f = write(short_tmp / "t.toml", 'gpu-bytes = "2GiB"\nflavour = "x"\n')
    r = run_tierd("--socket", str(short_tmp / "s"), env={"TIERD_CONFIG": str(f)})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "'flavour'" in r.stderr and str(f) in r.stderr


def test_daemon_disk_bytes_zero_is_accepted(start_daemon) -> None:
    d = start_daemon("--disk-bytes", "0", "--gpu-bytes", "0")
    assert d.proc.poll() is None
    assert d.socket.exists()
    assert d.stop() == 0


def test_daemon_settings_from_file_and_env(short_tmp: Path) -> None:
    from tierd import launch
    from tierd_client import Client

    f = write(short_tmp / "t.toml", '[tierd]\nram-bytes = "8MiB"\nlog_level = "debug"\n')
    env = {**os.environ, "TIERD_CONFIG": str(f), "TIERD_RAM_BYTES": "12MiB"}
    # launch.start passes --ram-bytes; the flag beats both the file's 8MiB and the env's 12MiB
    d = launch.start(
        short_tmp / "t.sock",
        "--state-dir",
        str(short_tmp / "st"),
        ram_bytes="16MiB",
        env=env,
        log_path=short_tmp / "log",
    )
    try:
        ready = d.messages[-1]
        assert "0.02 GiB RAM tier" in ready  # 16 MiB
        with Client(str(d.socket)) as c:  # a HELLO is logged at debug level
            c.stats()
    finally:
        assert d.stop() == 0
    assert "DEBUG" in d.log()  # log_level from the file


def test_help_mentions_every_setting() -> None:
    r = run_tierd("--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in config.SETTINGS:
        assert f"--{name.replace('_', '-')}" in out, name
    assert "--config" in out
    assert "TIERD_" in out
    assert "25%" in out  # the size syntax, and % survived argparse formatting


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "tierd"
    if not script.exists():
        pytest.skip(f"no tierd console script beside {sys.executable}")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "TIERD_" in r.stdout and "--ram-bytes" in r.stdout


def test_version() -> None:
    from tierd import __version__

    r = run_tierd("--version")
    assert r.returncode == 0
    assert __version__ in r.stdout
