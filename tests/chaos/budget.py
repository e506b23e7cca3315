"""The chaos suite's budget (read from the environment once) and the figures its tests add up.

Its own module, imported by one name (``tests.chaos.budget``) from the tests and the conftest, so
both see the same counters.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest


def knob(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{name}={value!r}: a positive whole number is needed")
    return int(value)


EXAMPLES = knob("CHAOS_EXAMPLES", 200)
KILLS = knob("CHAOS_KILLS", 10)
HOSTILE_SECONDS = knob("CHAOS_HOSTILE_SECONDS", 20)

#: what the suite did and saw, by name (counts add up over tests; "peak" figures are set once)
FIGURES: Counter[str] = Counter()
NOTES: dict[str, str] = {}
