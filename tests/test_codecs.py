"""Codecs: bit-exact lossless round trips for every dtype, lossy ones within their stated bounds,
chunks that decode alone and in any order, persisted plans, and clear errors for bad input."""

from __future__ import annotations

import math
import random
from concurrent.futures import ThreadPoolExecutor

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd.codecs import (
    CODEC_NAMES,
    CODECS,
    Plan,
    decode,
    decode_all,
    encode,
    encode_all,
    get_codec,
)
from tierd.codecs._bits import bf16_to_f32, f32_to_bf16
from tierd.codecs.int8 import GROUP_1D
from tierd.protocol import DTYPE_SIZES

LOSSLESS = [c.name for c in CODECS if c.lossless]
LOSSY = [c.name for c in CODECS if not c.lossless]
FLOATS = ["float32", "float16", "bfloat16"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3)


def roundtrip(
    name: str, raw: bytes | memoryview, dtype: str, shape: list[int], chunk_bytes: int
) -> tuple[Plan, bytes]:
    """Encode, persist the plan through msgpack, decode the chunks in a random order into a fresh buffer."""
    plan, chunks = encode(name, raw, dtype, shape, chunk_bytes)
    stored = [bytes(c) for c in chunks]
    plan2 = Plan.from_dict(msgspec.msgpack.decode(msgspec.msgpack.encode(plan.to_dict())))
    assert plan2 == plan
    out = bytearray(b"\xa5" * plan.nbytes)
    order = list(range(plan.n_chunks))
    random.Random(len(order)).shuffle(order)
    codec = get_codec(name)
    for i in order:
        codec.decode_chunk(plan2, i, stored[i], out)
    return plan, bytes(out)


def as_f32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.frombuffer(raw, np.float32).astype(np.float64)
    if dtype == "float16":
        return np.frombuffer(raw, np.float16).astype(np.float64)
    return bf16_to_f32(np.frombuffer(raw, np.uint16)).astype(np.float64)


def float_bytes(x: np.ndarray, dtype: str) -> bytes:
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return x.tobytes()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).tobytes()
    return f32_to_bf16(x.ravel()).tobytes()


# ---- lossless: every dtype, every shape, bit-exact ------------------------------------------------
@SETTINGS
@given(
    name=st.sampled_from(LOSSLESS),
    dtype=st.sampled_from(sorted(DTYPE_SIZES)),
    shape=shapes,
    chunk_bytes=st.integers(1, 200),
    data=st.data(),
)
def test_lossless_roundtrip_is_bit_exact(
    name: str, dtype: str, shape: list[int], chunk_bytes: int, data: st.DataObject
) -> None:
    n = math.prod(shape) * DTYPE_SIZES[dtype]
    raw = data.draw(st.binary(min_size=n, max_size=n))
    plan, out = roundtrip(name, memoryview(raw), dtype, shape, chunk_bytes)
    assert out == raw
    assert plan.error_bound is None
    assert plan.n_chunks == (-(-n // plan.raw_chunk_bytes) if n else 0)
    assert plan.raw_chunk_bytes % DTYPE_SIZES[dtype] == 0


@SETTINGS
@given(
    name=st.sampled_from(LOSSLESS),
    dtype=st.sampled_from(sorted(DTYPE_SIZES)),
    n_items=st.integers(1, 40_000),
    n_chunks=st.sampled_from([1, 3, 5, 7]),
    kind=st.sampled_from(["random", "zeros", "gauss", "ramp"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossless_roundtrip_larger(
    name: str, dtype: str, n_items: int, n_chunks: int, kind: str, seed: int
) -> None:
    """Sizes where zstd really compresses (and shuffles), with odd chunk counts."""
    size = DTYPE_SIZES[dtype]
    rng = np.random.default_rng(seed)
    if kind == "random":
        raw = rng.bytes(n_items * size)
    elif kind == "zeros":
        raw = bytes(n_items * size)
    elif kind == "gauss":
        g = (rng.standard_normal(n_items * size // 2 + 1) * 0.02).astype(np.float16)
        raw = g.tobytes()[: n_items * size]
    else:
        raw = (np.arange(n_items * size, dtype=np.uint32) // 7).astype(np.uint8).tobytes()
    chunk = -(-n_items // n_chunks) * size
    plan, out = roundtrip(name, raw, dtype, [n_items], chunk)
    assert out == raw
    assert plan.n_chunks == -(-n_items // (chunk // size))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_zero_size_tensors_have_no_chunks(name: str) -> None:
    codec = get_codec(name)
    for shape in ([0], [3, 0], [0, 5], [2, 0, 4]):
        if not codec.applies("float32", shape):
            continue
        plan, chunks = encode(name, b"", "float32", shape, 1024)
        assert plan.nbytes == 0 and plan.n_chunks == 0 and chunks == []
        decode(plan, [], bytearray())
        with pytest.raises(ValueError, match="out of range"):
            plan.span(0)


@pytest.mark.parametrize("name", [*LOSSLESS, "bf16", "fp16"])
def test_zero_dim_tensor(name: str) -> None:
    raw = np.float32(-3.25).tobytes()
    plan, out = roundtrip(name, raw, "float32", [], 4)
    assert plan.shape == [] and plan.n_chunks == 1
    assert out == raw  # -3.25 is exact in bf16 and fp16


def test_int8_refuses_zero_dim() -> None:
    with pytest.raises(ValueError, match="at least one dimension"):
        get_codec("int8").prepare(np.float32(1).tobytes(), "float32", [], 64)


# ---- chunk independence ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_chunks_decode_alone_and_write_only_their_span(name: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((13, 37)).astype(np.float32)
    raw = x.tobytes()
    codec = get_codec(name)
    plan = codec.prepare(raw, "float32", [13, 37], 300)
    assert plan.n_chunks > 3
    chunks = [bytes(codec.encode_chunk(plan, i, raw)) for i in range(plan.n_chunks)]
    full = bytearray(plan.nbytes)
    decode_all(codec, plan, chunks, full)
    for i in reversed(range(plan.n_chunks)):
        out = bytearray(b"\x5a" * plan.nbytes)
        codec.decode_chunk(plan, i, chunks[i], out)
        s, e = plan.span(i)
        assert out[:s] == b"\x5a" * s and out[e:] == b"\x5a" * (plan.nbytes - e)
        assert out[s:e] == full[s:e]
        # the chunk encodes the same from a copy of only... the same raw: deterministic
        assert bytes(codec.encode_chunk(plan, i, raw)) == chunks[i]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_thread_pool_gives_the_same_bytes(name: str) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 300)) * 0.02).astype(np.float32)
    raw = memoryview(x).cast("B")
    codec = get_codec(name)
    plan = codec.prepare(raw, "float32", [64, 300], 4096)
    serial = [bytes(c) for c in encode_all(codec, plan, raw)]
    with ThreadPoolExecutor(2) as pool:
        parallel = [bytes(c) for c in encode_all(codec, plan, raw, pool)]
        assert parallel == serial
        out1, out2 = bytearray(plan.nbytes), bytearray(plan.nbytes)
        decode_all(codec, plan, serial, out1)
        decode_all(codec, plan, parallel, out2, pool)
    assert out1 == out2


def test_raw_encode_is_a_view() -> None:
    buf = bytearray(range(64))
    _, chunks = encode("raw", memoryview(buf), "uint8", [64], 16)
    assert isinstance(chunks[1], memoryview)
    buf[16] = 200
    assert chunks[1][0] == 200  # no copy was made


# ---- lossy codecs ----------------------------------------------------------------------------------
def float_arrays(min_dims: int = 1) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays of mixed scales: normal data, tiny rows, huge rows, zero rows, subnormals."""

    @st.composite
    def build(draw: st.DrawFn) -> np.ndarray:
        shape = draw(st.lists(st.integers(1, 7), min_size=min_dims, max_size=3))
        n = math.prod(shape)
        kind = draw(st.sampled_from(["hyp", "gauss", "scaled"]))
        if kind == "hyp":
            vals = draw(
                st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=n, max_size=n)
            )
            return np.array(vals, np.float32).reshape(shape)
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal(n).astype(np.float32)
        if kind == "scaled":
            x *= np.float32(10.0 ** draw(st.integers(-40, 38)))
        return x.reshape(shape)

    return build()


def groups(x: np.ndarray, g: int) -> list[np.ndarray]:
    flat = x.ravel()
    return [flat[i : i + g] for i in range(0, flat.size, g)]


@SETTINGS
@given(x=float_arrays(), dtype=st.sampled_from(FLOATS), chunk_bytes=st.integers(1, 120))
def test_int8_within_stated_bound_and_restores_dtype(x: np.ndarray, dtype: str, chunk_bytes: int) -> None:
    raw = float_bytes(x, dtype)
    ref = as_f32(raw, dtype)  # the values as the input dtype holds them
    if not np.isfinite(ref).all():
        return  # float16 overflow of huge draws: int8 refuses those (tested below)
    shape = list(x.shape)
    plan, out = roundtrip("int8", raw, dtype, shape, chunk_bytes)
    assert plan.dtype == dtype and plan.shape == shape and len(out) == len(raw)  # original dtype
    bound, floor = plan.error_bound, plan.params["abs_floor"]
    assert bound is not None
    g = plan.params["group"]
    assert g == (math.prod(shape[1:]) if len(shape) >= 2 else GROUP_1D)
    got = as_f32(out, dtype)
    for xr, yr in zip(groups(ref, g), groups(got, g), strict=True):
        amax = np.abs(xr).max()
        assert np.all(np.abs(xr - yr) <= bound * amax + floor), (xr, yr, amax)
    # whole rows per chunk (>= 2 dims)
    if len(shape) >= 2:
        assert plan.raw_chunk_bytes % (g * DTYPE_SIZES[dtype]) == 0


def test_int8_error_bound_values() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    b = {d: get_codec("int8").prepare(float_bytes(x, d), d, [4, 8], 64).error_bound for d in FLOATS}
    assert b["float32"] == pytest.approx(0.5 / 127 + 2**-20)
    assert b["float16"] == pytest.approx(0.5 / 127 + 2**-11 + 2**-20)
    assert b["bfloat16"] == pytest.approx(0.5 / 127 + 2**-8 + 2**-20)


def test_int8_rows_scales_and_one_dim_groups() -> None:
    x = np.zeros((3, 5), np.float32)
    x[0] = [1, -2, 3, -4, 5]
    x[2] = [0.001, 0, 0, 0, -0.002]  # row 1 stays zero
    plan, out = roundtrip("int8", x.tobytes(), "float32", [3, 5], 20)
    scales = np.frombuffer(plan.params["scales"], np.float32)
    assert scales.tolist() == pytest.approx([5 / 127, 0, 0.002 / 127])
    y = np.frombuffer(out, np.float32).reshape(3, 5)
    assert np.all(y[1] == 0) and y[0, 4] == pytest.approx(5) and y[2, 4] == pytest.approx(-0.002)
    # 1-D: groups of GROUP_1D values, the last one shorter
    v = np.linspace(-1, 1, GROUP_1D * 2 + 10, dtype=np.float32)
    v[-10:] *= 1e-3
    plan, out = roundtrip("int8", v.tobytes(), "float32", [v.size], GROUP_1D * 4)
    assert plan.params["group"] == GROUP_1D and len(plan.params["scales"]) == 3 * 4
    y = np.frombuffer(out, np.float32)
    assert np.abs(y[-10:] - v[-10:]).max() <= plan.error_bound * 1e-3 + 1e-12  # tail has its own scale


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_refuses_non_finite(bad: float) -> None:
    x = np.ones((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="finite"):
        get_codec("int8").prepare(x.tobytes(), "float32", [2, 3], 64)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@SETTINGS
@given(x=float_arrays(min_dims=0), chunk_bytes=st.integers(1, 64))
def test_downcast_within_stated_bound(name: str, x: np.ndarray, chunk_bytes: int) -> None:
    x = x.astype(np.float32)
    with np.errstate(over="ignore"):
        overflow = not np.isfinite(x.astype(np.float16 if name == "fp16" else np.float32)).all() or (
            name == "bf16" and not np.isfinite(bf16_to_f32(f32_to_bf16(x.ravel()))).all()
        )
    if overflow:
        with pytest.raises(ValueError, match="overflow"):
            get_codec(name).prepare(x.tobytes(), "float32", list(x.shape), chunk_bytes)
        return
    plan, out = roundtrip(name, x.tobytes(), "float32", list(x.shape), chunk_bytes)
    assert plan.dtype == "float32" and len(out) == x.nbytes  # decodes back to float32
    y = np.frombuffer(out, np.float32).astype(np.float64)
    xr = x.ravel().astype(np.float64)
    assert plan.error_bound == (2**-8 if name == "bf16" else 2**-11)
    assert np.all(np.abs(xr - y) <= plan.error_bound * np.abs(xr) + plan.params["abs_floor"])
    stored = sum(len(bytes(c)) for c in encode(name, x.tobytes(), "float32", list(x.shape), chunk_bytes)[1])
    assert stored * 2 == x.nbytes


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_downcast_keeps_inf_and_nan(name: str) -> None:
    x = np.array([np.inf, -np.inf, np.nan, 1.5, -0.0], np.float32)
    _, out = roundtrip(name, x.tobytes(), "float32", [5], 8)
    y = np.frombuffer(out, np.float32)
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and y[3] == 1.5
    assert np.signbit(y[4])


def test_fp16_refuses_overflow_and_bf16_takes_it() -> None:
    x = np.array([1.0, 70000.0], np.float32)
    with pytest.raises(ValueError, match=r"overflows float16.*65504"):
        get_codec("fp16").prepare(x.tobytes(), "float32", [2], 64)
    get_codec("bf16").prepare(x.tobytes(), "float32", [2], 64)
    ok = np.array([65504.0, -65519.0], np.float32)  # rounds to 65504, no overflow
    get_codec("fp16").prepare(ok.tobytes(), "float32", [2], 64)
    big = np.array([np.finfo(np.float32).max], np.float32)
    with pytest.raises(ValueError, match="overflows bfloat16"):
        get_codec("bf16").prepare(big.tobytes(), "float32", [1], 64)


def test_bf16_rounding_matches_reference() -> None:
    rng = np.random.default_rng(11)
    u = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    # ties and near-ties, around 1.0 and at the top of the range
    extra = np.array(
        [0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0xFF7F8000, 0x00008000], np.uint32
    )
    u = np.concatenate([u, extra])
    x = u.view(np.float32)
    got = f32_to_bf16(x)
    # reference: round the float64 value to 8 significant bits, ties to even, via integer math
    lower = (u >> 16).astype(np.int64)
    rem = (u & 0xFFFF).astype(np.int64)
    up = (rem > 0x8000) | ((rem == 0x8000) & (lower & 1 == 1))
    ref = ((lower + up) & 0xFFFF).astype(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], ref[~nan])
    assert np.isnan(bf16_to_f32(got[nan])).all()
    assert np.array_equal(np.signbit(bf16_to_f32(got[nan])), np.signbit(x[nan]))


# ---- plans -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_plan_dict_roundtrip(name: str) -> None:
    x = (np.arange(40, dtype=np.float32) - 20).reshape(4, 10)
    plan = get_codec(name).prepare(x.tobytes(), "float32", [4, 10], 48)
    d = plan.to_dict()
    back = Plan.from_dict(msgspec.msgpack.decode(msgspec.msgpack.encode(d)))
    assert back == plan and back.to_dict() == d
    assert back.span(plan.n_chunks - 1)[1] == plan.nbytes


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"nbytes": 10}, "nbytes"),
        ({"n_chunks": 99}, "n_chunks"),
        ({"dtype": "float33"}, "unknown dtype"),
        ({"shape": [-1, 4]}, "non-negative"),
        ({"raw_chunk_bytes": 6}, "multiple of the item size"),
        ({"v": 2}, "version"),
        ({"params": []}, "params"),
        ({"error_bound": "x"}, "error_bound"),
    ],
)
def test_plan_from_dict_rejects_bad_plans(change: dict, match: str) -> None:
    d = get_codec("zstd").prepare(bytes(64), "float32", [4, 4], 16).to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)
    with pytest.raises(ValueError, match="missing field"):
        Plan.from_dict({"codec": "raw"})
    with pytest.raises(ValueError, match="dict"):
        Plan.from_dict([1, 2])


# ---- bad input -------------------------------------------------------------------------------------
def test_unknown_codec_lists_the_names() -> None:
    with pytest.raises(ValueError, match=r"unknown codec 'lz4'.*raw, zstd, int8, bf16, fp16"):
        get_codec("lz4")


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "raw", "chunk", "match"),
    [
        ("raw", "float33", [2], bytes(8), 4, "unknown dtype 'float33'"),
        ("zstd", "float32", [2], bytes(7), 4, "raw holds 7 bytes but float32.2. needs 8"),
        ("zstd", "float32", [2, -1], bytes(8), 4, "non-negative"),
        ("zstd", "float32", "2", bytes(8), 4, "list of ints"),
        ("raw", "float32", [2], bytes(8), 0, "chunk_bytes must be a positive int"),
        ("int8", "int32", [2, 2], bytes(16), 4, "int8 quantizes float32/float16/bfloat16"),
        ("bf16", "float16", [2], bytes(4), 4, "bf16 stores float32 tensors"),
        ("fp16", "bfloat16", [2], bytes(4), 4, "fp16 stores float32 tensors"),
        ("raw", "float32", [2], 12345, 4, "contiguous bytes-like"),
    ],
)
def test_prepare_rejects_bad_input(
    name: str, dtype: str, shape: list[int], raw: bytes, chunk: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        get_codec(name).prepare(raw, dtype, shape, chunk)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_rejects_bad_chunks_and_outputs(name: str) -> None:
    x = (np.arange(64, dtype=np.float32) / 7).reshape(8, 8)
    codec = get_codec(name)
    plan, chunks = encode(name, x.tobytes(), "float32", [8, 8], 64)
    out = bytearray(plan.nbytes)
    with pytest.raises(ValueError, match="out of range"):
        codec.decode_chunk(plan, plan.n_chunks, chunks[0], out)
    with pytest.raises(ValueError, match="out holds"):
        codec.decode_chunk(plan, 0, chunks[0], bytearray(plan.nbytes - 4))
    with pytest.raises(ValueError, match="writable"):
        codec.decode_chunk(plan, 0, chunks[0], bytes(plan.nbytes))
    with pytest.raises(ValueError, match=f"plan is for codec {plan.codec!r}"):
        other = "zstd" if name == "raw" else "raw"
        get_codec(other).decode_chunk(plan, 0, chunks[0], out)
    with pytest.raises(ValueError, match=f"{name} chunk 0"):
        codec.decode_chunk(plan, 0, bytes(chunks[0])[:-3] or b"\x00", out)
    with pytest.raises(ValueError, match="got 1 chunks"):
        decode_all(codec, plan, chunks[:1], out)
    with pytest.raises(ValueError, match="raw holds"):
        codec.encode_chunk(plan, 0, bytes(10))
    assert out == bytearray(plan.nbytes)  # nothing was written by the failed calls


def test_zstd_rejects_garbage_and_lying_frames() -> None:
    plan, chunks = encode("zstd", bytes(4096), "float32", [1024], 1024)
    out = bytearray(plan.nbytes)
    with pytest.raises(ValueError, match="zstd chunk 1: not a zstd frame"):
        get_codec("zstd").decode_chunk(plan, 1, b"not zstd at all", out)
    with pytest.raises(ValueError, match="frame holds 4096 bytes, expected 1024"):
        get_codec("zstd").decode_chunk(
            plan, 0, encode("zstd", bytes(4096), "float32", [1024], 4096)[1][0], out
        )
    broken = bytearray(chunks[2])
    broken[-1] ^= 0xFF
    broken[len(broken) // 2] ^= 0xFF
    with pytest.raises(ValueError, match="zstd chunk 2"):
        get_codec("zstd").decode_chunk(plan, 2, bytes(broken), out)


def test_codec_names_and_lossless_flags() -> None:
    assert CODEC_NAMES == ("raw", "zstd", "int8", "bf16", "fp16")
    assert LOSSLESS == ["raw", "zstd"]
    assert all(get_codec(n).name == n for n in CODEC_NAMES)
