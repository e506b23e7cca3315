"""Eviction order, kept apart from placement: the policy only ranks, placement decides and moves.

Policies by name (``make_policy``): ``lru``, ``s3fifo`` (the heuristic), ``learned`` (a model of
reuse distance) and ``auto`` (follows whichever scores best in shadow caches on the live stream).
"""

from tierd.policy import auto, learned, s3fifo  # noqa: F401  (registered on import)
from tierd.policy.base import Policy, make_policy
from tierd.policy.lru import LRU

NAMES = ("lru", "s3fifo", "learned", "auto")

__all__ = ["LRU", "NAMES", "Policy", "make_policy"]
