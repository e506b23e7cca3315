"""The framing on its own (sans-IO, so no socket): every way a byte stream can be cut, the limit,
what the reader copies, and the bytes on the wire."""

from __future__ import annotations

import random

import msgspec
import pytest

from tierd import protocol
from tierd.errors import ProtocolError
from tierd.protocol import HEADER, FrameReader

MSGS: list[protocol.Msg] = [
    protocol.Status(1),
    protocol.Ok(2, {"tiers": [{"name": "ram", "used_bytes": 5}]}),
    protocol.Release([3, 4, 5]),
    protocol.Got(6, [protocol.Located("ns/w", 1, "float32", [2, 3], 4096, 24, 7, 0)]),
    protocol.Error(0, "protocol", "bye"),
    protocol.Ok(8, "x" * 70_000),  # longer than one recv
]
STREAM = b"".join(protocol.encode(m) for m in MSGS)


def drain(r: FrameReader) -> list[tuple[int, bytes | memoryview]]:
    out = []
    while (f := r.next_frame()) is not None:
        out.append(f)
    return out


def decoded(frames: list[tuple[int, bytes | memoryview]]) -> list[protocol.Msg]:
    return [protocol.decode_reply(t, p) if t in protocol.REPLY_TYPES else _req(t, p) for t, p in frames]


def _req(mtype: int, payload: bytes | memoryview) -> protocol.Msg:
    return protocol.REQUEST_DECODERS[mtype].decode(payload)


def test_the_wire_format_is_unchanged() -> None:
    # length (u32 little-endian, payload only), then the type byte, then msgspec msgpack (array-like)
    assert protocol.encode(protocol.Status(9)) == b"\x02\x00\x00\x00\x42\x91\x09"
    assert protocol.encode(protocol.Release([1, 2])) == b"\x04\x00\x00\x00\x21\x91\x92\x01\x02"


@pytest.mark.parametrize("cut", range(0, 60))
def test_every_split_point_gives_the_same_frames(cut: int) -> None:
    r = FrameReader(protocol.MAX_REPLY_BYTES)
    frames = []
    for part in (STREAM[:cut], STREAM[cut:]):
        r.feed(part)
        frames += drain(r)
    assert decoded(frames) == MSGS and r.buffered == 0 and r.state == "HEADER"


def test_random_chunks_and_byte_by_byte(seed: int) -> None:
    rng = random.Random(seed)
    for sizes in ([1], [rng.randrange(1, 9000) for _ in range(50)]):
        r = FrameReader(protocol.MAX_REPLY_BYTES)
        frames, pos, i = [], 0, 0
        while pos < len(STREAM):
            n = sizes[i % len(sizes)]
            r.feed(STREAM[pos : pos + n])
            frames += drain(r)
            pos, i = pos + n, i + 1
        assert decoded(frames) == MSGS and r.buffered == 0


def test_states_and_partial_frames() -> None:
    r = FrameReader(100)
    frame = protocol.encode(protocol.Status(7))
    assert r.state == "HEADER" and r.next_frame() is None
    r.feed(frame[:3])
    assert (r.state, r.buffered, r.next_frame()) == ("HEADER", 3, None)
    r.feed(frame[3:6])
    assert (r.state, r.buffered, r.next_frame()) == ("PAYLOAD", 6, None)
    r.feed(frame[6:])
    mtype, payload = r.next_frame()
    assert mtype == protocol.STATUS and _req(mtype, payload) == protocol.Status(7)
    assert (r.state, r.buffered) == ("HEADER", 0)
    r.feed(b"")  # nothing read: nothing changes
    assert r.next_frame() is None


def test_a_length_over_the_limit_breaks_the_reader() -> None:
    r = FrameReader(16)
    r.feed(HEADER.pack(16, protocol.OK) + bytes(16))  # exactly the limit is fine
    assert r.next_frame() == (protocol.OK, bytes(16))
    r.feed(HEADER.pack(17, protocol.OK))  # the header alone is enough to refuse it
    with pytest.raises(ProtocolError, match="frame of 17 bytes exceeds the 16-byte limit"):
        r.next_frame()
    assert r.broken and r.state == "BROKEN"
    with pytest.raises(ProtocolError, match="broken"):
        r.feed(b"more")
    r = FrameReader(protocol.MAX_REQUEST_BYTES)
    r.feed(b"\xff\xff\xff\xff\x10")  # a 4 GiB length prefix
    with pytest.raises(ProtocolError):
        r.next_frame()


def test_payloads_are_not_copied_more_than_once() -> None:
    a, b = protocol.encode(protocol.Ok(1, "a" * 100)), protocol.encode(protocol.Ok(2, "b" * 100))
    # whole frames in one chunk: views of that chunk, no copy at all
    chunk = a + b
    r = FrameReader(1000)
    r.feed(chunk)
    (_, p1), (_, p2) = drain(r)
    assert isinstance(p1, memoryview) and p1.obj is chunk and isinstance(p2, memoryview) and p2.obj is chunk
    # a frame split across chunks and ending the buffer: assembled once, the buffer handed over
    r.feed(b[:50])
    r.feed(b[50:])
    ((_, p3),) = drain(r)
    assert isinstance(p3, memoryview) and bytes(p3) == b[5:] and r.buffered == 0
    # a split frame with more behind it: copied out of the buffer, which then takes more bytes;
    # the payload handed out earlier does not change
    r.feed(a[:50])
    r.feed(a[50:] + b[:10])
    ((_, p4),) = drain(r)
    r.feed(b[10:])
    ((_, p5),) = drain(r)
    assert isinstance(p4, bytes) and p4 == a[5:] and bytes(p5) == b[5:] and bytes(p3) == b[5:]


def test_a_payload_that_is_not_msgpack_is_a_decode_error_not_a_framing_one() -> None:
    r = FrameReader(100)
    r.feed(HEADER.pack(1, protocol.OK) + b"\xc1")
    mtype, payload = r.next_frame()
    with pytest.raises(msgspec.DecodeError):
        protocol.decode_reply(mtype, payload)
    with pytest.raises(msgspec.DecodeError, match="unknown reply type 0x7e"):
        protocol.decode_reply(0x7E, b"\x90")
