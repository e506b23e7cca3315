"""Memory pressure: give the home tier's memory back when the machine runs short, before the OOM killer.

The server's loop calls :meth:`Relief.poll` about once a second. Each poll reads the
:class:`~tierd.monitor.Monitor` and acts on its level:

    high or worse   lower the home tier's ceiling, a bound on the arena's pages (free ones
                    included), to the pages it holds less what the monitor asks (never below the
                    bytes leased, pinned or being written); return that much of the free arena
                    pages to the kernel (``MADV_REMOVE``, holes of 2 MiB or more, largest first)
                    and, if free pages were not enough, demote coldest first, predicted prefetches
                    not read yet included, down to the ceiling. While the ceiling is below capacity
                    a region freed later returns its pages only if the arena's pages pass the
                    ceiling (the tier does it): free pages within it stay faulted in, a pool the
                    next region reuses, instead of being punched and refaulted by the next promotion
    high            ... but never below the window the clients use: the bytes they hold (leased,
                    pinned, being written) and hinted without reading yet (in RAM, on their way,
                    or named by each client's last hint, loaded or not: a streaming model's next
                    blocks; ``Placement.held_bytes``), the largest of the last ``WINDOW_POLLS``
                    polls (the window of a model streaming small vision blocks at the moment of a
                    poll is smaller than the one its decoder layers need a second later). Taking
                    it makes the model wait for each block, read on demand instead of ahead, and
                    drops the prefetches that no longer fit. Only free pages, cold entries and
                    predictions go.
    critical        ... and the hinted window too (unread prefetches last): the OOM killer is near,
                    so whatever the clients asked for, the group's memory comes first (so no
                    client's hints can hold memory the machine needs: they count only below it)
    low             hold the ceiling where it is
    none            let the ceiling grow back by ``CEILING_STEP`` of the capacity per poll, so a
                    squeezed tier regrows slowly instead of taking everything back at once and
                    being squeezed again

Counters: ``pressure_released_bytes`` (pages returned, here and by later frees; pages that were
really resident, so a hole punched twice counts once) and
``pressure_demoted_bytes``. The last reading is kept for status (:attr:`Relief.last`).
"""

from __future__ import annotations

import logging
from collections import deque

from tierd.monitor import Monitor, Pressure
from tierd.placement import Placement
from tierd.tiers.ram import RamTier

log = logging.getLogger("tierd")
#: share of the home tier the pressure ceiling regrows by per calm poll (about 1 s)
CEILING_STEP = 0.02
#: free holes smaller than this keep their pages (returning them costs more than it gives)
MIN_RELEASE_BYTES = 2 << 20
#: below critical, the ceiling stays above the largest window seen in this many polls (about 1 s each)
WINDOW_POLLS = 30


class Relief:
    """Keeps the home tier within what the machine can spare (see the module docstring)."""

    def __init__(self, placement: Placement, ram: RamTier, monitor: Monitor | None = None) -> None:
        """``ram``: the home tier of ``placement`` (its arena's pages are what is given back)."""
        assert ram is placement.ram
        self.placement = placement
        self.ram = ram
        self.monitor = monitor or Monitor()
        self.m = placement.m
        #: the last reading (None before the first poll)
        self.last: Pressure | None = None
        #: polls that could not read the system (no file descriptor left, say): skipped, not fatal
        self.skipped = 0
        #: the bytes clients held and hinted (:meth:`Placement.held_bytes`) at each of the last polls
        self._windows: deque[int] = deque([0], maxlen=WINDOW_POLLS)
        ram.on_release = self._released

    def _released(self, n: int) -> None:
        self.m.metrics.pressure_released_bytes += n

    async def poll(self) -> None:
        """Read the monitor once and act on its level."""
        placement = self.placement
        ram = self.ram
        try:
            p = self.monitor.poll(ram.resident_bytes())
        except OSError as e:  # e.g. EMFILE while clients hold every descriptor: skip this poll
            self.skipped += 1
            if self.skipped == 1 or self.skipped % 60 == 0:
                log.warning("memory pressure check skipped (%d so far): %s", self.skipped, e)
            return
        self.last = p
        self._windows.append(placement.held_bytes(hinted=True))
        if p.shrink_bytes <= 0:
            if p.level == "none" and ram.ceiling < ram.capacity_bytes:
                placement.raise_ceiling(int(CEILING_STEP * ram.capacity_bytes))
            return
        metrics = self.m.metrics
        # The ceiling bounds the arena's pages, free ones included: free pages within it stay
        # faulted in (the tier reuses them for the next region). Lowering it by what the monitor
        # asks, from what the arena holds now, takes back that much and no more: first from free
        # holes, then by demoting (whose freed regions the tier punches while it is over the ceiling).
        # Below critical, the window clients hinted and have not read yet stays (see the module doc).
        critical = p.level == "critical"
        resident = ram.resident_bytes()
        floor = 0 if critical else max(self._windows)
        ceiling = placement.lower_ceiling(max(ram.used_bytes, resident) - p.shrink_bytes, floor=floor)
        released = ram.release_free(MIN_RELEASE_BYTES, limit=max(0, ram.resident_bytes() - ceiling))
        metrics.pressure_released_bytes += released
        for store in self.m.stores.values():  # buffers kept for speed (the disk tier's write staging)
            store.shed()
        log.warning("memory pressure %s (%s): RAM tier held at %.0f MiB (of %.0f), free pages returned: "
                    "%.0f MiB; demoting down to it", p.level, ", ".join(p.reasons), ceiling / 2**20,
                    ram.capacity_bytes / 2**20, released / 2**20)  # fmt: skip
        # regions freed from here on return their pages as they go (ram.ceiling is down)
        freed = await placement.balance_once(
            target_used=ceiling, take_prefetched=critical, take_predicted=True
        )
        metrics.pressure_demoted_bytes += freed
        log.info("memory pressure: demoted %.0f MiB", freed / 2**20)
