"""Name templates: the relation between two keys that differ only in their numbers and ids.

``layers/7/mlp`` -> ``layers/8/mlp`` and ``tile0`` -> ``tile1`` share a template with a relation
between their variable parts (the same id, the next number, ...); the learned predictor counts such
relations and makes candidate keys from them (``instantiate``).
"""

from __future__ import annotations

import re

# The variable parts of a key: hex ids (8+ hex digits with a letter and a digit, standing alone:
# content hashes) and runs of decimal digits (layer numbers, tile numbers, padded image ids).
IDS = re.compile(
    r"(?<![0-9A-Za-z])(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{8,}(?![0-9A-Za-z])|[0-9]+"
)
HOLE = "\x01"


def parse_key(key: str) -> tuple[str, tuple[str, ...]]:
    """("vis/img\x01/tile\x01", ("00042", "3")) for "vis/img00042/tile3";
    ("vis/\x01/tile\x01", ("9f86d081884c", "0")) for "vis/9f86d081884c/tile0"."""
    ids = tuple(IDS.findall(key))
    return (IDS.sub(HOLE, key) if ids else key), ids


def relation(x_ids: tuple[str, ...], y_tmpl: str, y_ids: tuple[str, ...]) -> str:
    """How y's ids follow from x's: per id of y, "d<delta>" from x's id at the same place (|delta|
    <= 2 for numbers, 0 = the same hash) or "=<literal>"."""
    parts = []
    for j, v in enumerate(y_ids):
        if j < len(x_ids):
            xv = x_ids[j]
            if v.isdigit() and xv.isdigit():
                d = int(v) - int(xv)
                if -2 <= d <= 2:
                    parts.append(f"d{d}")
                    continue
            elif v == xv:
                parts.append("d0")
                continue
        parts.append("=" + v)
    return y_tmpl + "\x00" + ",".join(parts)


def instantiate(rel: str, x_ids: tuple[str, ...]) -> str | None:
    tmpl, _, spec = rel.partition("\x00")
    if not spec:
        return tmpl
    vals: list[str] = []
    for j, s in enumerate(spec.split(",")):
        if s[0] == "=":
            vals.append(s[1:])
            continue
        if j >= len(x_ids):
            return None
        xs = x_ids[j]
        if not xs.isdigit():
            if s != "d0":
                return None
            vals.append(xs)
            continue
        v = int(xs) + int(s[1:])
        if v < 0:
            return None
        vals.append(str(v).zfill(len(xs)) if len(xs) > 1 and xs[0] == "0" else str(v))
    pieces = tmpl.split(HOLE)
    if len(pieces) != len(vals) + 1:
        return None
    out = [pieces[0]]
    for val, piece in zip(vals, pieces[1:], strict=True):
        out.append(val)
        out.append(piece)
    return "".join(out)
