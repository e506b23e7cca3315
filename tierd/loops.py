"""The event loop, chosen by name: uvloop when it is installed, else asyncio's own."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def loop_factory(name: str = "auto") -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(name of the loop used, a factory for it). ``name``: auto, uvloop or asyncio."""
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop
