"""Per-key reuse history and the features the learned eviction policy ranks by.

One :class:`History` is fed the reference stream (``ref``: a get or a put of a key, with its size,
tags, owner and time) and answers :meth:`History.features` for any key it has seen: what is known
at that moment about when it will be read again. The live policy and training replay the same
class over the same kind of stream, so the model sees the same features in both.

Clocks: ``c`` counts references (gets and puts); ``s`` is seconds. Distances (the training label)
are in references, like the ages here; seconds are a feature too (chats pause).

Features (``FEATURES``; NaN where unknown, which the tree model handles natively):
age and age in seconds since the last reference; the last ``GAPS`` gaps between references; the
count of gets; the size; the age since the put; the namespace's (key prefix before the first "/")
mean reuse gap and share of gets that were reuses; the owner's (client or uid) share of recent
references; a code of the tags; the age over the key's own mean gap ("overdue").
"""

from __future__ import annotations

import math
import zlib
from collections import deque

GAPS = 4
FEATURES = (
    "age", "age_s", *(f"gap{i + 1}" for i in range(GAPS)), "gets", "size", "since_put",
    "ns_gap", "ns_reuse", "owner_share", "tags", "overdue",
)  # fmt: skip
N_FEATURES = len(FEATURES)
NAN = float("nan")
#: the weight of the newest value in the namespace and owner averages
EWMA = 0.02
#: how many keys' histories are kept at most (the oldest referenced go first)
MAX_KEYS = 1 << 18


class _Key:
    __slots__ = ("c", "gaps", "gets", "mean_gap", "nbytes", "ns", "owner", "put_c", "s", "tags")

    def __init__(self, ns: str, nbytes: int, tags: int) -> None:
        self.ns = ns
        self.nbytes = nbytes
        self.tags = tags
        self.c = 0
        self.s = 0.0
        self.gets = 0
        self.gaps: deque[int] = deque(maxlen=GAPS)
        self.mean_gap = NAN
        self.put_c = -1
        self.owner = -1


class _Ns:
    __slots__ = ("gap", "reuse")

    def __init__(self) -> None:
        self.gap = NAN  # EWMA of log1p(reuse gap)
        self.reuse = 0.5  # EWMA of "this get was a reuse"


def namespace(key: str) -> str:
    return key.split("/", 1)[0] if "/" in key else ""


def tag_code(tags: tuple[str, ...] | list[str]) -> int:
    """A stable small code for a tag set (the same in every process: not Python's hash)."""
    return zlib.crc32("\0".join(sorted(tags)).encode()) % 1021 if tags else 0


class History:
    """The reference stream's memory: per key, per namespace, per owner."""

    def __init__(self) -> None:
        self.c = 0
        self.s = 0.0
        self.keys: dict[str, _Key] = {}
        self._ns: dict[str, _Ns] = {}
        self._owner: dict[int, tuple[float, int]] = {}  # owner -> (share, at reference)

    def ref(self, key: str, nbytes: int, tags: int, owner: int, op: str, s: float) -> None:
        """One reference at ``s`` seconds: ``op`` "put" (a new version) or "get"."""
        self.c += 1
        c = self.c
        self.s = s
        k = self.keys.pop(key, None)  # re-inserted: dict order is reference order, oldest first
        ns_name = namespace(key)
        ns = self._ns.get(ns_name)
        if ns is None:
            ns = self._ns[ns_name] = _Ns()
        if k is None:
            k = _Key(ns_name, nbytes, tags)
            if len(self.keys) >= MAX_KEYS:
                del self.keys[next(iter(self.keys))]
        self.keys[key] = k
        k.nbytes, k.tags, k.owner = nbytes, tags, owner
        if op == "put":
            k.put_c = c
        else:
            reuse = k.c > 0
            ns.reuse += EWMA * ((1.0 if reuse else 0.0) - ns.reuse)
            if reuse:
                gap = c - k.c
                k.gaps.append(gap)
                lg = math.log1p(gap)
                ns.gap = lg if ns.gap != ns.gap else ns.gap + EWMA * (lg - ns.gap)
                k.mean_gap = gap if k.mean_gap != k.mean_gap else 0.7 * k.mean_gap + 0.3 * gap
            k.gets += 1
        k.c, k.s = c, s
        share = self._owner
        if len(share) > 256:  # owners that went away
            for o in [o for o in share if self.owner_share(o) < 1e-3]:
                del share[o]
        share[owner] = (self.owner_share(owner) + EWMA, c)

    def owner_share(self, owner: int) -> float:
        """The owner's decayed share of the references (decayed lazily: O(1) per reference)."""
        v, at = self._owner.get(owner, (0.0, self.c))
        return v * (1.0 - EWMA) ** (self.c - at)

    def features(self, key: str, s: float | None = None) -> list[float]:
        """The feature row of ``key`` now (``s``: seconds now, default the last reference's)."""
        k = self.keys.get(key)
        if k is None:
            return [NAN] * N_FEATURES
        now_s = self.s if s is None else s
        age = self.c - k.c
        gaps = [math.log1p(g) for g in reversed(k.gaps)]
        gaps += [NAN] * (GAPS - len(gaps))
        ns = self._ns[k.ns]
        return [
            math.log1p(age),
            math.log1p(max(0.0, now_s - k.s)),
            *gaps,
            math.log1p(k.gets),
            math.log2(k.nbytes + 1),
            math.log1p(self.c - k.put_c) if k.put_c >= 0 else NAN,
            ns.gap,
            ns.reuse,
            self.owner_share(k.owner),
            float(k.tags),
            age / (k.mean_gap + 1.0) if k.mean_gap == k.mean_gap else NAN,
        ]
