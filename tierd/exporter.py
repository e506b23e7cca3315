"""The two ways the metrics leave the daemon on their own: an HTTP endpoint and a textfile.

Both render :mod:`tierd.exposition`'s text from the daemon's status, on the event loop, between two
requests: no thread ever reads the daemon's tables. (``tierctl metrics``, the third way, renders the
status it fetched over the socket.)

- ``metrics_listen = "127.0.0.1:PORT"``: :class:`MetricsHttp` answers ``GET /metrics`` (and ``/``)
  with the exposition text, HTTP/1.1, one request per connection. Off by default. Only loopback
  addresses are accepted (127.0.0.0/8, ::1, localhost), by choice: the metrics name the machine and
  its load, and the daemon has no TLS or authentication; scrape from another machine through
  node_exporter's textfile collector or a proxy. Port 0 takes a free port; status says which
  (``daemon.metrics_listen``). A scraper cannot hurt the daemon: a request head is at most 8 KiB
  and must arrive within 5 s, and at most 16 scrapes are served at once (more are closed).
- ``metrics_textfile = PATH``: :func:`write_textfile` every ``metrics_interval`` seconds writes the
  text to ``PATH.tmp`` and renames it over ``PATH`` (a reader sees the old file or the new one,
  never half of one), through aiofiles, so the loop never waits on the file system. The file is
  mode 0644 (node_exporter runs as another user) and is removed when the daemon stops. A write
  that fails (a full disk, a removed directory) is logged once and tried again at each interval;
  the daemon goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tierd")

#: the text format prometheus_client's generate_latest writes (legacy metric names, no escaping)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: bytes a request head may have (request line and headers)
MAX_HEAD_BYTES = 8192
#: seconds a scraper has to send its request head
HEAD_TIMEOUT = 5.0
#: scrapes served at once; a connection past this is closed unanswered
MAX_SCRAPES = 16


class ListenError(ValueError):
    """``metrics_listen`` is not a loopback HOST:PORT (a configuration error: exit status 2)."""


def parse_listen(spec: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` -> ("127.0.0.1", 9464); ``[::1]:PORT`` and ``localhost:PORT`` too.

    ListenError for anything else, a non-loopback address included (see the module docstring).
    """
    host, sep, port_s = spec.strip().rpartition(":")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ListenError(f"{spec!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"{spec!r}: {host!r} is not an IP address (use 127.0.0.1 or ::1)") from None
    if not addr.is_loopback:
        raise ListenError(
            f"{spec!r}: {host} is not a loopback address; tierd serves metrics on loopback only "
            "(no TLS, no authentication): use 127.0.0.1, or --metrics-textfile with node_exporter"
        )
    return str(addr), int(port_s)


def bind_listen(spec: str) -> socket.socket:
    """A listening TCP socket for ``spec`` (OSError when the port is taken)."""
    host, port = parse_listen(spec)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsHttp:
    """The HTTP endpoint, on the daemon's loop; ``render()`` gives the exposition text."""

    def __init__(self, sock: socket.socket, render: Callable[[], bytes]) -> None:
        self.sock = sock
        self.render = render
        self.address = "{}:{}".format(*sock.getsockname()[:2])
        if sock.family == socket.AF_INET6:
            self.address = "[{}]:{}".format(*sock.getsockname()[:2])
        self.active = 0
        self.scrapes = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self.sock, limit=MAX_HEAD_BYTES)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_SCRAPES:
            writer.close()
            return
        self.active += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            status, body = self._answer(head)
            ctype = CONTENT_TYPE if status == "200 OK" else "text/plain; charset=utf-8"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode("ascii")
            )
            if not head.startswith(b"HEAD "):
                writer.write(body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass  # a scraper that sent too much, too little or too late gets the connection closed
        finally:
            self.active -= 1
            writer.close()

    def _answer(self, head: bytes) -> tuple[str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"not an HTTP request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"only GET\n"
        if target not in (b"/metrics", b"/"):
            return "404 Not Found", b"tierd serves /metrics\n"
        self.scrapes += 1
        return "200 OK", self.render()


async def write_textfile(path: Path, text: bytes) -> None:
    """Write ``text`` to ``path`` atomically (``path.tmp``, then a rename), off the loop, mode 0644
    whatever the umask (the unit's UMask=0077 would otherwise hide it from node_exporter)."""
    import aiofiles
    import aiofiles.os

    tmp = path.with_name(path.name + ".tmp")
    async with aiofiles.open(tmp, "wb") as f:
        await f.write(text)
    await aiofiles.os.wrap(os.chmod)(tmp, 0o644)
    await aiofiles.os.replace(tmp, path)


async def textfile_loop(path: Path, render: Callable[[], bytes], interval: float) -> None:
    """Rewrite ``path`` now and every ``interval`` seconds until cancelled; remove it then."""
    failing = ""
    try:
        while True:
            try:
                await write_textfile(path, render())
                if failing:
                    log.info("metrics textfile %s: written again", path)
                failing = ""
            except OSError as e:
                if str(e) != failing:  # say it once, not every few seconds
                    log.warning("metrics textfile %s: cannot write it (%s); trying again every %.0f s",
                                path, e, interval)  # fmt: skip
                failing = str(e)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
