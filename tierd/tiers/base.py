"""The interface every tier implements, so adding a tier changes no manager code.

A tier is a place an entry's bytes can live. It owns its capacity and reports what it holds; the
manager owns entries, leases and placement, and asks tiers for space by size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class Tier(ABC):
    #: "gpu", "ram" or "disk": the name users see in status, pin and show.
    name: str

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes the tier may hold in all."""

    @property
    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes now taken by entries (including alignment padding)."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """Numbers for ``status``: at least capacity_bytes and used_bytes."""

    @abstractmethod
    def close(self) -> None:
        """Release the tier's resources. Idempotent."""
