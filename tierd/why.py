"""``tierctl why KEY``: where an entry is, and why there, in one answer built from the daemon's own state.

Nothing here decides anything: it reads what the deciders keep, so the answer is what they will do.

- where: each tier holding a copy, fastest first, with its location (a memory tier: the region's
  offset; a chunk store: the record's codec, stored size and chunks);
- held by: leases per client (who: name, pid, uid), the daemon's pins, older versions of the key
  still leased by readers, moves in flight;
- eviction: per memory tier, its rank in that tier's eviction order (1 = coldest, demoted first,
  from :mod:`tierd.policy`), whether the balancer may take it and why not (:meth:`Placement.kept_because`),
  and the tier's use against its watermarks;
- prediction: whether a prefetch of it is queued, whether it was loaded on a prediction and not read,
  and the latest prediction that named it (:meth:`Prefetcher.expectation`);
- codec: the encoding of its stored copy and the policy's reason, recorded when it was written
  (:mod:`tierd.codecs.policy`); with no stored copy yet, what decides it when one is written.

The scans are linear in the entries of a tier and in the leases: cheap next to a human typing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tierd.tiers.store import RecordMeta

if TYPE_CHECKING:
    from tierd.entry import Entry
    from tierd.manager import Manager
    from tierd.placement import Placement
    from tierd.prefetch import Prefetcher


def explain(m: Manager, placement: Placement, prefetcher: Prefetcher, key: str) -> dict[str, Any]:
    """The answer for the current version of ``key`` (NotFound when there is none)."""
    e = m.resolve(key)
    return {
        "key": e.key,
        "version": e.version,
        "dtype": e.dtype,
        "shape": list(e.shape),
        "nbytes": e.nbytes,
        "tags": list(e.tags),
        "durable": e.durable,
        "scope": e.scope,
        "ttl": e.ttl,
        "created": e.created,
        "last_access": e.last_access,
        "idle_seconds": round(max(0.0, m.mono() - e.last_access_mono), 3),
        "where": [_location(name, loc) for name, loc in e.where.items()],
        "leases": _leases(m, e),
        "pinned": sorted(e.pins),
        "moving": e.protect > 0,
        "older_versions": _older(m, e),
        "eviction": _eviction(m, placement, e),
        "prediction": prefetcher.expectation(e),
        "codec": _codec(placement, e),
    }


def _location(tier: str, loc: Any) -> dict[str, Any]:
    if isinstance(loc, RecordMeta):
        return {"tier": tier, "record": {"codec": loc.codec, "stored_bytes": loc.stored_bytes,
                                         "chunks": len(loc.chunks)}}  # fmt: skip
    return {"tier": tier, "offset": int(loc)}


def _leases(m: Manager, e: Entry) -> list[dict[str, Any]]:
    per_client: dict[int, int] = {}
    for cid, held in m.leases.values():
        if held is e:
            per_client[cid] = per_client.get(cid, 0) + 1
    out = []
    for cid, n in sorted(per_client.items()):
        c = m.clients.get(cid)
        who = {"name": c.name, "pid": c.pid, "uid": c.uid} if c is not None else {}
        out.append({"client": cid, "leases": n, **who})
    return out


def _older(m: Manager, e: Entry) -> list[dict[str, Any]]:
    """Versions of the same key replaced or deleted but still held (by a reader's lease, or a move)."""
    return [
        {"version": v.version, "leases": v.leases, "tiers": v.tiers}
        for v in m.versions.values()
        if v.key == e.key and v is not e
    ]


def _eviction(m: Manager, placement: Placement, e: Entry) -> list[dict[str, Any]]:
    out = []
    for name, tier in m.memory.items():
        if name not in e.where:
            continue
        order = list(m.policies[name].candidates())
        rank = next((i + 1 for i, x in enumerate(order) if x is e), None)
        victim = placement.victim(take_prefetched=False, tier=name)
        out.append({
            "tier": name,
            "policy": m.policies[name].name,
            "rank": rank,  # 1 = the coldest
            "of": len(order),
            "kept_because": placement.kept_because(e, name),
            "next_victim": victim is e,
            "used_bytes": tier.used_bytes,
            "ceiling_bytes": tier.ceiling,
            "high_watermark_bytes": int(tier.ceiling * placement.high),
            "low_watermark_bytes": int(tier.ceiling * placement.low),
        })  # fmt: skip
    return out


def _codec(placement: Placement, e: Entry) -> dict[str, Any]:
    rec = e.record
    if rec is not None:
        reason = rec.codec_reason or "chosen when it was written (a record from before reasons were kept)"
        ratio = e.nbytes / rec.stored_bytes if rec.stored_bytes else None
        return {"codec": rec.codec, "stored": True, "reason": reason, "stored_bytes": rec.stored_bytes,
                "ratio": round(ratio, 4) if ratio else None,
                "error_bound": rec.plan.get("error_bound")}  # fmt: skip
    if not placement.stores:
        return {"codec": "raw", "stored": False, "reason": "no chunk store: it lives in memory only"}
    if e.codec not in (None, "auto"):
        return {"codec": e.codec, "stored": False, "reason": "requested by the put (used when it is stored)"}
    rules = placement.tag_codecs
    for tag in e.tags:
        if tag in rules:
            why = f"tag {tag!r} -> {rules[tag]} (when it is stored, if the codec suits it)"
            return {"codec": rules[tag], "stored": False, "reason": why}
    why = "not stored yet: chosen by measured cost (calibration + a sample) when it is written"
    return {"codec": None, "stored": False, "reason": why}
