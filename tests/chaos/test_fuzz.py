"""Structured fuzzing of every request type against one real daemon (with a RAM and a disk tier).

For each request type in :mod:`tierd.protocol`, hypothesis builds connections that send 1-6 frames:
well-formed messages with hostile field values (huge, negative and overflowing shapes and sizes, bad
dtypes, long and odd unicode keys and tags, NaN and infinite numbers), fields of the wrong type, too
few or too many fields, payloads that are not msgpack, invalid UTF-8, unknown type bytes, empty
payloads, a length prefix over the limit and a last frame cut short. What the daemon must do:

- every frame that can be framed gets exactly one typed reply (a RELEASE that decodes gets none),
  with the request id echoed, an ``Error`` code among the typed ones (never an internal error), and
  the connection stays open and in step (a STATUS sent after them is answered);
- a frame that cannot be framed (a length over the limit, a stream that ends mid-frame) gets at
  most an error and a close;
- put ids handed out are then sealed, aborted, sealed twice or left open, and leases released or
  forged, at random, so the second step of each verb is reached with hostile state behind it.

After each type, a normal client puts and gets with correct bytes, entries put before the fuzzing
are unchanged, and the daemon counts no internal error.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tests.chaos.budget import EXAMPLES, FIGURES
from tests.chaos.conftest import start
from tests.chaos.wire import Closed, RawConn
from tierd import launch, protocol
from tierd.errors import ERRORS_BY_CODE
from tierd.protocol import HEADER
from tierd_client import Client

pytestmark = pytest.mark.chaos

#: typed error codes a request may get; "error" (a daemon bug) is not one of them
TYPED_CODES = set(ERRORS_BY_CODE) - {"error"}
KEEP = {f"keep/{i}": torch.randn(1000 + i, generator=torch.Generator().manual_seed(i)) for i in range(4)}
#: keys the fuzzer reuses (put at the start, and by the fuzzer), so requests meet real entries
POOL = ["fz/a", "fz/b", "fz/c/d"]
SEED = int(os.environ.get("TIERD_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def fuzzed(chaos_tmp: Path) -> Iterator[launch.Daemon]:
    d = start(chaos_tmp, ram_bytes="64MiB", disk_bytes="256MiB")
    with Client(d.socket) as c:
        for k, t in KEEP.items():
            c.put(k, t, durable=k.endswith("1"))
        for i, k in enumerate(POOL):
            c.put(k, torch.ones(100 * (i + 1)), durable=i % 2 == 0, tags=["fz"])
    yield d
    running = d.proc.poll() is None
    rc = d.stop()
    assert running and rc == 0, f"tierd exited with {rc}; its log:\n{d.log()}"


# ---- field values ------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]
ints = st.one_of(st.integers(-3, 400), st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([-1.0, 0.0, 1e300]))
long_text = st.tuples(st.sampled_from("kx/é\u202e\U0001f600"), st.integers(1, 300_000)).map(
    lambda p: p[0] * p[1]
)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "/", "a/", "/b", "a/b\x00c", "a//b", "..", "ns/\ufeff", "ns/\u202eevil"]),
    long_text,
)
keys = st.one_of(st.sampled_from(POOL), texts, long_text.map(lambda s: "ns/" + s))
dtypes = st.one_of(
    st.sampled_from(sorted(protocol.DTYPE_SIZES)), st.sampled_from(["", "float", "torch.float32"]), texts
)
shapes = st.one_of(
    st.lists(st.integers(0, 64), max_size=4),
    st.lists(ints, max_size=8),
    st.integers(0, 100_000).map(lambda n: [1] * n),
)
tag_lists = st.one_of(st.lists(texts, max_size=8), st.integers(0, 50_000).map(lambda n: ["t"] * n))
msgpack_any = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=20), st.binary(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)
#: a msgpack str whose bytes are not UTF-8, and a msgpack extension value: both valid msgpack
INVALID_UTF8 = msgspec.Raw(b"\xa4\xff\xfe\xc0\x80")
EXT = msgspec.Raw(b"\xd4\x05\x01")


def field_values(cls: type[protocol.Msg]) -> st.SearchStrategy[list[Any]]:
    """Every field of ``cls`` with a plausible-but-hostile value (types right, values anything)."""
    by_name: dict[str, st.SearchStrategy[Any]] = {
        "rid": st.one_of(st.integers(0, 10**6), ints),
        "key": keys,
        "prefix": st.one_of(st.sampled_from(["", "fz/", "keep/"]), texts),
        "after": st.one_of(st.just(""), keys),
        "dtype": dtypes,
        "shape": shapes,
        "nbytes": ints,
        "tags": tag_lists,
        "durable": st.booleans(),
        "share": st.booleans(),
        "share_first": st.booleans(),
        "remote": st.booleans(),
        "arenas_only": st.booleans(),
        "codec": st.one_of(
            st.none(), st.sampled_from(["auto", "raw", "zstd", "int8", "bf16", "fp16"]), texts
        ),
        "ttl": st.one_of(st.none(), floats),
        "scope": st.one_of(st.sampled_from(protocol.SCOPES), texts),
        "put_id": ints,
        "refs": st.lists(st.tuples(keys, ints), max_size=6)
        | st.integers(0, 20_000).map(lambda n: [("fz/a", 0)] * n),
        "leases": st.lists(ints, max_size=6) | st.integers(0, 100_000).map(lambda n: list(range(n))),
        "tier": st.one_of(st.sampled_from(["ram", "disk", "gpu", "remote"]), texts),
        "limit": ints,
        "since": st.one_of(floats, ints),
        "keys": st.lists(keys, max_size=6) | st.integers(0, 50_000).map(lambda n: ["fz/a"] * n),
        "version": ints,
        "pid": ints,
        "name": texts,
    }
    names = [f.name for f in msgspec.structs.fields(cls)]
    return st.tuples(*(by_name[n] for n in names)).map(list)


@st.composite
def consistent_put(draw: st.DrawFn) -> list[Any]:
    """A PUT whose size matches its shape and dtype, so it reaches the allocator and the seal."""
    dtype = draw(st.sampled_from(sorted(protocol.DTYPE_SIZES)))
    shape = draw(st.lists(st.integers(0, 300), min_size=0, max_size=3))
    n = protocol.DTYPE_SIZES[dtype]
    for s in shape:
        n *= s
    return [
        draw(st.integers(0, 10**6)), draw(keys), dtype, shape, n, draw(tag_lists), draw(st.booleans()),
        draw(st.sampled_from([None, "auto", "raw", "zstd", "int8", "bf16", "fp16"])),
        draw(st.one_of(st.none(), floats)), draw(st.sampled_from(protocol.SCOPES)),
    ]  # fmt: skip


@st.composite
def payload(draw: st.DrawFn, cls: type[protocol.Msg]) -> bytes:
    """One request payload for ``cls``: well-formed with hostile values, or broken in one way."""
    how = draw(
        st.sampled_from(["values", "values", "values", "wrong_type", "arity", "shape", "bytes", "cut"])
    )
    if how == "bytes":
        return draw(st.binary(max_size=300))
    fields = draw(consistent_put() if cls is protocol.Put and draw(st.booleans()) else field_values(cls))
    if how == "wrong_type" and fields:
        i = draw(st.integers(0, len(fields) - 1))
        fields[i] = draw(st.one_of(msgpack_any, st.sampled_from([INVALID_UTF8, EXT])))
    elif how == "arity":
        fields = fields[: draw(st.integers(0, len(fields)))] + draw(st.lists(msgpack_any, max_size=3))
    elif how == "shape":  # not an array at all
        return msgspec.msgpack.encode(
            draw(st.one_of(msgpack_any, st.dictionaries(st.text(), ints, max_size=3)))
        )
    data = msgspec.msgpack.encode(fields)
    if how == "cut":
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return data


def frames_for(mtype: int) -> st.SearchStrategy[list[tuple[int, bytes]]]:
    """1-6 frames: mostly of ``mtype``, some of any type byte (known or not)."""
    cls = protocol.REQUEST_TYPES[mtype]
    one = st.one_of(
        st.tuples(st.just(mtype), payload(cls)),
        st.tuples(st.just(mtype), st.just(b"")),
        st.tuples(st.integers(0, 255), st.binary(max_size=50)),
    )
    return st.lists(one, min_size=1, max_size=6)


# ---- what the daemon must answer ---------------------------------------------------------------


def expected(mtype: int, body: bytes) -> tuple[int, int | None]:
    """(replies the frame must get, the rid they echo or None when it is a guess)."""
    decoder = protocol.REQUEST_DECODERS.get(mtype)
    if decoder is None:
        return 1, None
    try:
        msg = decoder.decode(body)
    except msgspec.DecodeError:
        return 1, None
    if isinstance(msg, protocol.Release):
        return 0, None
    return 1, getattr(msg, "rid", 0)


def check_reply(r: protocol.Msg, rid: int | None) -> None:
    assert type(r) in (protocol.Ok, protocol.PutReady, protocol.Got, protocol.Error), r
    if isinstance(r, protocol.Error):
        assert r.code in TYPED_CODES, f"an untyped error: {r}"
    if rid is not None:
        assert r.rid == rid, (r, rid)


def exchange(c: RawConn, frames: list[tuple[int, bytes]], ending: str) -> list[protocol.Msg]:
    """Send ``frames`` (then a cut-short or oversize frame, per ``ending``); check every reply.
    Returns the replies, the connection still open when ``ending`` is "none"."""
    want: list[int | None] = []
    for mtype, body in frames:
        n, rid = expected(mtype, body)
        want += [rid] * n
    wire = b"".join(HEADER.pack(len(body), mtype) + body for mtype, body in frames)
    c.send(wire, len(frames))
    FIGURES["fuzz frames sent"] += len(frames)
    got: list[protocol.Msg] = []
    for _ in want:
        try:
            got.append(c.reply())
        except Closed:
            raise AssertionError(f"the daemon closed after {len(got)} of {len(want)} replies") from None
    for r in got:
        check_reply(r, None)
    # replies of requests that waited (on the disk) may come after later ones: rids as a multiset
    missing = Counter(rid for rid in want if rid is not None) - Counter(r.rid for r in got)
    assert not missing, f"request ids not echoed: {missing}; replies: {got}"
    FIGURES["fuzz replies checked"] += len(got)
    FIGURES["fuzz typed errors"] += sum(isinstance(r, protocol.Error) for r in got)
    if ending == "none":
        return got
    if ending == "oversize":  # a length over the limit: one error, then the close
        c.send(HEADER.pack(protocol.MAX_REQUEST_BYTES + 1, protocol.STATUS))
    else:  # a frame cut short, then the stream ends: the close alone
        c.send(HEADER.pack(1000, protocol.STATUS) + b"\x91")
        c.sock.shutdown(socket.SHUT_WR)
    FIGURES["fuzz frames sent"] += 1
    tail = c.closes()
    assert all(isinstance(r, protocol.Error) and r.code == "protocol" for r in tail), tail
    assert len(tail) == (ending == "oversize"), tail
    FIGURES["fuzz connections closed by the daemon"] += 1
    return got


def follow_up(c: RawConn, replies: list[protocol.Msg], data: st.DataObject) -> None:
    """The second step of each verb, with the ids the daemon handed out (or forged ones)."""
    rid = 10**7
    frames: list[protocol.Msg] = []
    for r in replies:
        if isinstance(r, protocol.PutReady):
            act = data.draw(st.sampled_from(["seal", "abort", "leave", "seal twice", "abort then seal"]))
            if act != "leave":
                first = protocol.Abort if act.startswith("abort") else protocol.Seal
                frames.append(first(rid := rid + 1, r.put_id))
            if act in ("seal twice", "abort then seal"):
                frames.append(protocol.Seal(rid := rid + 1, r.put_id))
        elif isinstance(r, protocol.Got):
            leases = [it.lease for it in r.items]
            act = data.draw(st.sampled_from(["release", "release twice", "forge", "leave"]))
            if act == "forge":
                leases = [lid + 1_000_000 for lid in leases] + [-1]
            if act != "leave":
                frames += [protocol.Release(leases)] * (2 if act == "release twice" else 1)
    if frames:
        exchange(c, [(protocol.TYPE_OF[type(m)], protocol.encode(m)[5:]) for m in frames], "none")


def in_step(c: RawConn) -> None:
    """A STATUS after everything else is answered: the connection is alive and in step."""
    c.send(protocol.encode(protocol.Status(424242)))
    r = c.reply()
    assert isinstance(r, protocol.Ok) and r.rid == 424242, r
    assert r.value["counters"]["internal_errors"] == 0, "the daemon logged an internal error"


def still_serving(d: launch.Daemon) -> None:
    assert d.proc.poll() is None, f"tierd died; its log:\n{d.log()}"
    x = torch.randn(4096)
    with Client(d.socket) as c:
        c.put("ok/x", x)
        assert torch.equal(c.get("ok/x"), x)
        for k, t in KEEP.items():
            assert torch.equal(c.get(k), t), f"{k} changed"
        assert c.stats()["counters"]["internal_errors"] == 0
        c.delete("ok/x")
    FIGURES["fuzz well-behaved round trips after a type"] += 1


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
REQUESTS = sorted(t for t in protocol.REQUEST_TYPES if t != protocol.HELLO)


@pytest.mark.parametrize("mtype", REQUESTS, ids=[protocol.REQUEST_TYPES[t].__name__ for t in REQUESTS])
def test_every_request_type_gets_a_typed_answer(fuzzed: launch.Daemon, mtype: int) -> None:
    @FUZZ_SETTINGS
    @hypothesis_seed(SEED + mtype)
    @given(
        frames=frames_for(mtype), ending=st.sampled_from(["none"] * 6 + ["cut", "oversize"]), data=st.data()
    )
    def run(frames: list[tuple[int, bytes]], ending: str, data: st.DataObject) -> None:
        with RawConn(fuzzed.socket) as c:
            c.hello("fuzz")
            FIGURES["fuzz connections"] += 1
            replies = exchange(c, frames, ending)
            if ending == "none":
                follow_up(c, replies, data)
                in_step(c)

    run()
    still_serving(fuzzed)


def test_hello_gets_welcome_or_a_typed_refusal(fuzzed: launch.Daemon) -> None:
    @FUZZ_SETTINGS
    @hypothesis_seed(SEED)
    @given(body=payload(protocol.Hello), then_valid=st.booleans())
    def run(body: bytes, then_valid: bool) -> None:
        with RawConn(fuzzed.socket) as c:
            FIGURES["fuzz connections"] += 1
            c.send(HEADER.pack(len(body), protocol.HELLO) + body)
            FIGURES["fuzz frames sent"] += 1
            try:
                msg = protocol.REQUEST_DECODERS[protocol.HELLO].decode(body)
            except msgspec.DecodeError:
                msg = None
            if isinstance(msg, protocol.Hello) and msg.version == protocol.PROTOCOL_VERSION:
                assert isinstance(c.reply(), protocol.Welcome)  # any pid, any name
                if msg.arenas_only:  # the arenas' fds only: answered, then closed
                    assert c.closes() == []
                    FIGURES["fuzz connections closed by the daemon"] += 1
                else:
                    in_step(c)
                return
            r = c.reply()
            assert isinstance(r, protocol.Error) and r.code in TYPED_CODES, r
            if msg is not None:  # another protocol version: refused, then closed
                assert r.code == "version", r
                assert c.closes() == []
                FIGURES["fuzz connections closed by the daemon"] += 1
                return
            assert r.code == "invalid", r  # not a HELLO: the connection waits for one
            if then_valid:
                c.hello()
                in_step(c)
            else:  # a request before any HELLO closes the connection
                c.send(protocol.encode(protocol.Status(1)))
                assert all(isinstance(x, protocol.Error) for x in c.closes())
                FIGURES["fuzz connections closed by the daemon"] += 1

    run()
    still_serving(fuzzed)


def test_random_byte_streams_are_answered_or_cut_off(fuzzed: launch.Daemon) -> None:
    """Bytes with no framing at all, after a HELLO: typed errors for what parses as frames, then a
    close or an open connection; the daemon serves on either way."""

    @FUZZ_SETTINGS
    @hypothesis_seed(SEED + 1)
    @given(noise=st.binary(min_size=1, max_size=4096))
    def run(noise: bytes) -> None:
        with RawConn(fuzzed.socket) as c:
            c.hello("noise")
            FIGURES["fuzz connections"] += 1
            c.send(noise)
            FIGURES["fuzz random byte streams"] += 1
            c.sock.shutdown(socket.SHUT_WR)  #: nothing more comes, so every framed part is answered
            for r in c.closes():
                check_reply(r, None)

    run()
    still_serving(fuzzed)
