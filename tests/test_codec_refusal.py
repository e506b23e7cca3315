"""A lossy codec that cannot hold a tensor's values (fp16 past 65504, int8 of inf or NaN) is a
refusal of that put, not an internal error, when the put asked for it; when a tag rule chose it,
the entry is stored losslessly instead. Real daemon, real LMDB disk tier."""

from __future__ import annotations

import numpy as np
import pytest

from tierd.errors import InvalidRequest
from tierd_client import Client

N = 64 * 1024


@pytest.mark.parametrize("durable", [False, True])
@pytest.mark.parametrize(
    ("codec", "bad"), [("fp16", np.float32(1e6)), ("bf16", np.float32(3.4e38)), ("int8", np.float32(np.inf))]
)
def test_requested_codec_refuses_what_it_cannot_hold(start_daemon, codec, bad, durable) -> None:
    d = start_daemon(ram_bytes="16MiB", disk_bytes="64MiB")
    good = np.linspace(-2, 2, N, dtype=np.float32)
    hostile = good.copy()
    hostile[N // 3] = bad
    with Client(str(d.socket)) as c:
        v1 = c.put("t/x", good, codec=codec, durable=durable)
        with pytest.raises(InvalidRequest, match=f"'t/x': {codec} "):
            c.put("t/x", hostile, codec=codec, durable=durable)
        assert len(c.ls("t/")) == 1  # the refused put left nothing behind
        got = c.get("t/x")
        assert c.why("t/x")["version"] == v1.version  # the old version is still the current one
        assert np.abs(got.numpy() - good).max() <= 2 * 2.0**-8 * 2
        del got
        c.put("t/y", good)  # and the daemon goes on serving
    assert "internal error" not in d.log()


def test_tag_rule_falls_back_to_lossless(start_daemon) -> None:
    d = start_daemon("--tag-codecs", "act=fp16", ram_bytes="16MiB", disk_bytes="64MiB")
    x = np.linspace(-1, 1, N, dtype=np.float32)
    x[7] = 1e6  # fp16 cannot hold it
    with Client(str(d.socket)) as c:
        c.put("t/a", x, tags=["act"])
        np.testing.assert_array_equal(c.get("t/a").numpy(), x)  # not rounded at seal either
        c.evict("t/a")  # through the disk tier and back
        w = c.why("t/a")
        assert "skipped" in w["codec"]["reason"] and "overflows float16" in w["codec"]["reason"]
        np.testing.assert_array_equal(c.get("t/a").numpy(), x)
    assert "internal error" not in d.log()
