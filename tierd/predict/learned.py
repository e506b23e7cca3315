"""``learned``: candidate keys from cheap tables, ranked by a logistic regression fitted on the log.

Two stages, like a recommender:

1. Candidates (live tables updated by ``observe``, O(1) per access): the successors of the key
   just read in the client's stream (``t1``, what ``sequence`` uses), its successors in the
   client's stream of the same namespace (``tn``: two models read by one process are two streams),
   the next keys of the client's other active namespaces (``tn_other``: the other model's next
   read), two steps ahead (``t2``), and keys made by a name template learned across keys
   (``tmpl``: "vis/img00042/tile0" -> "vis/img00042/tile1" learned on other images applies to an
   image never read before, if that key exists).
2. Ranking: each candidate gets the features in ``FEATURES`` (the table shares above plus how long
   ago it was read, whether it is due by its own reuse period, its decayed popularity, same
   namespace / tags, the time gap) and a probability of being read by the same client within the
   next ``horizon`` gets, from a scikit-learn LogisticRegression fitted by ``train(history)`` on
   the access log (labels come from the log itself: what the client did read next).

``train`` replays the history through a fresh copy of the tables (it never reads the live ones),
builds examples, fits, and returns a ``LearnedModel`` (weights folded with the scaler into plain
floats); ``install`` swaps it in. ``predict`` is then a dot product per candidate in pure Python
(tens of microseconds). Before the first model, a fixed fallback ranks by the table shares.

Keys this predictor suggested to the same client in its last few calls are listed after new ones:
the prefetcher has already acted on them, so a new key is the more useful suggestion.
"""

from __future__ import annotations

import heapq
import importlib.util
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from tierd.predict.base import Predictor, register
from tierd.predict.log import Access
from tierd.predict.sequence import RowTable
from tierd.predict.templates import instantiate, parse_key, relation

FEATURES = (
    "t1",  # share of the candidate among the successors of the key just read (client stream)
    "tn",  # ... in the client's stream of the same namespace
    "tn_other",  # ... of the last key of another namespace the client reads (the other model)
    "t2",  # two steps ahead in the namespace stream, through the likeliest successor
    "tmpl",  # share of the name-template relation that makes the candidate from the key just read
    "tn_count",  # log count behind "tn" (support)
    "never",  # the candidate was never read (only put or named)
    "recency",  # log of the gets since the candidate was last read
    "fresh",  # read within the last 4 gets
    "due",  # how close the candidate is to its next read by its own mean reuse period
    "popularity",  # decayed read count (log)
    "same_ns",  # same namespace as the key just read
    "same_tags",  # same tags as the key just read
    "gap",  # log of the seconds since the client's previous get (context)
)
N_FEATURES = len(FEATURES)

_POP_HALF_LIFE = 4096.0


class _Key:
    __slots__ = ("ids", "last", "ns", "period", "pop", "pop_at", "tags", "tmpl")

    def __init__(self, key: str, tags: tuple[str, ...]) -> None:
        self.tmpl, self.ids = parse_key(key)
        self.ns = key.split("/", 1)[0] if "/" in key else ""
        self.tags = tags
        self.last = 0  # global get number of the last read (0: never)
        self.period = 0.0  # mean gets between reads
        self.pop = 0.0
        self.pop_at = 0


class _Client:
    __slots__ = ("gap", "last", "last_t", "ns_last", "pending", "suggested")

    def __init__(self) -> None:
        self.last: str | None = None
        self.last_t: float | None = None
        self.gap = 0.0
        self.ns_last: OrderedDict[str, str] = OrderedDict()
        self.suggested: deque[str] = deque(maxlen=8)
        self.pending: dict[str, int] = {}  # fallback suggestions not read yet -> last get number to count


@dataclass(frozen=True)
class Options:
    """``LearnedPredictor(**opts)`` / ``make_predictor("learned", **opts)``."""

    horizon: int = 16
    """A candidate is a positive example when the client reads it within this many gets: a prefetch
    read that much later is still used (it waits in RAM), so the confidence is "will be used"."""
    max_keys: int = 262144
    """Keys remembered (reuse period, popularity, name template); the least recently read eighth go."""
    max_rows: int = 65536
    """Rows per successor table (t1, tn; the template table has an eighth of it)."""
    max_successors: int = 8
    max_clients: int = 1024
    first_train_after: int = 1000
    """Gets before wants_training() first says yes..."""
    retrain_every: int = 5000
    """...and between trainings after that."""
    max_contexts: int = 12000
    """Gets of the history turned into examples (evenly spaced), to bound train()'s time."""
    min_confidence: float = 0.01
    """Candidates below this are not returned at all."""


@dataclass
class LearnedModel:
    """What train() returns: the logistic regression folded with its scaler into raw-feature weights."""

    weights: list[float]
    bias: float
    coef: dict[str, float]
    """Coefficients on standardized features (comparable with one another)."""
    importance: dict[str, float]
    """|standardized coefficient| shares, largest first."""
    samples: int
    positives: int
    contexts: int
    holdout_auc: float | None
    holdout_top1: float | None
    """Share of held-out gets whose top-ranked candidate was read within the horizon."""
    train_s: float
    history: int
    horizon: int


class _State:
    """The live tables (or, inside train(), a fresh copy replayed from the history)."""

    def __init__(self, o: Options) -> None:
        self.o = o
        self.keys: dict[str, _Key] = {}
        self.t1 = RowTable(o.max_rows, o.max_successors, 256.0)
        self.tn = RowTable(o.max_rows, o.max_successors, 256.0)
        self.tt = RowTable(max(64, o.max_rows // 8), o.max_successors, 256.0)
        self.clients: OrderedDict[int, _Client] = OrderedDict()
        self.gpos = 0
        # precision of the fallback's suggestions (read within the horizon?), for its confidence
        self.fb_hits = 0.0
        self.fb_made = 0.0

    def _info(self, a: Access) -> _Key:
        info = self.keys.get(a.key)
        if info is None:
            if len(self.keys) >= self.o.max_keys:
                drop = max(1, len(self.keys) // 8)
                for k, _ in heapq.nsmallest(drop, self.keys.items(), key=lambda kv: kv[1].last):
                    del self.keys[k]
            info = self.keys[a.key] = _Key(a.key, a.tags)
        elif a.tags:
            info.tags = a.tags
        return info

    def client(self, c: int) -> _Client:
        cl = self.clients.get(c)
        if cl is None:
            if len(self.clients) >= self.o.max_clients:
                self.clients.popitem(last=False)
            cl = self.clients[c] = _Client()
        else:
            self.clients.move_to_end(c)
        return cl

    def observe(self, a: Access) -> None:
        info = self._info(a)
        if a.op != "get":
            return
        self.gpos += 1
        g = self.gpos
        cl = self.client(a.client)
        if cl.pending:
            if cl.pending.pop(a.key, None) is not None:
                self.fb_hits += 1.0
            for k in [k for k, until in cl.pending.items() if until < g]:
                del cl.pending[k]
        if cl.last is not None and cl.last != a.key:
            self.t1.add(cl.last, a.key)
        pn = cl.ns_last.get(info.ns)
        if pn is not None and pn != a.key:
            self.tn.add(pn, a.key)
            pinfo = self.keys.get(pn)
            if pinfo is not None:
                self.tt.add(pinfo.tmpl, relation(pinfo.ids, info.tmpl, info.ids))
        cl.ns_last[info.ns] = a.key
        cl.ns_last.move_to_end(info.ns)
        if len(cl.ns_last) > 4:
            cl.ns_last.popitem(last=False)
        cl.gap = a.t - cl.last_t if cl.last_t is not None else 0.0
        cl.last_t = a.t
        cl.last = a.key
        if info.last:
            d = g - info.last
            info.period = float(d) if info.period == 0 else 0.75 * info.period + 0.25 * d
        info.last = g
        info.pop = info.pop * 0.5 ** ((g - info.pop_at) / _POP_HALF_LIFE) + 1.0
        info.pop_at = g

    def candidates(self, a: Access) -> tuple[list[str], list[list[float]]]:
        """Candidate keys after access a (just observed) and their FEATURES."""
        x = a.key
        info = self.keys.get(x)
        cl = self.clients.get(a.client)
        if info is None or cl is None:
            return [], []
        g = self.gpos
        t1s: dict[str, float] = {}
        tns: dict[str, float] = {}
        t2s: dict[str, float] = {}
        oth: dict[str, float] = {}
        tts: dict[str, float] = {}
        tn_cnt: dict[str, float] = {}
        r = self.t1.rows.get(x)
        if r is not None and r.total > 0:
            for k, c in r.succ.items():
                t1s[k] = c / r.total
        r = self.tn.rows.get(x)
        if r is not None and r.total > 0:
            top, topc = None, 0.0
            for k, c in r.succ.items():
                tns[k] = c / r.total
                tn_cnt[k] = c
                if c > topc:
                    top, topc = k, c
            r2 = self.tn.rows.get(top) if top is not None else None
            if r2 is not None and r2.total > 0:
                f = topc / r.total / r2.total
                for k, c in r2.succ.items():
                    t2s[k] = f * c
        for ns, k2 in cl.ns_last.items():
            if ns == info.ns:
                continue
            r = self.tn.rows.get(k2)
            if r is not None and r.total > 0:
                for k, c in r.succ.items():
                    s = c / r.total
                    if s > oth.get(k, 0.0):
                        oth[k] = s
        rt = self.tt.rows.get(info.tmpl)
        if rt is not None and rt.total > 0:
            for rel, c in rt.succ.items():
                y = instantiate(rel, info.ids)
                if y is not None and y != x and y in self.keys:
                    s = c / rt.total
                    if s > tts.get(y, 0.0):
                        tts[y] = s
        cand = set(t1s)
        cand.update(tns, t2s, oth, tts)
        cand.discard(x)
        keys: list[str] = []
        rows: list[list[float]] = []
        gap = math.log1p(max(0.0, cl.gap) * 1000.0) / 10.0
        log_half = math.log1p(_POP_HALF_LIFE)
        for y in cand:
            yi = self.keys.get(y)
            if yi is None:
                continue
            if yi.last:
                age = g - yi.last
                never = 0.0
                recency = math.log1p(age) / 10.0
                fresh = 1.0 if age <= 4 else 0.0
                due = math.exp(-abs(age + 1 - yi.period) / max(1.0, 0.25 * yi.period)) if yi.period else 0.0
                pop = math.log1p(yi.pop * 0.5 ** ((g - yi.pop_at) / _POP_HALF_LIFE)) / log_half
            else:
                never, recency, fresh, due, pop = 1.0, 1.0, 0.0, 0.0, 0.0
            keys.append(y)
            rows.append(
                [
                    t1s.get(y, 0.0),
                    tns.get(y, 0.0),
                    oth.get(y, 0.0),
                    t2s.get(y, 0.0),
                    tts.get(y, 0.0),
                    math.log1p(tn_cnt.get(y, 0.0)) / 5.5,
                    never,
                    recency,
                    fresh,
                    due,
                    pop,
                    1.0 if yi.ns == info.ns else 0.0,
                    1.0 if yi.tags and yi.tags == info.tags else 0.0,
                    gap,
                ]
            )
        return keys, rows


def _fallback(f: list[float]) -> float:
    """Before the first model: the best table share, template and other-stream ones discounted."""
    return max(f[0], f[1], 0.9 * f[3], 0.8 * f[4], 0.5 * f[2])


@register
class LearnedPredictor(Predictor):
    name = "learned"

    def __init__(self, **opts: Any) -> None:
        self._o = Options(**opts)
        self._st = _State(self._o)
        self._model: LearnedModel | None = None
        self._w: list[float] | None = None
        self._b = 0.0
        self._since = 0
        self._gets = 0
        self._installed = 0
        # without scikit-learn this predictor stays on its fallback ranking (and says so in stats)
        self._can_fit = importlib.util.find_spec("sklearn") is not None

    # -- live path ------------------------------------------------------------------------------
    def observe(self, a: Access) -> None:
        self._st.observe(a)
        if a.op == "get":
            self._since += 1
            self._gets += 1

    def predict(self, a: Access, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        keys, rows = self._st.candidates(a)
        if not keys:
            return []
        w, b = self._w, self._b
        st = self._st
        scored: list[tuple[float, str]] = []
        if w is None:
            cal = min(1.0, (st.fb_hits + 1.0) / (st.fb_made + 1.0))
            for y, f in zip(keys, rows, strict=True):
                scored.append((_fallback(f) * cal, y))
        else:
            for y, f in zip(keys, rows, strict=True):
                z = b
                for wi, fi in zip(w, f, strict=True):
                    z += wi * fi
                p = 1.0 / (1.0 + math.exp(-z)) if z > -30 else 0.0
                # ties (a cycle's next keys are all ~1): the direct successor first
                scored.append((p + 1e-3 * (f[1] + f[0]), y))
        cl = st.clients.get(a.client)
        old = set(cl.suggested) if cl is not None else set()
        scored.sort(key=lambda s: (s[1] in old, -s[0]))
        out = [(y, min(1.0, s)) for s, y in scored[:k] if s >= self._o.min_confidence]
        if cl is not None:
            cl.suggested.extend(y for y, _ in out)
            if w is None:  # score the fallback: read within the horizon or not
                until = st.gpos + self._o.horizon
                for y, _ in out:
                    if y not in cl.pending:
                        st.fb_made += 1.0
                    cl.pending[y] = until
                if st.fb_made > 4096:
                    st.fb_made *= 0.5
                    st.fb_hits *= 0.5
        return out

    def stats(self) -> dict[str, Any]:
        st = self._st
        d: dict[str, Any] = {
            "name": self.name,
            "trained": self._model is not None,
            "sklearn": self._can_fit,
            "installs": self._installed,
            "gets_seen": self._gets,
            "keys": len(st.keys),
            "rows": {"t1": len(st.t1), "tn": len(st.tn), "template": len(st.tt)},
        }
        m = self._model
        if m is not None:
            d.update(
                samples=m.samples,
                positives=m.positives,
                contexts=m.contexts,
                history=m.history,
                horizon=m.horizon,
                holdout_auc=m.holdout_auc,
                holdout_top1=m.holdout_top1,
                train_s=round(m.train_s, 3),
                feature_weights=m.importance,
                coef=m.coef,
            )
        return d

    # -- training -------------------------------------------------------------------------------
    def wants_training(self) -> bool:
        need = self._o.retrain_every if self._model is not None else self._o.first_train_after
        return self._can_fit and self._since >= need

    def train(self, history: list[Access]) -> LearnedModel | None:
        return fit(history, self._o)

    def install(self, model: object) -> None:
        self._since = 0
        if model is None:
            return
        if not isinstance(model, LearnedModel) or len(model.weights) != N_FEATURES:
            raise TypeError(f"learned: install() takes a LearnedModel, got {type(model).__name__}")
        self._model = model
        self._w = list(model.weights)
        self._b = model.bias
        self._installed += 1


def build_examples(
    history: list[Access], o: Options
) -> tuple[list[list[float]], list[int], list[int], list[str]]:
    """Replay ``history`` through fresh tables; at sampled gets, the candidates' features and
    whether the client read each within the next ``horizon`` gets. Returns (X, y, context id per
    row, candidate key per row)."""
    streams: dict[int, list[str]] = {}
    for a in history:
        if a.op == "get":
            streams.setdefault(a.client, []).append(a.key)
    n_gets = sum(len(s) for s in streams.values())
    warm = min(o.first_train_after // 2, n_gets // 5)
    stride = max(1, (n_gets - warm) // o.max_contexts)
    st = _State(o)
    pos: dict[int, int] = {}
    X: list[list[float]] = []
    y: list[int] = []
    ctx: list[int] = []
    names: list[str] = []
    seen = 0
    for a in history:
        st.observe(a)
        if a.op != "get":
            continue
        p = pos.get(a.client, 0)
        pos[a.client] = p + 1
        seen += 1
        if seen <= warm or seen % stride:
            continue
        keys, rows = st.candidates(a)
        if not keys:
            continue
        future = set(streams[a.client][p + 1 : p + 1 + o.horizon])
        for key, f in zip(keys, rows, strict=True):
            X.append(f)
            y.append(1 if key in future else 0)
            ctx.append(seen)
            names.append(key)
    return X, y, ctx, names


def fit(history: list[Access], o: Options | None = None) -> LearnedModel | None:
    """Fit the ranking model on ``history``; None when there is nothing to learn from (no
    candidates, or only one class of label)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    o = o or Options()
    t0 = time.perf_counter()
    X_l, y_l, ctx_l, _ = build_examples(history, o)
    if len(y_l) < 20 or not 0 < sum(y_l) < len(y_l):
        return None
    X = np.asarray(X_l, dtype=np.float64)
    y = np.asarray(y_l, dtype=np.int64)
    ctx = np.asarray(ctx_l, dtype=np.int64)
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X)

    auc: float | None = None
    top1: float | None = None
    cut = int(np.quantile(ctx, 0.8))
    tr, te = ctx <= cut, ctx > cut
    if 0 < y[tr].sum() < tr.sum() and 0 < y[te].sum() < te.sum():
        held = LogisticRegression(C=1.0, max_iter=500).fit(Xs[tr], y[tr])
        s = held.decision_function(Xs[te])
        auc = float(roc_auc_score(y[te], s))
        ctx_te, y_te = ctx[te], y[te]
        best: dict[int, tuple[float, int]] = {}
        for c, sc, lab in zip(ctx_te.tolist(), s.tolist(), y_te.tolist(), strict=True):
            if c not in best or sc > best[c][0]:
                best[c] = (sc, lab)
        top1 = sum(lab for _, lab in best.values()) / len(best)

    lr = LogisticRegression(C=1.0, max_iter=500).fit(Xs, y)
    coef = lr.coef_[0]
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    w = coef / scale
    b = float(lr.intercept_[0] - np.sum(coef * scaler.mean_ / scale))
    mag = np.abs(coef)
    tot = float(mag.sum()) or 1.0
    order = np.argsort(-mag)
    importance = {FEATURES[i]: round(float(mag[i]) / tot, 3) for i in order}
    return LearnedModel(
        weights=[float(v) for v in w],
        bias=b,
        coef={FEATURES[i]: round(float(coef[i]), 3) for i in range(N_FEATURES)},
        importance=importance,
        samples=len(y_l),
        positives=int(y.sum()),
        contexts=len(set(ctx_l)),
        holdout_auc=None if auc is None else round(auc, 4),
        holdout_top1=None if top1 is None else round(top1, 4),
        train_s=time.perf_counter() - t0,
        history=len(history),
        horizon=o.horizon,
    )
