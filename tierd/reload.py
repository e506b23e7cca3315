"""Reloading the configuration while clients keep their leases: what SIGHUP (``systemctl reload``) does.

A reload reads the settings again exactly as the start did (the same flags, the environment, the
file named by ``--config`` or ``$TIERD_CONFIG``, read afresh), validates them all, and then::

    RELOADING=1 + MONOTONIC_USEC   (sd_notify: systemd shows "reloading")
    load + validate (in a thread)  -- a bad file: logged, nothing applied, the old settings stay
    compare with the settings in use:
        live setting changed       -> its hook applies it (the objects are changed in place)
        restart setting changed    -> logged as needing a restart, the running value stays
    READY=1 + STATUS=              (systemd: active again)

Nothing is rebuilt: no entry, lease, put or connection is touched, and the RAM arena that clients
have mapped stays as it is. The settings that change live, and how (:data:`LIVE`), are the hooks
:meth:`Reloader.hook` registers; every other setting needs a restart (sizes of the tiers, the
socket, the state directory). A feature with a setting of its own (a metrics listener) registers
its hook the same way and becomes live too.

Reloads run one at a time on the event loop; a SIGHUP during a reload runs one more reload after it.
The outcome of the last one is kept in :attr:`Reloader.last` (``tierctl status --json`` shows it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tierd.config import SETTINGS, Config, ConfigError, load

if TYPE_CHECKING:
    from tierd.notify import Notifier

log = logging.getLogger("tierd.reload")

#: applies a changed setting to the running daemon, given the whole new (validated) Config
Hook = Callable[[Config], None]


def load_checked(argv: list[str]) -> Config:
    """The settings as a start with ``argv`` would see them now; ConfigError when one is bad."""
    cfg = load(argv)
    cfg.validate()
    return cfg


def changed(old: Config, new: Config) -> list[str]:
    """The settings whose value differs, in Config's order."""
    return [name for name in SETTINGS if getattr(old, name) != getattr(new, name)]


class Reloader:
    """Holds the settings in use and the hooks that change them live; ``reload()`` runs one reload."""

    def __init__(self, config: Config, argv: list[str], notifier: Notifier) -> None:
        #: the settings in use (a restart-only setting keeps the value the daemon started with)
        self.config = config
        self.argv = list(argv)
        self.notifier = notifier
        self.hooks: dict[str, Hook] = {}
        #: the outcome of the last reload, or None before the first
        self.last: dict[str, Any] | None = None
        self.count = 0
        self._running = False
        self._again = False

    def hook(self, setting: str, fn: Hook) -> None:
        """Make ``setting`` change live: ``fn(new_config)`` applies it when a reload changes it."""
        if setting not in SETTINGS:
            raise ValueError(f"no setting named {setting!r}")
        self.hooks[setting] = fn

    @property
    def live(self) -> list[str]:
        """The settings a reload applies, in Config's order."""
        return [name for name in SETTINGS if name in self.hooks]

    def request(self) -> asyncio.Task[None] | None:
        """SIGHUP: reload now (returns the task, which the caller keeps until done), or once more
        after the reload in progress (returns None)."""
        if self._running:
            self._again = True
            return None
        self._running = True
        return asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                await self.reload()
                if not self._again:
                    break
        finally:
            self._running = False

    async def reload(self) -> dict[str, Any]:
        """Read the settings again and apply what can change live; returns (and keeps) the outcome."""
        self.count += 1
        self.notifier.reloading()
        t0 = time.monotonic()
        outcome: dict[str, Any] = {"n": self.count, "at": time.time(), "applied": {}, "restart_needed": {},
                                   "error": None}  # fmt: skip
        try:
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load_checked, self.argv)
            except ConfigError as e:
                outcome["error"] = str(e)
                log.error("%s; keeping the settings in use", e)
                return outcome
            self._apply(new, outcome)
            return outcome
        finally:
            outcome["seconds"] = round(time.monotonic() - t0, 4)
            self.last = outcome
            if outcome["error"]:
                status = f"reload {self.count} failed, old settings kept: {outcome['error']}"
            else:
                status = (f"reload {self.count}: {len(outcome['applied'])} settings applied, "
                          f"{len(outcome['restart_needed'])} need a restart")  # fmt: skip
            self.notifier.reloaded(status[:200])

    def _apply(self, new: Config, outcome: dict[str, Any]) -> None:
        old = self.config
        live: dict[str, Any] = {}
        for name in changed(old, new):
            was, now = getattr(old, name), getattr(new, name)
            if name in self.hooks:
                live[name] = now
                outcome["applied"][name] = {"from": was, "to": now}
            else:
                outcome["restart_needed"][name] = {"running": was, "configured": now}
                log.warning("%s changed (%r -> %r) but takes a restart; still using %r",
                            name, was, now, was)  # fmt: skip
        merged = dataclasses.replace(old, **live)
        merged.sources = dict(old.sources)
        for name in live:  # where each applied value came from now (no entry: the default)
            if name in new.sources:
                merged.sources[name] = new.sources[name]
            else:
                merged.sources.pop(name, None)
        self.config = merged
        done: set[int] = set()
        for name in live:
            fn = self.hooks[name]
            if id(fn) not in done:  # one hook for several settings (the two watermarks) runs once
                done.add(id(fn))
                fn(merged)
            log.info("%s = %r (was %r)", name, live[name], outcome["applied"][name]["from"])
        if not live and not outcome["restart_needed"]:
            log.info("no setting changed")
