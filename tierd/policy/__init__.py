"""Eviction order, kept apart from placement: the policy only ranks, placement decides and moves."""

from tierd.policy.lru import LRU

__all__ = ["LRU"]
