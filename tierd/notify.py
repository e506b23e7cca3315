"""sd_notify: tell systemd (or any listener on $NOTIFY_SOCKET) how the daemon is doing.

A notification is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a leading "@" means the Linux abstract namespace. With no NOTIFY_SOCKET every
call is a no-op, so the daemon runs the same in a shell. Sending never blocks: when the listener does
not read (its queue holds 10 datagrams by default) the message is dropped and logged at debug level.

The messages: READY=1 (serving), STATUS= (a line for ``systemctl status``), WATCHDOG=1, STOPPING=1,
and around a reload RELOADING=1 with MONOTONIC_USEC= (the reload's start on CLOCK_MONOTONIC, which
systemd's ``Type=notify-reload`` requires) followed by READY=1 once it is applied or refused.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("tierd.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.address:
            # non-blocking: a receiver that stops reading (a full queue: 10 datagrams by default) must
            # cost a dropped message, never a blocked event loop
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not wd_pid or wd_pid == str(os.getpid()))
        #: seconds between WATCHDOG=1 pings (half of systemd's WatchdogSec), or None
        self.watchdog_interval: float | None = int(usec) / 2e6 if watched and int(usec) > 0 else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        if self._sock is None:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(msg, self.address)
        except OSError as e:  # systemd gone or socket full: never fatal for the daemon
            log.debug("sd_notify to %r failed: %s", self.address, e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> bool:
        return self.send(status=status)

    def stopping(self) -> bool:
        return self.send(stopping=1, status="stopping")

    def reloading(self) -> bool:
        """A reload starts: RELOADING=1 with the time on CLOCK_MONOTONIC, as systemd expects it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(reloading=1, monotonic_usec=usec, status="reloading the configuration")

    def reloaded(self, status: str) -> bool:
        """The reload is over (applied or refused): READY=1 again, with what it did."""
        return self.send(ready=1, status=status)

    def watchdog(self) -> bool:
        return self.send(watchdog=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
