"""``learned``: evict the copy predicted to be read again last, in the manner of Learning Relaxed
Belady (Song et al., NSDI 2020).

Belady's rule (evict what is needed furthest in the future) is optimal and needs the future; LRB
learns to approximate it where it matters: among a sample of candidates, pick one whose next read
is beyond the "boundary" (the distance at which an entry would have been evicted anyway). Here:

- The policy feeds every reference it sees (a put of a new version, a get) to a
  :class:`~tierd.policy.features.History` and to a ring of the last ``history`` references.
- Training (a child process, :mod:`tierd.policy.trainer`; offline replay calls it inline) replays
  the ring through a fresh History; at sampled moments it takes random keys referenced within the
  memory window and labels each with its observed distance (in references) to its next get,
  clipped at the boundary (no next get within the boundary: "dead"). A scikit-learn
  HistGradientBoostingRegressor fits log1p(distance) on the features. The boundary is twice the
  LRU eviction age at the tier's capacity, estimated from the same references (how many references
  it takes to touch ``capacity`` bytes of distinct keys).
- Eviction: ``candidates()`` scores a sample (the ``OLDEST`` least recently used plus ``RANDOM``
  others drawn at random) in one model call, yields them furthest predicted first (predicted dead
  ones come first by construction), then every other copy in LRU order. The ranking is reused
  while no reference arrives (a burst of demotions costs one model call). Before a model is
  installed the order is plain LRU.

The fitted trees are exported to flat numpy arrays (:class:`Forest`) and evaluated for the whole
sample at once, level by level: scikit-learn's own predict took 16 ms per call of 64 rows here
(thread start-up per tree), this takes well under a millisecond, and the loop never calls into
scikit-learn. ``tests/test_eviction.py`` checks that both give the same values.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tierd.policy.base import Item, Policy, register
from tierd.policy.features import FEATURES, History, tag_code

T = TypeVar("T", bound=Item)
OLDEST = 16
RANDOM = 48
#: references between trainings (and before the first)
TRAIN_EVERY = 5000
#: references kept for training
HISTORY = 60000
#: training examples drawn from one history at most
EXAMPLES = 40000
#: a prediction within this share of the boundary (in log space) counts as "dead"
DEAD_AT = 0.97

Ref = tuple[float, str, int, int, int, str]
"""(seconds, key, nbytes, tag code, owner, op) — op "get" or "put"."""


@register("learned")
class Learned(Policy[T]):
    name = "learned"

    def __init__(
        self,
        capacity: int = 0,
        *,
        train_every: int = TRAIN_EVERY,
        history: int = HISTORY,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        **_: Any,
    ) -> None:
        self.capacity = capacity
        self.train_every = train_every
        self.clock = clock
        self.hist = History()
        self.refs: deque[Ref] = deque(maxlen=history)
        self._order: OrderedDict[int, T] = OrderedDict()
        self._slots: list[int] = []  # resident versions, for sampling at random
        self._pos: dict[int, int] = {}
        self._rng = random.Random(seed)
        self._since_train = 0
        self._model: Any = None
        self._boundary = 0
        self._ranked: list[int] = []
        self._ranked_at = -1
        self.trainings = 0
        self.scored = 0
        self.dead_first = 0

    # ---- the stream ----------------------------------------------------------------------------
    def _ref(self, item: T, op: str) -> None:
        s = self.clock()
        code = tag_code(item.tags)
        self.hist.ref(item.key, item.nbytes, code, item.uid, op, s)
        self.refs.append((s, item.key, item.nbytes, code, item.uid, op))
        self._since_train += 1

    def on_put(self, version: int, item: T, new: bool = False) -> None:
        if version not in self._order:
            self._pos[version] = len(self._slots)
            self._slots.append(version)
        self._order[version] = item
        self._order.move_to_end(version)
        if new:
            self._ref(item, "put")

    def on_hit(self, version: int) -> None:
        item = self._order.get(version)
        if item is not None:
            self._order.move_to_end(version)
            self._ref(item, "get")

    def on_remove(self, version: int) -> None:
        if self._order.pop(version, None) is None:
            return
        i = self._pos.pop(version)
        last = self._slots.pop()
        if last != version:
            self._slots[i] = last
            self._pos[last] = i

    def __len__(self) -> int:
        return len(self._order)

    # ---- ranking -------------------------------------------------------------------------------
    def candidates(self) -> Iterator[T]:
        order = self._order
        if self._model is None or not order:
            yield from list(order.values())
            return
        if self._ranked_at != self.hist.c or not self._ranked:
            self._rank()
        ranked = self._ranked
        for v in list(ranked):
            item = order.get(v)
            if item is not None:
                yield item
        seen = set(ranked)
        for v, item in list(order.items()):
            if v not in seen and v in order:
                yield item

    def _rank(self) -> None:
        order = self._order
        sample: dict[int, None] = {}
        for v in order:
            sample[v] = None
            if len(sample) >= OLDEST:
                break
        slots = self._slots
        if len(slots) <= OLDEST + RANDOM:
            sample.update(dict.fromkeys(slots))
        else:
            for _ in range(RANDOM):
                sample[slots[self._rng.randrange(len(slots))]] = None
        versions = list(sample)
        now = self.clock()
        rows = [self.hist.features(order[v].key, now) for v in versions]
        preds = self._predict(rows)
        self.scored += len(rows)
        ranked = sorted(zip(preds, range(len(versions)), versions, strict=True), reverse=True)
        self._ranked = [v for _, _, v in ranked]
        self._ranked_at = self.hist.c
        if ranked and ranked[0][0] >= DEAD_AT * math.log1p(self._boundary):
            self.dead_first += 1

    def _predict(self, rows: list[list[float]]) -> list[float]:
        import numpy as np

        return self._model.predict(np.asarray(rows, dtype=np.float64)).tolist()

    # ---- training ------------------------------------------------------------------------------
    def wants_training(self) -> bool:
        return self._since_train >= self.train_every and len(self.refs) >= min(self.train_every, 2000)

    def training_job(self) -> tuple[Callable[..., Any], tuple[Any, ...]] | None:
        if not self.wants_training():
            return None
        self._since_train = 0
        return train, (list(self.refs), self.capacity)

    def install(self, model: Any) -> None:
        if model is None:
            return
        self._model, self._boundary = model["model"], model["boundary"]
        self._ranked_at = -1
        self.trainings += 1

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "entries": len(self), "trained": self.trainings,
                "boundary_refs": self._boundary, "scored": self.scored,
                "dead_first": self.dead_first}  # fmt: skip


# ---- training (runs in a child process; plain data in, plain data out) ----------------------------
def boundary_of(refs: list[Ref], capacity: int) -> int:
    """Twice the references it takes to touch ``capacity`` bytes of distinct keys (median of 16
    starts): the LRU eviction age at that capacity, doubled."""
    n = len(refs)
    if capacity <= 0 or n < 2:
        return max(64, n // 4)
    ages = []
    for start in range(0, n, max(1, n // 16)):
        seen: set[str] = set()
        total = 0
        j = start
        while j < n and total < capacity:
            key = refs[j][1]
            if key not in seen:
                seen.add(key)
                total += refs[j][2]
            j += 1
        if total >= capacity:
            ages.append(j - start)
    if not ages:
        return max(64, n // 2)
    ages.sort()
    return max(64, min(2 * ages[len(ages) // 2], n // 2))


def examples(
    refs: list[Ref], boundary: int, *, seed: int = 0, limit: int = EXAMPLES
) -> tuple[list[list[float]], list[float]]:
    """Feature rows of random keys at sampled moments, labelled log1p(distance to the next get)."""
    n = len(refs)
    gets: dict[str, list[int]] = {}
    for i, (_s, key, _n, _c, _o, op) in enumerate(refs):
        if op == "get":
            gets.setdefault(key, []).append(i)
    rng = random.Random(seed)
    per_moment = 8
    stride = max(1, -(-n * per_moment // max(1, limit)))  # ceil: at most ``limit`` examples
    hist = History()
    keys: list[str] = []
    known: set[str] = set()
    window = 2 * boundary
    xs: list[list[float]] = []
    ys: list[float] = []
    for i, (s, key, nbytes, code, owner, op) in enumerate(refs):
        hist.ref(key, nbytes, code, owner, op, s)
        if key not in known:
            known.add(key)
            keys.append(key)
        if i % stride or i < 16:
            continue
        for _ in range(per_moment):
            k = keys[rng.randrange(len(keys))]
            h = hist.keys.get(k)
            if h is None or hist.c - h.c > window:
                continue
            pos = gets.get(k, [])
            j = bisect.bisect_right(pos, i)
            if j < len(pos):
                dist = pos[j] - i
            elif n - i > boundary:
                dist = boundary
            else:
                continue  # unknown: the history ends before the boundary
            xs.append(hist.features(k, s))
            ys.append(math.log1p(min(dist, boundary)))
    return xs, ys


class Forest:
    """A fitted HistGradientBoostingRegressor as flat arrays: every tree's nodes end to end."""

    def __init__(self, model: Any) -> None:
        import numpy as np

        trees = [its[0].nodes for its in model._predictors]
        offsets = np.cumsum([0] + [len(t) for t in trees[:-1]]).astype(np.intp)
        nodes = np.concatenate(trees)
        shift = np.repeat(offsets, [len(t) for t in trees])
        self.roots = offsets
        self.feature = nodes["feature_idx"].astype(np.intp)
        self.threshold = nodes["num_threshold"].astype(np.float64)
        self.missing_left = nodes["missing_go_to_left"].astype(bool)
        self.leaf = nodes["is_leaf"].astype(bool)
        self.left = np.where(self.leaf, np.arange(len(nodes)), nodes["left"].astype(np.intp) + shift)
        self.right = np.where(self.leaf, np.arange(len(nodes)), nodes["right"].astype(np.intp) + shift)
        self.value = nodes["value"].astype(np.float64)
        self.depth = int(nodes["depth"].max()) if len(nodes) else 0
        self.base = float(np.ravel(model._baseline_prediction)[0])

    def predict(self, x: Any) -> Any:
        import numpy as np

        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        rows = np.arange(len(x))[:, None]
        for _ in range(self.depth):
            v = x[rows, self.feature[node]]
            go_left = (v <= self.threshold[node]) | (np.isnan(v) & self.missing_left[node])
            node = np.where(go_left, self.left[node], self.right[node])  # a leaf points at itself
        return self.base + self.value[node].sum(axis=1)


def train(refs: list[Ref], capacity: int, seed: int = 0) -> dict[str, Any] | None:
    """Fit the model on ``refs`` (oldest first); None when there is too little to learn from."""
    import numpy as np
    from sklearn.ensemble import HistGradientBoostingRegressor

    boundary = boundary_of(refs, capacity)
    xs, ys = examples(refs, boundary, seed=seed)
    if len(xs) < 200:
        return None
    model = HistGradientBoostingRegressor(max_iter=60, learning_rate=0.1, max_leaf_nodes=31,
                                          early_stopping=False, random_state=seed)  # fmt: skip
    x = np.asarray(xs, dtype=np.float64)
    x[:, np.isnan(x).all(axis=0)] = 0.0  # a feature never known here (no puts): constant, not all-NaN
    model.fit(x, np.asarray(ys, dtype=np.float64))
    return {"model": Forest(model), "boundary": boundary, "examples": len(xs), "features": FEATURES}
