"""Codec policy (explicit > tag > automatic and lossless) and the start-up calibration.

No timing is asserted: the policy is fed fake calibrations, and calibrate() is only checked for
positive numbers and for leaving no file behind.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from tierd import calibrate as cal
from tierd.calibrate import Calibration, ZstdRate
from tierd.codecs.policy import MIN_AUTO_BYTES, Choice, choose, sample_of

MIB = 1 << 20
BIG_FP16 = [32 * MIB]  # a 64 MiB fp16 entry: the policy only reads the sample


def fake_calib(
    disk_gbps: float = 1.8, decode_gbps: float = 0.8, zeros_gbps: float | None = None
) -> Calibration:
    """This machine's kind of numbers (MACHINE.md): disk 1.8 GB/s, zstd decode 0.8 GB/s/core."""
    rate = ZstdRate(ratio=1.09, encode_gbps=0.5, decode_gbps=decode_gbps, decode_zeros_gbps=zeros_gbps)
    return Calibration(
        memcpy_gbps=9.0,
        disk_write_gbps=1.3,
        disk_read_gbps=disk_gbps,
        zstd={"float16": rate, "bfloat16": rate, "float32": rate},
        disk_mode="direct",
        cores=2,
    )


def gaussian(dtype: str, nbytes: int = MIB) -> memoryview:
    return memoryview(cal.gaussian_bytes(dtype, nbytes, seed=5))


# ---- explicit > tag > auto -------------------------------------------------------------------------
def test_explicit_request_wins_over_tags() -> None:
    c = choose(
        fake_calib(),
        "float16",
        [1024, 1024],
        gaussian("float16"),
        requested="zstd",
        tag_codecs={"weight": "int8"},
        tags=["weight"],
        cores=2,
    )
    assert c.codec == "zstd" and "requested" in c.reason
    assert 1.0 < c.expected_ratio < 1.5  # measured on the sample


def test_explicit_lossy_request_is_honoured() -> None:
    c = choose(fake_calib(), "float32", [64, 64], gaussian("float32", 64 * 64 * 4), requested="bf16", cores=2)
    assert c == Choice("bf16", "requested by the put", 2.0)


def test_explicit_request_that_does_not_apply_says_why() -> None:
    with pytest.raises(ValueError, match=r"codec 'int8' cannot store int32\[4, 4\]: int8 quantizes float32"):
        choose(fake_calib(), "int32", [4, 4], memoryview(bytes(64)), requested="int8", cores=2)
    with pytest.raises(ValueError, match=r"cannot store float16\[8\]: fp16 stores float32 tensors"):
        choose(fake_calib(), "float16", [8], memoryview(bytes(16)), requested="fp16", cores=2)
    with pytest.raises(ValueError, match=r"unknown codec 'gzip'.*raw, zstd, int8, bf16, fp16"):
        choose(fake_calib(), "float16", [8], memoryview(bytes(16)), requested="gzip", cores=2)


def test_auto_request_means_no_request() -> None:
    c = choose(
        fake_calib(),
        "float16",
        [8],
        memoryview(bytes(16)),
        requested="auto",
        tag_codecs={"w": "zstd"},
        tags=["w"],
    )
    assert c.codec == "zstd" and "tag 'w'" in c.reason


def test_tag_rule_applies_before_auto() -> None:
    c = choose(
        fake_calib(),
        "bfloat16",
        [1024, 512],
        gaussian("bfloat16"),
        requested=None,
        tag_codecs={"weight": "int8", "kv": "zstd"},
        tags=["layer0", "weight"],
        cores=2,
    )
    assert c.codec == "int8" and "tag 'weight'" in c.reason
    assert c.expected_ratio == pytest.approx(1024 * 512 * 2 / (1024 * 512 + 4 * 1024))


def test_tag_rule_that_does_not_apply_falls_through_to_auto() -> None:
    c = choose(
        fake_calib(),
        "int64",
        [1 << 20],
        memoryview(np.arange(1 << 17, dtype=np.int64).view(np.uint8)),
        requested=None,
        tag_codecs={"weight": "int8"},
        tags=["weight"],
        cores=2,
    )
    assert "skipped" in c.reason and "int8 quantizes" in c.reason and "auto" in c.reason
    assert c.codec in ("raw", "zstd")  # lossless either way


def test_unknown_codec_in_a_tag_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        choose(
            fake_calib(),
            "float16",
            [8],
            memoryview(bytes(16)),
            requested=None,
            tag_codecs={"w": "lz4"},
            tags=["w"],
            cores=2,
        )


# ---- auto ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_auto_keeps_gaussian_weights_raw_on_this_kind_of_machine(dtype: str) -> None:
    """disk 1.8 GB/s, zstd decode 0.8 GB/s/core, 2 cores: zstd cannot keep up with the disk."""
    size = 4 if dtype == "float32" else 2
    c = choose(
        fake_calib(),
        dtype,
        [64 * MIB // size],
        gaussian(dtype),
        requested=None,
        tag_codecs={},
        tags=[],
        cores=2,
    )
    assert c.codec == "raw" and c.expected_ratio == 1.0
    assert "would not be faster" in c.reason
    # the reason gives the numbers: ratio and both estimated cold reads
    assert "zstd 1." in c.reason and "est. cold read" in c.reason and "vs raw 0.0373 s" in c.reason


@pytest.mark.parametrize(("decode", "cores"), [(1.79, 1), (1.6, 2)])
def test_auto_counts_the_cpu_cost_of_reading_compressed_bytes(decode: float, cores: int) -> None:
    """Numbers calibrated here (disk 1.68 GB/s, fp16 decode 1.6-1.79 GB/s/core): decode alone outruns
    the disk, but measured LMDB cold reads with zstd were slower than raw (1 thread) or no faster
    (2 threads): the policy must say raw."""
    calib = fake_calib(disk_gbps=1.68)
    calib.zstd["float16"] = ZstdRate(ratio=1.186, encode_gbps=1.0, decode_gbps=decode, decode_zeros_gbps=4.5)
    c = choose(calib, "float16", BIG_FP16, gaussian("float16"), cores=cores)
    assert c.codec == "raw", c.reason


def test_auto_picks_zstd_for_compressible_data_on_a_slow_disk() -> None:
    zeros = memoryview(bytes(MIB))
    c = choose(
        fake_calib(disk_gbps=0.2), "float16", BIG_FP16, zeros, requested=None, tag_codecs={}, tags=[], cores=2
    )
    assert c.codec == "zstd" and c.expected_ratio > 100
    assert c.reason.startswith("auto: zstd (zstd ") and "saves 100%" in c.reason


def test_auto_zeros_on_a_fast_disk_depend_on_the_measured_decode_speed() -> None:
    zeros = memoryview(bytes(MIB))
    # without a decode speed measured on compressible data, the gaussian one is used: too slow
    assert choose(fake_calib(), "float16", BIG_FP16, zeros, cores=2).codec == "raw"
    # with one (zeros decode at 4 GB/s/core), almost nothing is read and decoding keeps up
    c = choose(fake_calib(zeros_gbps=4.0), "float16", BIG_FP16, zeros, cores=2)
    assert c.codec == "zstd", c.reason


def test_auto_needs_ten_percent_saving() -> None:
    # a disk so slow that any saving is faster; a ratio of ~1.0 still stays raw
    rnd = memoryview(np.random.default_rng(1).bytes(MIB))
    c = choose(fake_calib(disk_gbps=0.01), "uint8", [64 * MIB], rnd, cores=2)
    assert c.codec == "raw" and "< 10%" in c.reason


def test_auto_more_cores_can_tip_the_balance() -> None:
    bf16 = gaussian("bfloat16")  # ~1.46x with the byte shuffle
    calib = fake_calib(disk_gbps=1.8, decode_gbps=0.8)
    assert choose(calib, "bfloat16", BIG_FP16, bf16, cores=2).codec == "raw"
    assert choose(calib, "bfloat16", BIG_FP16, bf16, cores=4).codec == "zstd"


def test_auto_small_and_empty_entries_stay_raw() -> None:
    calib = fake_calib(disk_gbps=0.01)
    zeros = memoryview(bytes(MIN_AUTO_BYTES - 2))
    assert choose(calib, "float16", [(MIN_AUTO_BYTES - 2) // 2], zeros, cores=2).codec == "raw"
    assert choose(calib, "float16", [0, 8], memoryview(b""), cores=2) == Choice(
        "raw", "auto: raw (empty tensor)", 1.0
    )


def test_unmeasured_dtype_uses_the_slowest_calibrated_decode() -> None:
    calib = fake_calib()
    calib.zstd["float32"] = ZstdRate(1.1, 0.5, 0.3)
    assert calib.zstd_rate("int16").decode_gbps == 0.3
    assert calib.zstd_rate("float16").decode_gbps == 0.8


def test_sample_of_takes_the_middle_on_item_boundaries() -> None:
    raw = memoryview(np.arange(3 * MIB, dtype=np.uint8) % 251)
    s = sample_of(raw, "float32")
    assert s.nbytes == MIB
    start = (3 * MIB - MIB) // 2
    assert bytes(s[:8]) == bytes(raw[start : start + 8])
    assert sample_of(memoryview(bytes(10)), "float32").nbytes == 8
    assert sample_of(memoryview(bytes(10)), "complex128").nbytes == 0


# ---- calibration -----------------------------------------------------------------------------------
def test_calibrate_measures_positive_numbers_and_leaves_no_file(tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    c = cal.calibrate(tmp_path, disk_bytes=8 * MIB, zstd_bytes=4 * MIB, memcpy_bytes=8 * MIB)
    assert sorted(os.listdir(tmp_path)) == before
    assert c.memcpy_gbps > 0 and c.disk_write_gbps > 0 and c.disk_read_gbps > 0
    assert c.disk_mode in ("direct", "buffered")
    assert set(c.zstd) == {"float16", "bfloat16", "float32"}
    for r in c.zstd.values():
        assert r.ratio > 1 and r.encode_gbps > 0 and r.decode_gbps > 0
        assert r.decode_zeros_gbps is not None and r.decode_zeros_gbps > 0
    assert c.cores >= 1 and c.seconds > 0
    d = c.to_dict()
    assert Calibration.from_dict(d) == c
    assert set(d) >= {"memcpy_gbps", "disk_write_gbps", "disk_read_gbps", "zstd", "disk_mode", "cores"}


def test_calibrate_falls_back_when_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: str, flags: int) -> int:
        raise OSError(errno.EINVAL, "O_DIRECT refused (test)")

    monkeypatch.setattr(cal, "_open_direct", refuse)
    w, r, mode, _ = cal.measure_disk(tmp_path, 4 * MIB)
    assert mode == "buffered" and w > 0 and r > 0
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_calibrate_on_tmpfs_leaves_nothing() -> None:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="tierd-cal-") as d:
        w, r, mode, _ = cal.measure_disk(d, 4 * MIB)
        assert w > 0 and r > 0 and mode in ("direct", "buffered")
        assert os.listdir(d) == []


def test_calibrate_removes_its_file_when_the_read_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_read(*args: object) -> None:
        raise OSError(errno.EIO, "read failed (test)")

    monkeypatch.setattr(cal, "_read_all", broken_read)
    with pytest.raises(OSError, match="read failed"):
        cal.measure_disk(tmp_path, 4 * MIB)
    assert os.listdir(tmp_path) == []


def test_calibrate_keeps_assumed_disk_numbers_when_the_disk_cannot_be_used(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    c = cal.calibrate(missing, disk_bytes=4 * MIB, zstd_bytes=1 * MIB, memcpy_bytes=4 * MIB)
    assert c.disk_mode == "assumed" and c.disk_read_gbps == Calibration.assumed().disk_read_gbps
    assert any("disk not measured" in n for n in c.notes)
    assert not missing.exists()


def test_assumed_calibration_keeps_gaussian_raw() -> None:
    calib = Calibration.assumed()
    for dtype in ("float16", "bfloat16", "float32"):
        size = 4 if dtype == "float32" else 2
        assert choose(calib, dtype, [64 * MIB // size], gaussian(dtype), cores=calib.cores).codec == "raw"


def test_calibrate_counts_the_fastest_of_its_direct_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shared disk's speed swings from one second to the next, and the reading decides every
    # entry's codec: one read at a slow moment is not the disk's speed.
    seconds = iter([0.4, 0.1, 0.2])
    monkeypatch.setattr(cal, "_timed_read", lambda *a: next(seconds))
    _w, r, mode, _ = cal.measure_disk(tmp_path, 4 * MIB, counter=lambda: 0)  # no one else on it
    if mode == "direct":  # where O_DIRECT is refused the file is read once, buffered
        assert cal.READS == 3 and r == pytest.approx(4 * MIB / 0.1 / 1e9)
    else:
        assert r == pytest.approx(4 * MIB / 0.4 / 1e9)
    assert os.listdir(tmp_path) == []


def test_a_read_on_a_shared_disk_counts_what_the_disk_moved_for_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process loading a checkpoint while the daemon calibrates shares the disk: the read
    # is slow because the disk moved others' bytes too, and that is counted (the device's total).
    seconds = iter([0.4, 0.1, 0.2])
    monkeypatch.setattr(cal, "_timed_read", lambda *a: next(seconds))
    moved = iter([0, 4 * MIB, 10 * MIB, 30 * MIB, 40 * MIB, 44 * MIB])  # before/after each read

    def counter() -> int:
        return next(moved)

    speed = cal.measure_disk(tmp_path, 4 * MIB, counter=counter)
    if speed.mode != "direct":
        pytest.skip("O_DIRECT refused here: the read is buffered and counted once, on its own")
    # reads: 4 MiB alone in 0.4 s; 20 MiB (16 for others) in 0.1 s; 4 MiB alone in 0.2 s
    assert speed.others_bytes == 16 * MIB and speed.read_gbps == pytest.approx(20 * MIB / 0.1 / 1e9)
    monkeypatch.setattr(cal, "measure_disk", lambda *a, **k: cal.DiskSpeed(1.0, 2.0, "direct", 16 * MIB))
    c = cal.calibrate(tmp_path, disk_bytes=4 * MIB, zstd_bytes=1 * MIB, memcpy_bytes=4 * MIB)
    assert c.disk_read_gbps == 2.0 and any("16 MiB for others" in n for n in c.notes), c.notes


def test_the_device_counter_counts_a_direct_read(tmp_path: Path) -> None:
    counter = cal.device_counter(tmp_path)
    if counter is None:
        pytest.skip(f"no block device behind {tmp_path} (tmpfs, overlay)")
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8 * MIB))
    os.sync()
    buf = mmap.mmap(-1, 8 * MIB)
    try:
        fd = cal._open_direct(str(path), os.O_RDONLY)
    except OSError:
        pytest.skip("O_DIRECT refused here")
    try:
        before = counter()
        cal._read_all(fd, buf, 8 * MIB, MIB)
        assert counter() - before >= 8 * MIB  # sysfs counts the disk's bytes: ours at least
    finally:
        os.close(fd)
        buf.close()
