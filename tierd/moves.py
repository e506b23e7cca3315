"""The one move: copy a version's bytes from one tier to another, in two steps.

Promotion (a get, a prefetch) and demotion (room needed, the watermark, pressure, evict) between
any two tiers are the same three steps, with the version protected throughout
(:meth:`Manager.protected`), so that eviction, freeing and a second mover cannot race it::

    1. protect   the source copy cannot be dropped or freed; nor the version (a put of the same
                 key or a delete only hides it; it is freed when the move ends)
    2. copy      into a memory tier: take a region (``room``: placement demotes to make it), then
                   memory -> memory  memcpy                         (io threads)
                   store  -> memory  read chunks, check, decode     (reader thread + io threads)
                 into a chunk store:
                   memory -> store   choose the codec, encode, checksum, write, commit (writer thread)
    3. publish   Manager.place(e, dst, location): from now on readers may find it there; unprotect

A device tier (the GPU: ``host_visible`` False) is copied into and out of through its own
``upload`` / ``download`` instead of a view. An upload is published as soon as it is queued (the
reader waits on its event, which the lease carries); the version stays protected until the device
reports the copy done, so the source bytes and the region stay put while the device reads them.

A failure in step 2 frees what step 2 took and publishes nothing. Concurrent moves of one version
into one tier share a single copy. Dropping the upper copy after a demotion is placement's step,
once the move is over and nothing holds the version; the lower copy stays (inclusive caching).
All codec, copy and I/O work runs in executors: the loop only starts, awaits and publishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from tierd.entry import SEALED, Entry
from tierd.errors import InvalidRequest, Unsupported
from tierd.manager import Manager
from tierd.tiers.store import CHUNK_BYTES, RELIEF_CHUNK_BYTES

log = logging.getLogger("tierd.moves")

#: placement's room maker: (tier name, key, nbytes, for_prefetch, owner uid) -> a region there
Room = Callable[[str, str, int, bool, int], Awaitable[int]]


class Mover:
    def __init__(self, manager: Manager, *, tag_codecs: dict[str, str], cores: int) -> None:
        self.m = manager
        self.tag_codecs = tag_codecs
        self.cores = cores
        self.calibration: Any = None  # set once the start-up calibration has run
        self.io = ThreadPoolExecutor(cores, thread_name_prefix="tierd-io")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="tierd-disk-w")
        self.reader = ThreadPoolExecutor(2, thread_name_prefix="tierd-disk-r")
        #: moves in flight, per destination tier: version -> its shared outcome
        self.inflight: dict[str, dict[int, asyncio.Future[None]]] = {n: {} for n in manager.tiers}
        #: the in-flight copies made for a prediction or a hint, per destination: a demand request
        #: that finds no room may wait for them (once done they are unread prefetches it may take)
        self.speculative: dict[str, dict[int, asyncio.Future[None]]] = {n: {} for n in manager.tiers}
        #: device copies queued and not done yet (each holds its version protected)
        self.device_copies: set[asyncio.Task[None]] = set()

    def close(self) -> None:
        for ex in (self.reader, self.writer, self.io):
            ex.shutdown(wait=True, cancel_futures=False)

    async def copy(self, e: Entry, src: str, dst: str, room: Room, for_prefetch: bool = False) -> bool:
        """Give ``e`` a copy in ``dst`` from its copy in ``src`` (see the module docstring).

        Returns True when this call made the copy, False when it was there already or another
        caller's copy was awaited (that caller counts it). Raises what the copy raised.
        """
        inflight = self.inflight[dst]
        pending = inflight.get(e.version)
        if pending is not None:
            await asyncio.shield(pending)
            return False
        if dst in e.where:
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        inflight[e.version] = fut
        if for_prefetch:
            self.speculative[dst][e.version] = fut
        try:
            with self.m.protected(e):
                if dst in self.m.memory:
                    loc: Any = await self._into_memory(e, src, dst, room, for_prefetch)
                else:
                    loc = await self._into_store(e, src, dst)
                self.m.place(e, dst, loc)
            fut.set_result(None)
        except BaseException as ex:
            fut.set_exception(ex)
            fut.exception()  # retrieved: the sharers re-raise it themselves
            raise
        finally:
            del inflight[e.version]
            self.speculative[dst].pop(e.version, None)
        return True

    async def _into_memory(self, e: Entry, src: str, dst: str, room: Room, for_prefetch: bool) -> int:
        loop = asyncio.get_running_loop()
        tier = self.m.memory[dst]
        offset = await room(dst, e.key, e.nbytes, for_prefetch, e.uid)
        try:
            if not tier.host_visible:
                self._upload(e, src, dst, offset)
                return offset
            view = tier.view(offset, e.nbytes)
            where = e.where[src]
            source = self.m.memory.get(src)
            if source is not None and not source.host_visible:
                await loop.run_in_executor(self.io, source.download, where, view)  # type: ignore[attr-defined]
            elif source is not None:
                await loop.run_in_executor(self.io, _memcpy, view, source.view(where, e.nbytes))
            else:
                await loop.run_in_executor(self.reader, self.m.stores[src].read_into, where, view, self.io)
        except BaseException:
            tier.free(offset)
            raise
        return offset

    def _upload(self, e: Entry, src: str, dst: str, offset: int) -> None:
        """Queue the copy of ``e``'s host copy in ``src`` into device tier ``dst``; ``e`` stays
        protected until the device has done it."""
        source = self.m.memory.get(src)
        if source is None or not source.host_visible:
            raise Unsupported(f"a copy into {dst} comes from host memory, not from {src}")
        copy = self.m.memory[dst].upload(offset, source.view(e.where[src], e.nbytes))  # type: ignore[attr-defined]
        hold = self.m.protected(e)
        hold.__enter__()  # now, before the caller's protection ends; left when the copy is done
        task = asyncio.get_running_loop().create_task(self._held_until(e, dst, offset, copy.done, hold))
        self.device_copies.add(task)
        task.add_done_callback(self.device_copies.discard)

    async def _held_until(self, e: Entry, dst: str, offset: int, done: Any, hold: Any) -> None:
        try:
            await asyncio.wrap_future(done)
        except Exception as ex:  # noqa: BLE001  # the device failed the copy: that copy must go
            log.error("copy of %r v%d into %s failed: %s", e.key, e.version, dst, ex)
            if e.where.get(dst) == offset and not e.held.get(dst) and len(e.where) > 1:
                self.m.drop(e, dst)
        finally:
            hold.__exit__(None, None, None)

    async def drain(self) -> None:
        """Wait for the device copies in flight (at shutdown, before the device goes)."""
        if self.device_copies:
            await asyncio.gather(*list(self.device_copies), return_exceptions=True)

    async def _into_store(self, e: Entry, src: str, dst: str) -> Any:
        if src not in self.m.memory or not self.m.memory[src].host_visible:
            raise Unsupported(
                f"moving {e.key!r} from chunk store {src} to chunk store {dst} is not supported"
            )
        loop = asyncio.get_running_loop()
        store = self.m.stores[dst]
        view = self.m.memory[src].view(e.where[src], e.nbytes)
        plan, reason = await loop.run_in_executor(self.io, self._plan, e, view)
        meta = {
            "key": e.key, "version": e.version, "dtype": e.dtype, "shape": list(e.shape),
            "nbytes": e.nbytes, "tags": list(e.tags), "durable": e.durable, "ttl": e.ttl,
            "scope": e.scope, "created": e.created, "uid": e.uid, "codec_reason": reason,
        }  # fmt: skip
        rec = await loop.run_in_executor(self.writer, store.write, meta, plan, view, self.io)
        if e.state == SEALED and not e.current:  # hidden while we wrote: not for a restart
            await loop.run_in_executor(self.writer, store.unpublish, rec)
        return rec

    # ---- lossy codecs: one value per version ---------------------------------------------------
    def may_be_lossy(self, e: Entry) -> bool:
        """Whether ``e`` asked for a lossy store codec, itself or through a tag rule (cheap check)."""
        from tierd.codecs import get_codec

        names = [e.codec] if e.codec not in (None, "auto") else [self.tag_codecs[t] for t in e.tags
                                                                  if t in self.tag_codecs]  # fmt: skip
        return any(not get_codec(n).lossless for n in names if n)

    async def round_trip(self, e: Entry) -> None:
        """Replace a put's RAM bytes with what its lossy store codec gives back, before it is sealed.

        Otherwise a reader would see the exact bytes while the entry stays in RAM and the decoded
        ones after a trip through a store: the same version with two values, and a model's output
        depending on what was evicted. The codecs are idempotent on their own output (int8: the
        row's absmax decodes to itself, so the same scale and codes come back; downcasts: values
        already representable), so the copy written later decodes to these very bytes.
        """
        home = self.m.ram
        with self.m.protected(e):
            view = home.view(e.where[home.name], e.nbytes)
            await asyncio.get_running_loop().run_in_executor(self.io, self._round_trip, e, view)

    def _round_trip(self, e: Entry, view: memoryview) -> None:
        from tierd.codecs import get_codec

        plan, _ = self._plan(e, view)
        codec = get_codec(plan.codec)
        if codec.lossless:
            return
        for i in range(plan.n_chunks):
            stored = bytes(codec.encode_chunk(plan, i, view))  # a copy: decode writes the same span
            codec.decode_chunk(plan, i, stored, view)

    def _plan(self, e: Entry, view: memoryview) -> tuple[Any, str]:
        """Choose the codec (explicit > tag rule > measured) and prepare its plan (in ``io``);
        returns the plan and why that codec."""
        from tierd.calibrate import Calibration
        from tierd.codecs import get_codec
        from tierd.codecs.policy import choose

        calib = self.calibration or Calibration.assumed()
        sample, shape = _sample(view), list(e.shape)
        home = self.m.ram
        # memory is short while pressure holds the home tier down: smaller chunks, so writing one
        # (which holds it about twice until it commits) takes little of what the write gives back
        chunk = RELIEF_CHUNK_BYTES if home.ceiling < home.capacity_bytes else CHUNK_BYTES
        choice = choose(calib, e.dtype, shape, sample, requested=e.codec,
                        tag_codecs=self.tag_codecs, tags=list(e.tags), cores=self.cores)  # fmt: skip
        codec = get_codec(choice.codec)
        try:
            return codec.prepare(view, e.dtype, shape, chunk), choice.reason
        except ValueError as ex:  # the data, not the dtype: fp16 overflow, int8 of inf or NaN
            if codec.lossless:
                raise
            if e.codec not in (None, "auto"):  # the put asked for it: refused, nothing stored
                raise InvalidRequest(f"{e.key!r}: {ex}") from None
            # a tag rule's lossy codec cannot hold this tensor: stored losslessly instead, as a
            # rule that does not apply to the dtype is skipped
            auto = choose(calib, e.dtype, shape, sample, cores=self.cores)
            why = f"{choice.reason} skipped: {ex}; {auto.reason}"
            return get_codec(auto.codec).prepare(view, e.dtype, shape, chunk), why


def _memcpy(dst: memoryview, src: memoryview) -> None:
    np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))


def _sample(view: memoryview, size: int = 1 << 20) -> memoryview:
    """Up to ``size`` bytes from the middle of a region (the codec policy measures on it)."""
    n = len(view)
    if n <= size:
        return view
    start = (n // 2 - size // 2) // 64 * 64
    return view[start : start + size]
